"""The registry's cross-key checks: what no single key's type can say (routing to a consumer
that exists, a consumer that fits on the card, unload/load keys its type honours, models and
aliases that agree, tokens, a base URL a client can use). They read the raw mapping, so that
they are reported beside the type errors instead of hiding behind them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mgpumanager.registry.models import (
    DEFAULT_CALLER,
    HONOURED_ACTIONS,
    AdapterType,
    Config,
    GpuConfig,
    is_loopback,
    redact_url,
    split_listen,
)

if TYPE_CHECKING:
    from mgpumanager.registry.load import ConfigProblem, Loc

Problem = Callable[["Loc", str], "ConfigProblem"]


def cross_key_problems(data: Mapping[str, Any], problem: Problem) -> Iterator[ConfigProblem]:
    """Cross-key checks. They read the raw mapping, defensively, so that they report alongside
    the per-key type errors instead of hiding behind them. `problem(loc, message)` makes one
    with its line."""

    def section(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    consumers = section(data.get("consumers"))
    names = set(consumers)
    listen = data.get("listen")
    if isinstance(listen, str):
        try:
            split_listen(listen)
        except ValueError as exc:
            yield problem(("listen",), str(exc))
    for kind, target in section(data.get("routing")).items():
        if isinstance(target, str) and target not in names:
            yield problem(("routing", kind), f"routes to {target!r}, which is not a consumer")
    audio_proxy = data.get("audio_proxy")
    if isinstance(audio_proxy, str) and audio_proxy not in names:
        yield problem(("audio_proxy",), f"{audio_proxy!r} is not a consumer")
    yield from _auth_problems(section(data.get("auth")), problem)
    yield from _listener_problems(data.get("listen"), consumers, problem)
    gpu = section(data.get("gpu"))
    total = gpu.get("total_mib")
    margin = gpu.get("safety_margin_mib", GpuConfig().safety_margin_mib)
    static_devices = _static_devices(gpu.get("devices"))
    if static_devices and total is None:
        total = max(static_devices.values())  # the largest card: what one consumer may need
    if gpu.get("backend") == "static" and total is None:
        yield problem(("gpu", "backend"), "backend 'static' needs gpu.total_mib or gpu.devices")
    for name, raw in consumers.items():
        c = section(raw)
        base: Loc = ("consumers", name)
        url = c.get("url")
        if isinstance(url, str) and (url_problem := check_url(url)) is not None:
            yield problem((*base, "url"), f"bad_consumer_url: {url_problem}")
        cost = c.get("vram_resident_mib")
        if _is_int(total) and _is_int(margin) and _is_int(cost) and cost > total - margin:
            yield problem(
                (*base, "vram_resident_mib"),
                f"{cost} MiB cannot fit on a {total} MiB GPU with a {margin} MiB safety margin",
            )
        if static_devices:
            yield from device_binding_problems(
                c.get("devices"), list(static_devices), (*base, "devices"), problem
            )
        coexist = c.get("can_coexist_with")
        for i, other in enumerate(coexist if isinstance(coexist, list) else []):
            if isinstance(other, str) and other not in names:
                yield problem((*base, "can_coexist_with", i), f"{other!r} is not a consumer")
            elif other == name:
                yield problem((*base, "can_coexist_with", i), "a consumer cannot list itself")
        is_command = c.get("type") == AdapterType.COMMAND.value
        if is_command and isinstance(c.get("unload"), Mapping) and c.get("load") is None:
            # Its unload stops the process; with no load nothing would ever start it again.
            yield problem((*base, "unload"), "type: command with an unload needs a load too")
        adapter_type = _adapter_type(c.get("type", AdapterType.GENERIC.value))
        yield from _container_problems(c, adapter_type, base, problem)
        for action_name in ("unload", "load"):
            action = c.get(action_name)
            if action is None:
                continue
            if adapter_type is not None and action_name not in registry_actions(adapter_type):
                # A key the type's adapter would not use: refused rather than silently ignored.
                yield problem(
                    (*base, action_name),
                    f"not applicable to type {adapter_type}: it uses its own {action_name} call "
                    f"(see docs/upstreams.md)",
                )
                continue
            if not isinstance(action, Mapping):
                continue
            if "command" in action and not is_command:
                yield problem(
                    (*base, action_name, "command"), "'command' actions need type: command"
                )
            if is_command and "command" not in action:
                yield problem((*base, action_name), "type: command needs a 'command' argv list")
        for kind in section(c.get("paths")):
            if not (isinstance(kind, str) and re.fullmatch(r"[a-z][a-z0-9_]*", kind)):
                yield problem((*base, "paths", kind), "kind names are lower-case words")
        models = _model_names(c.get("models"))
        for model in {m for m in models if models.count(m) > 1}:
            yield problem((*base, "models"), f"model {model!r} is listed twice")
        for alias, target in section(c.get("aliases")).items():
            if models and target not in models:
                yield problem((*base, "aliases", alias), f"{target!r} is not one of its models")
    warm = section(data.get("idle")).get("warm")
    for i, entry in enumerate(warm if isinstance(warm, list) else []):
        name, _, model = str(entry).partition("/")
        if name not in names:
            yield problem(("idle", "warm", i), f"{name!r} is not a consumer")
            continue
        models = _model_names(section(consumers[name]).get("models"))
        if model and models and model not in models:
            yield problem(("idle", "warm", i), f"{model!r} is not one of {name}'s models")
        if section(consumers[name]).get("idle_unload_s") is not None:
            # It would be unloaded when idle and brought back when idle, over and over.
            yield problem(("idle", "warm", i), f"{name} has idle_unload_s: warm it or unload it")


def _container_problems(
    c: Mapping[str, Any], adapter_type: AdapterType | None, base: Loc, problem: Problem
) -> Iterator[ConfigProblem]:
    """`container:`: the container driver stops and starts it, so no written unload or load
    may say otherwise; `type: docker` has no other way, so it needs one."""
    has_container = c.get("container") is not None
    if adapter_type is AdapterType.DOCKER and not has_container:
        yield problem((*base, "container"), "type: docker needs container: NAME")
    if not has_container:
        if "stop_timeout_s" in c:
            yield problem((*base, "stop_timeout_s"), "only for a consumer with a container")
        return
    if adapter_type is AdapterType.COMMAND:
        yield problem((*base, "container"), "type: command stops its process itself: not both")
    for action_name in ("unload", "load"):
        honoured = adapter_type is not None and action_name in HONOURED_ACTIONS[adapter_type]
        if c.get(action_name) is not None and honoured:
            yield problem(
                (*base, action_name),
                f"not applicable with container: stopping and starting the container is its "
                f"{action_name}",
            )


def _adapter_type(value: Any) -> AdapterType | None:
    try:
        return AdapterType(value)
    except ValueError:
        return None  # reported by the model's own validation


def registry_actions(kind: AdapterType) -> frozenset[str]:
    """Which of `unload:` / `load:` a type honours."""
    return HONOURED_ACTIONS[kind]


def _model_names(models: Any) -> list[str]:
    """The names in a raw `models` list (plain names or mappings with a name)."""
    out = []
    for m in models if isinstance(models, list) else []:
        name = m.get("name") if isinstance(m, Mapping) else m
        if isinstance(name, str):
            out.append(name)
    return out


def _auth_problems(
    auth: Mapping[str, Any], problem: Callable[[Loc, str], ConfigProblem]
) -> Iterator[ConfigProblem]:
    """Each token names one caller: names and token values are unique (`auth.token`, the
    unnamed one, goes by DEFAULT_CALLER)."""
    names: dict[str, str] = {}
    secrets: dict[str, str] = {}
    single = auth.get("token")
    if isinstance(single, str):
        names[DEFAULT_CALLER] = secrets[single] = "auth.token"
    tokens = auth.get("tokens")
    for i, entry in enumerate(tokens if isinstance(tokens, list) else []):
        if not isinstance(entry, Mapping):
            continue
        here = f"auth.tokens.{i}"
        name, secret = entry.get("name"), entry.get("token")
        if isinstance(name, str) and names.setdefault(name, here) != here:
            yield problem(("auth", "tokens", i, "name"), f"{name!r} is taken by {names[name]}")
        if isinstance(secret, str) and secrets.setdefault(secret, here) != here:
            yield problem(
                ("auth", "tokens", i, "token"),
                f"the same token as {secrets[secret]}: each token names one caller",
            )


# A host that binds every address: it takes the port from any other host.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def _same_address(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two HOST:PORTs (hosts lower-cased) cannot both be bound: the same port (not
    0, any free one) on the same host, a wildcard host, or `localhost` and a loopback one."""
    (host_a, port_a), (host_b, port_b) = a, b
    if port_a != port_b or port_a == 0:
        return False
    if host_a == host_b or host_a in _WILDCARD_HOSTS or host_b in _WILDCARD_HOSTS:
        return True
    local = {"localhost", "localhost."}
    return (host_a in local and is_loopback(host_b)) or (host_b in local and is_loopback(host_a))


