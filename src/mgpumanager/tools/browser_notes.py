"""What `check-config` says about browsers: which Host names each listener answers to and
which web pages may use it (`auth.allowed_hosts`, `auth.allowed_origins`; the rules are in
origins.py), so an operator sees why a page or a name is refused before a user finds out."""

from __future__ import annotations

import ipaddress

from mgpumanager.registry import Config, is_loopback, split_listen
from mgpumanager.registry.origins import ANY


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _listeners(config: Config) -> list[tuple[str, str]]:
    out = [("listen", config.listen)]
    out += [
        (f"front door of {name}", c.front_door)
        for name, c in config.consumers.items()
        if c.front_door is not None
    ]
    return out


def browser_notes(config: Config) -> list[str]:
    """Lines for `check-config`, after OK."""
    auth = config.auth
    lines = ["Browsers (auth.allowed_hosts, auth.allowed_origins):"]
    if ANY in auth.allowed_hosts:
        lines.append(
            "  allowed_hosts has '*': every Host name is served, so DNS rebinding (a web page "
            "on a name that resolves to this box) is not stopped here; keep '*' only behind a "
            "proxy that checks Host"
        )
    names = "localhost, 127.0.0.1, [::1] (any port)"
    listed = [h for h in auth.allowed_hosts if h != ANY]
    if listed:
        names += ", " + ", ".join(f"[{h}]" if ":" in h else h for h in listed)
    lines.append(f"  every listener answers to Host {names}, and to the address it is reached at")
    lines.append("  any other Host is refused (403 forbidden): a web page's DNS rebinding")
    for what, address in _listeners(config):
        host, _ = split_listen(address)
        if is_loopback(host) or ANY in auth.allowed_hosts:
            continue
        if _is_ip(host) or host in ("", "0.0.0.0", "::"):
            lines.append(
                f"  {what} {address} is reachable beyond loopback: served by IP address; "
                "browsers that reach it by a name need that name in auth.allowed_hosts"
            )
        elif host.lower().rstrip(".") not in auth.allowed_hosts:
            lines.append(
                f"  {what} {address} listens on the name {host}, which auth.allowed_hosts does "
                f"not list: browsers that reach it as http://{address} are refused until it does"
            )
    lines.append(
        "  web pages: a listener's own (the dashboard, a front door's page) may use it; a "
        "request with any other Origin is refused (403 forbidden) before it runs"
    )
    if auth.allowed_origins:
        lines.append("  front ends let in, with CORS headers: " + ", ".join(auth.allowed_origins))
    else:
        lines.append(
            "  no other front end is let in: to let one, add its origin, e.g. "
            "auth.allowed_origins: [http://localhost:3000]"
        )
    lines.append(
        "  clients that send no Origin (curl, SDKs, the CLI, Open WebUI's server) need neither"
    )
    return lines
