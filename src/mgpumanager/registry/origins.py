"""Which names a listener answers to and which web origins may drive it: the pure half of the
browser guard (the middleware that applies it is browser_guard.py).

A broker on loopback is reachable from every web page its user opens: a page on a name that
resolves to 127.0.0.1 (DNS rebinding) sends `Host: attacker.example`, and any page can send a
cross-site "simple" request (a form, or `fetch` with `Content-Type: text/plain`, needs no
preflight), which carries the page's `Origin`. So, on every listener:

- **Host** must be a loopback name (`localhost`, a loopback IP such as `127.0.0.1` or `[::1]`,
  any port), the address the connection arrived on (an IP literal: no DNS answer can make a
  browser send it for another site), or a name in `auth.allowed_hosts` (`"*"`: any).
- **Origin**, where a request carries one, must be the listener's own origin or one of
  `auth.allowed_origins`. The own origin is the one whose host and port are the request's
  (checked) Host: what a browser sends only for a page the listener itself served, which is
  why the dashboard works whether it was opened as http://localhost:PORT or
  http://127.0.0.1:PORT, or through an SSH tunnel on another port. Another page on the same
  machine (http://localhost:3000) is another origin: it is refused until it is listed.
  `Origin: null` (sandboxed frames, file:// pages) is never the own origin.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

ANY = "*"
LOOPBACK_NAMES = frozenset({"localhost"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# One DNS label: letters, digits, hyphens (underscores too: some LAN names have them).
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HOST_HEADER = re.compile(
    r"(?:\[(?P<v6>[0-9a-f:.%a-z]+)\]|(?P<name>[^:\[\]/@\s]+))(?::(?P<port>\d{1,5}))?"
)


class Verdict(enum.StrEnum):
    OWN = "own"  # the listener's own origin: no CORS headers needed
    LISTED = "listed"  # in auth.allowed_origins: served with CORS headers
    FOREIGN = "foreign"  # refused


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_host(value: str) -> tuple[str, int | None] | None:
    """A Host header as (host, port): the host lower-cased, without brackets or a final dot.
    None when it is not a host[:port] at all."""
    m = _HOST_HEADER.fullmatch(value.strip().lower())
    if m is None:
        return None
    port = int(m["port"]) if m["port"] is not None else None
    if port is not None and port > 65535:
        return None
    if m["v6"] is not None:
        if _ip(m["v6"]) is None:
            return None
        return m["v6"], port
    name = m["name"].rstrip(".")
    if not name or (_ip(name) is None and _HOSTNAME.fullmatch(name) is None):
        return None
    return name, port


def is_loopback_name(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1), as parse_host gives it."""
    if host in LOOPBACK_NAMES:
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def same_address(host: str, local: str | None) -> bool:
    """Whether `host` (an IP literal) is the address the connection arrived on."""
    if local is None:
        return False
    a, b = _ip(host), _ip(local.split("%")[0])
    if a is None or b is None:
        return False
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return a == b


def host_allowed(value: str, local: str | None, allowed_hosts: Sequence[str]) -> bool:
    """Whether a listener whose connection arrived on address `local` serves Host `value`.
    Asked on every request with the same few values: the answers are kept (a bounded cache,
    so a client sending a new Host each time costs only its own parse)."""
    return _host_allowed(value, local, tuple(allowed_hosts))


@functools.lru_cache(maxsize=256)
def _host_allowed(value: str, local: str | None, allowed_hosts: tuple[str, ...]) -> bool:
    if ANY in allowed_hosts:
        return True
    parsed = parse_host(value)
    if parsed is None:
        return False
    host, _ = parsed
    return is_loopback_name(host) or same_address(host, local) or host in allowed_hosts


def normal_host(value: str) -> str:
    """An `auth.allowed_hosts` entry as it is compared: a name or IP literal, lower-cased,
    without brackets, port or final dot. ValueError, saying what is wanted, otherwise."""
    text = value.strip().lower()
    if text == ANY:
        return ANY
    wanted = (
        f"a host name or IP address as browsers send it in Host, without scheme or port, "
        f"e.g. gpubox.lan (got {value!r})"
    )
    if "://" in text or "/" in text:
        raise ValueError(wanted)
    bracketed = text.startswith("[") and text.endswith("]")
    if not bracketed and _ip(text) is not None:
        return str(_ip(text))  # a bare IPv6 literal has colons that are not a port
    parsed = parse_host(text)
    if parsed is None or parsed[1] is not None:
        raise ValueError(wanted)
    return parsed[0]


def normal_origin(value: str) -> str:
    """An origin as browsers send it: `scheme://host[:port]`, lower-cased, the scheme's default
    port left out. ValueError, saying what is wanted, when `value` is not one."""
    wanted = (
        "an origin: http:// or https://, a host and an optional port, nothing after it, "
        f"e.g. http://localhost:3000 (got {value!r})"
    )
    text = value.strip()
    if text == ANY:
        raise ValueError("'*' would let every web page drive the box: list each front end's origin")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(wanted) from None
    scheme = parts.scheme.lower()
    if (
        scheme not in ("http", "https")
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
        or not parts.hostname
    ):
        raise ValueError(wanted)
    host = parts.hostname.rstrip(".")
    if _ip(host) is None and _HOSTNAME.fullmatch(host) is None:
        raise ValueError(wanted)
    shown = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS[scheme]:
        shown += f":{port}"
    return f"{scheme}://{shown}"


def judge_origin(origin: str, host: str | None, allowed_origins: list[str]) -> Verdict:
    """Whether a request with `Origin: origin`, sent to Host `host` (already checked), is from
    the listener's own origin, a listed one, or a foreign one."""
    try:
        canonical = normal_origin(origin)
    except ValueError:
        return Verdict.FOREIGN  # "null", or anything a browser would not send for a page
    if host is not None and _own(canonical, host):
        return Verdict.OWN
    return Verdict.LISTED if canonical in allowed_origins else Verdict.FOREIGN


def _own(canonical: str, host: str) -> bool:
    """Whether origin `canonical` has the host and port of Host header `host`. Compared by
    host and port, not scheme: behind a TLS proxy a page of https://box is the broker's own
    while the proxy's request says Host: box (no port: the page's scheme's default)."""
    parts = urlsplit(canonical)
    target = parse_host(host)
    if target is None or parts.hostname is None:
        return False
    name, port = target
    origin_port = parts.port if parts.port is not None else DEFAULT_PORTS[parts.scheme]
    if port is None:  # a Host without a port: the default one of the scheme the page used
        port = DEFAULT_PORTS[parts.scheme]
    return parts.hostname == name and port == origin_port