def _listener_problems(
    listen: Any, consumers: Mapping[str, Any], problem: Problem
) -> Iterator[ConfigProblem]:
    """Each listener needs an address of its own: two front doors on one HOST:PORT, or a front
    door on `listen`'s, cannot both bind. And no consumer's `url` may point at one of them:
    the broker would relay its requests back to itself (a service not moved off the port its
    front door takes)."""
    taken: list[tuple[tuple[str, int], str]] = []  # (host, port), the key that has it

    def bound(address: Any) -> tuple[str, int] | None:
        if not isinstance(address, str):
            return None
        try:
            host, port = split_listen(address)
        except ValueError:
            return None  # reported where the key is validated
        return host.lower(), port

    def holder(where: tuple[str, int]) -> str | None:
        return next((key for other, key in taken if _same_address(where, other)), None)

    listening = bound(listen if listen is not None else Config.model_fields["listen"].default)
    if listening is not None:
        taken.append((listening, "listen"))
    for name, raw in consumers.items():
        door = raw.get("front_door") if isinstance(raw, Mapping) else None
        where = bound(door)
        if where is None:
            continue
        other = holder(where)
        if other is not None:
            yield problem(
                ("consumers", name, "front_door"),
                f"{door} is taken by `{other}`: each front door needs an address of its own",
            )
        taken.append((where, f"consumers.{name}.front_door"))
    for name, raw in consumers.items():
        url = raw.get("url") if isinstance(raw, Mapping) else None
        target = _url_address(url)
        other = holder(target) if target is not None else None
        if other is not None:
            yield problem(
                ("consumers", name, "url"),
                f"points at `{other}`, where the broker itself listens: its requests would come "
                "back to the broker (move the service to another port first)",
            )


def _url_address(url: Any) -> tuple[str, int] | None:
    """A consumer URL's host (lower-cased) and port, the scheme's default if none."""
    if not isinstance(url, str) or check_url(url) is not None:
        return None
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (parts.hostname or "").lower(), port


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_url(url: str) -> str | None:
    """None when `url` is a usable upstream base URL, else what is wrong with it."""
    shown = repr(redact_url(url))  # the message may reach a log: no credentials in it
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{shown}: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"{shown}: scheme must be http or https"
    if not parts.hostname:
        return f"{shown}: no host"
    if parts.query or parts.fragment:
        return f"{shown}: no query or fragment allowed in a base URL"
    if port is not None and not 0 < port < 65536:
        return f"{shown}: bad port"
    return None


def _static_devices(value: Any) -> dict[str, int]:
    """`gpu.devices` as {uuid: total_mib}, in order; {} when absent or malformed (the model's
    validation names what is wrong with it)."""
    out: dict[str, int] = {}
    for d in value if isinstance(value, list) else []:
        if (
            isinstance(d, Mapping)
            and isinstance(d.get("uuid"), str)
            and _is_int(d.get("total_mib"))
        ):
            out[d["uuid"]] = d["total_mib"]
    return out


def device_binding_problems(
    binding: Any, uuids: list[str], loc: Loc, problem: Problem
) -> Iterator[ConfigProblem]:
    """A consumer's `devices:` naming an index or UUID the box does not have."""
    for i, ref in enumerate(binding if isinstance(binding, list) else []):
        if _is_int(ref) and not 0 <= ref < len(uuids):
            yield problem((*loc, i), f"no GPU with index {ref} (the box has {len(uuids)})")
        elif isinstance(ref, str) and ref not in uuids:
            yield problem((*loc, i), f"no GPU with UUID {ref!r} (known: {', '.join(uuids)})")
