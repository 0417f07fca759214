"""`mgpumanager init`: look at the box and write a registry that works.

It reads the GPU (NVML, or the simulated GPU with `--gpu-sim URL`), probes the usual ports and
the `--scan` list (`discover.py`), gives each GPU process to the service it belongs to (by
process id where /proc shows it, else by name), and proposes:

- each consumer's cost: **measured** (its GPU processes now) where it is loaded; else what the
  service itself reports; else an estimate marked CHECK (Ollama: size on disk + 20%); else the
  whole card, the safe side, marked CHECK;
- routing for each kind found (speech: mVoice, whisper.cpp, speaches; chat: Ollama, vLLM;
  images: ComfyUI), with the alternatives in a comment;
- coexistence: every pair whose costs fit on the card together with the safety margin;
- priorities: speech 3, chat 2, images 1;
- `command` unload/load through `systemctl stop|start UNIT` for whisper.cpp where a unit runs it;
- front doors as comments, with the port move each one needs.

The file is checked with the registry's own loader before it is written, and the YAML it
writes must read back as exactly the mapping that was checked. An existing file is replaced
only with `--force` (and kept as FILE.bak).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import KINDS, ConfigError, GpuConfig, parse_config
from .discover import (
    CONTEXT_MIB,
    USUAL_PORTS,
    LocalSystem,
    Model,
    ProcSystem,
    Scan,
    Service,
    ServiceKind,
    Target,
    scan_targets,
    targets_to_probe,
)
from .gpu import (
    GpuInitError,
    GpuProcess,
    GpuReading,
    NvmlApi,
    NvmlReader,
    SimReader,
    measured_mib,
)

LISTEN = "127.0.0.1:8770"
OLLAMA_DISK_FACTOR = 1.2  # weights on disk + KV cache and CUDA context, roughly

# What each service serves, and who is preferred for a kind when several could.
SERVES: dict[ServiceKind, tuple[str, ...]] = {
    ServiceKind.MVOICE: ("tts", "stt"),
    ServiceKind.WHISPER: ("stt",),
    ServiceKind.SPEACHES: ("tts", "stt"),
    ServiceKind.OLLAMA: ("llm",),
    ServiceKind.VLLM: ("llm",),
    ServiceKind.COMFYUI: ("image",),
}
PREFERRED: dict[str, tuple[ServiceKind, ...]] = {
    "tts": (ServiceKind.MVOICE, ServiceKind.SPEACHES),
    "stt": (ServiceKind.WHISPER, ServiceKind.MVOICE, ServiceKind.SPEACHES),
    "llm": (ServiceKind.OLLAMA, ServiceKind.VLLM),
    "image": (ServiceKind.COMFYUI,),
}
# Speech above chat above images: a voice assistant waits on speech, a chat user on tokens,
# nobody on an image.
PRIORITY = {"tts": 3, "stt": 3, "llm": 2, "image": 1}
PRIORITY_WORD = {3: "speech", 2: "chat", 1: "images"}
# Substrings of a GPU process's name (its command line; on the simulated GPU, its owner).
PROCESS_NAMES: dict[ServiceKind, tuple[str, ...]] = {
    ServiceKind.OLLAMA: ("ollama",),
    ServiceKind.COMFYUI: ("ComfyUI", "comfyui"),
    ServiceKind.SPEACHES: ("speaches",),
    ServiceKind.VLLM: ("vllm",),
    ServiceKind.WHISPER: ("whisper-server",),
    ServiceKind.MVOICE: ("mvoice", "mVoice"),
}
ORDER = (
    ServiceKind.MVOICE,
    ServiceKind.WHISPER,
    ServiceKind.SPEACHES,
    ServiceKind.OLLAMA,
    ServiceKind.VLLM,
    ServiceKind.COMFYUI,
)


class InitError(Exception):
    """Init cannot go on; the message says what to do. `status` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- the GPU --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    reading: GpuReading
    sim_url: str | None = None  # the simulated GPU's URL; None: NVML

    @property
    def backend(self) -> str:
        return "sim" if self.sim_url is not None else "nvml"


async def read_gpu(
    sim_url: str | None,
    index: int = 0,
    *,
    nvml: NvmlApi | None = None,
    proc_root: Path = Path("/proc"),
) -> Gpu:
    """One reading of the card, or InitError saying why there is none."""
    reader: SimReader | NvmlReader = (
        SimReader(sim_url) if sim_url else NvmlReader(index, nvml=nvml, proc_root=proc_root)
    )
    try:
        await reader.start()
        reading = await reader.read()
    except GpuInitError as exc:
        hint = (
            "is the simulated GPU running?"
            if sim_url
            else "init needs NVIDIA's driver to read the card; without one, try it against "
            "the simulated GPU of `mgpumanager demo` with --gpu-sim http://127.0.0.1:8799"
        )
        raise InitError(f"cannot read the GPU: {exc}; {hint}") from exc
    finally:
        await reader.aclose()
    if not reading.ok:
        raise InitError(f"cannot read the GPU: {reading.error}")
    return Gpu(reading, sim_url)


# -- sizes ----------------------------------------------------------------------------------

How = Literal["measured", "reported", "estimate", "unknown"]


@dataclass(frozen=True)
class Size:
    mib: int
    how: How
    note: str

    @property
    def check(self) -> bool:
        return self.how in ("estimate", "unknown")


@dataclass
class Consumer:
    """One proposed consumer: the service, its name and everything init decided for it."""

    name: str
    service: Service
    processes: list[GpuProcess] = field(default_factory=list)
    measured_mib: int | None = None
    cost: Size = Size(0, "unknown", "")
    models: list[tuple[Model, Size | None]] = field(default_factory=list)
    gpu_processes: list[str] = field(default_factory=list)
    patterns_seen: bool = True  # gpu_processes matched a process now (else: the usual names)
    coexist: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    front_door: FrontDoor | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        return SERVES[self.service.kind]

    @property
    def priority(self) -> int:
        return max(PRIORITY[k] for k in self.kinds)


def _ollama_model_size(model: Model, only_loaded: bool, measured: int | None) -> Size | None:
    if model.loaded and only_loaded and measured is not None:
        return Size(measured, "measured", "measured: loaded now, alone")
    if model.loaded and model.vram_mib is not None:
        return Size(model.vram_mib, "reported", "loaded; Ollama's own figure (/api/ps)")
    if model.disk_mib is not None:
        mib = math.ceil(model.disk_mib * OLLAMA_DISK_FACTOR)
        return Size(mib, "estimate", f"CHECK: estimate, {model.disk_mib} MiB on disk + 20%")
    return None


def size_consumer(c: Consumer, usable_mib: int) -> None:
    """Set `c.cost` and `c.models` from what was measured and what the service said."""
    svc, measured = c.service, c.measured_mib
    whole = Size(
        usable_mib,
        "unknown",
        "CHECK: not loaded now, so not measured: the whole card (the safe side); lower it to "
        "what it holds after a job (vram_measured_mib in /v1/status)",
    )
    if svc.kind is ServiceKind.OLLAMA:
        loaded = [m for m in svc.models if m.loaded]
        sizes = [(m, _ollama_model_size(m, len(loaded) == 1, measured)) for m in svc.models]
        c.models = sizes
        known = [s for _, s in sizes if s is not None]
        if known:
            largest = max(known, key=lambda s: s.mib)
            note = f"its largest model ({largest.note.removeprefix('CHECK: ')})"
            c.cost = Size(largest.mib, largest.how, ("CHECK: " if largest.check else "") + note)
        elif measured is not None and svc.loaded:
            c.cost = Size(measured, "measured", f"measured: {measured} MiB on the GPU now")
        else:
            c.cost = whole
        return
    if svc.kind in (ServiceKind.SPEACHES, ServiceKind.VLLM):
        # One model loaded: the measured figure is its size (its runtime's context included).
        # Several: their shares of it are not known.
        loaded = [m for m in svc.models if m.loaded]
        alone = len(loaded) == 1 and measured is not None
        c.models = [
            (m, Size(measured, "measured", "measured: loaded now, alone"))
            if alone and m.loaded and measured is not None
            else (m, None)
            for m in svc.models
        ]
    resident = svc.loaded is True or (
        svc.loaded is None and measured is not None and measured > CONTEXT_MIB
    )
    if resident and measured is not None:
        c.cost = Size(measured, "measured", f"measured: {measured} MiB on the GPU now")
    elif svc.kind is ServiceKind.COMFYUI and svc.loaded and svc.held_mib is not None:
        c.cost = Size(svc.held_mib, "reported", "what its torch allocator holds (/system_stats)")
    else:
        c.cost = whole


# -- GPU processes --------------------------------------------------------------------------

_INTERPRETER = re.compile(r"(.*/)?(python[\d.]*|node|bash|sh|uv|env)$")


def process_pattern(name: str) -> str | None:
    """A distinctive piece of a command line: the script or module it runs, else its program
    (`/usr/bin/python3 /opt/ComfyUI/main.py --port 8188` -> `/opt/ComfyUI/main.py`)."""
    words = name.split()
    if not words or name.startswith("pid:"):
        return None
    rest = iter(words)
    for word in rest:
        if word == "-m":
            return next(rest, None)
        if word.startswith("-") or _INTERPRETER.fullmatch(word):
            continue
        return word
    return words[0]


def attribute(
    consumers: Sequence[Consumer], reading: GpuReading, system: LocalSystem
) -> list[GpuProcess]:
    """Give each GPU process to the consumer it belongs to; return those nobody claims.

    By process id first (the process listening on the service's port, or one of its
    children: Ollama's runners are), then by name (what the simulated GPU and containers
    leave to go by). A name two services of one kind would share is not guessed."""
    families = {
        i: {c.service.pid} | system.descendants(c.service.pid)
        for i, c in enumerate(consumers)
        if c.service.pid is not None
    }
    unclaimed = []
    for proc in reading.processes:
        # The process listening on the port first, then its children; several services in
        # one process (or one family) are told apart by name, as is everything else.
        exact = [i for i, c in enumerate(consumers) if proc.pid and proc.pid == c.service.pid]
        family = [i for i, pids in families.items() if proc.pid and proc.pid in pids]
        by_pid = exact or family
        if len(by_pid) == 1:
            consumers[by_pid[0]].processes.append(proc)
            continue
        pool = by_pid or range(len(consumers))
        by_name = [
            i for i in pool if any(p in proc.name for p in PROCESS_NAMES[consumers[i].service.kind])
        ]
        if len(by_name) == 1:
            consumers[by_name[0]].processes.append(proc)
        else:
            unclaimed.append(proc)
    for c in consumers:
        patterns: list[str] = []
        for proc in c.processes:
            known = [p for p in PROCESS_NAMES[c.service.kind] if p in proc.name]
            pattern = known[0] if known else process_pattern(proc.name)
            if pattern is not None and pattern not in patterns:
                patterns.append(pattern)
        alone = sum(o.service.kind is c.service.kind for o in consumers) == 1
        if not patterns and alone:
            # Nothing of it on the GPU now: its usual names, so that the broker can measure it
            # once it loads (a name two services of one kind share would count both).
            patterns = list(PROCESS_NAMES[c.service.kind])
            c.patterns_seen = False
        c.gpu_processes = patterns
        held = [p.used_mib for p in c.processes if p.used_mib is not None]
        c.measured_mib = sum(held) if held else None
        if patterns and measured_mib(reading, patterns) != c.measured_mib:
            c.checks.append(f"gpu_processes {patterns} also match processes of others: narrow them")
    return unclaimed


# -- front doors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontDoor:
    listen: str  # where the broker would answer: the service's address now
    moved_url: str  # where the service goes
    how: str  # the port move, in the service's own terms


def _move(svc: Service, host: str, port: int) -> str:
    unit = svc.unit.name if svc.unit is not None and not svc.unit.user else None
    if svc.kind is ServiceKind.OLLAMA:
        env = f"OLLAMA_HOST={host}:{port}"
        if unit:
            return (
                f'sudo systemctl edit {unit}: [Service] Environment="{env}", then '
                f"sudo systemctl restart {unit}"
            )
        return f"start it with {env}"
    flag = {
        ServiceKind.COMFYUI: f"--port {port}",
        ServiceKind.WHISPER: f"--port {port}",
        ServiceKind.VLLM: f"--port {port}",
        ServiceKind.SPEACHES: f"--port {port} on its uvicorn command line (or UVICORN_PORT)",
        ServiceKind.MVOICE: f"its port setting to {port}",
    }[svc.kind]
    if unit:
        return f"{flag} (sudo systemctl edit --full {unit}, then sudo systemctl restart {unit})"
    return f"{flag} where it is started"


def propose_front_doors(consumers: Sequence[Consumer], taken: set[int]) -> None:
    used = set(taken) | {c.service.target.port for c in consumers}
    for c in consumers:
        t = c.service.target
        port = t.port + 1
        while port in used or port > 65535:
            port = port + 1 if port < 65535 else 1024
        used.add(port)
        moved = Target(t.host, port)
        c.front_door = FrontDoor(t.address, moved.url, _move(c.service, t.host, port))


# -- the plan -------------------------------------------------------------------------------


@dataclass
class Plan:
    gpu: Gpu
    scan: Scan
    margin_mib: int
    consumers: list[Consumer]
    routing: dict[str, str]
    alternatives: dict[str, list[str]]
    audio_proxy: str | None
    unclaimed: list[GpuProcess]
    checks: list[str]

    @property
    def usable_mib(self) -> int:
        return self.gpu.reading.total_mib - self.margin_mib


def _names(services: Sequence[Service]) -> list[str]:
    counts: dict[ServiceKind, int] = {}
    for s in services:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return [
        s.kind.value if counts[s.kind] == 1 else f"{s.kind.value}-{s.target.port}" for s in services
    ]


def make_plan(
    scan: Scan, gpu: Gpu, system: LocalSystem, margin_mib: int = GpuConfig().safety_margin_mib
) -> Plan:
    services = sorted(
        (s for s in scan.services if s.kind in SERVES),
        key=lambda s: (ORDER.index(s.kind), s.target.host, s.target.port),
    )
    consumers = [Consumer(n, s) for n, s in zip(_names(services), services, strict=True)]
    unclaimed = attribute(consumers, gpu.reading, system)
    usable = gpu.reading.total_mib - margin_mib
    for c in consumers:
        size_consumer(c, usable)
    for a in consumers:
        a.coexist = [b.name for b in consumers if b is not a and a.cost.mib + b.cost.mib <= usable]
    routing: dict[str, str] = {}
    alternatives: dict[str, list[str]] = {}
    for kind in KINDS:
        able = [c for p in PREFERRED[kind] for c in consumers if c.service.kind is p]
        if able:
            routing[kind] = able[0].name
            alternatives[kind] = [c.name for c in able[1:]]
    mvoices = [c for c in consumers if c.service.kind is ServiceKind.MVOICE]
    seen = {s.target.port for s in scan.services} | {u.target.port for u in scan.unidentified}
    seen |= {t.port for t in scan.silent} | system.listening_ports()
    propose_front_doors(consumers, seen | {int(LISTEN.rsplit(":", 1)[1])})
    checks: list[str] = []
    for c in consumers:
        svc = c.service
        guessed = [m.name for m, s in c.models if s is not None and s.check]
        if c.cost.check and not guessed:
            checks.append(f"{c.name}: vram_resident_mib {c.cost.mib} is a guess ({c.cost.note})")
        if guessed:
            checks.append(
                f"{c.name}: the sizes of {', '.join(guessed[:5])}"
                + (f" and {len(guessed) - 5} more" if len(guessed) > 5 else "")
                + " are estimates from their size on disk (not loaded now); vram_resident_mib "
                f"{c.cost.mib} follows the largest"
            )
        if not c.patterns_seen:
            checks.append(
                f"{c.name}: none of its processes is on the GPU now: gpu_processes "
                f"{c.gpu_processes} are its usual names; check they match their command lines"
            )
        if not svc.healthy:
            checks.append(f"{c.name}: not healthy now ({svc.health_detail})")
        if svc.kind is ServiceKind.WHISPER and (svc.unit is None or svc.unit.user):
            where = (
                f"it runs in the user unit {svc.unit.name}, which the broker's user cannot manage"
                if svc.unit is not None
                else "no systemd unit runs it"
            )
            checks.append(
                f"{c.name}: {where}: give it a system unit and unload/load commands "
                "(systemctl stop|start UNIT), or it is never evicted"
            )
        if svc.kind is ServiceKind.VLLM and not svc.sleep_mode:
            checks.append(
                f"{c.name}: vLLM without sleep mode (/is_sleeping does not answer): pinned, "
                "never evicted; start it with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 "
                "and drop `pinned`"
            )
        if svc.pid is None and svc.target.local:
            checks.append(
                f"{c.name}: the process on port {svc.target.port} is not visible "
                "(another user's? run init as root to see it and its unit)"
            )
        checks.extend(f"{c.name}: {n}" for n in svc.notes)
        checks.extend(f"{c.name}: {n}" for n in c.checks)
    for kind, others in alternatives.items():
        if others:
            checks.append(
                f"routing.{kind}: {routing[kind]} chosen; {', '.join(others)} could serve it too"
            )
    for proc in unclaimed:
        used = "?" if proc.used_mib is None else f"{proc.used_mib} MiB"
        checks.append(
            f"GPU process {_clean(proc.name, 60)} (pid {proc.pid}, {used}) belongs to no "
            "service found: the broker will count it as taken"
        )
    for u in scan.unidentified:
        checks.append(f"{u.target.address}: not identified ({u.detail})")
    for s in scan.services:
        if s.kind is ServiceKind.BROKER:
            checks.append(
                f"{s.target.address}: an mgpumanager broker already answers there (left out)"
            )
    return Plan(
        gpu=gpu,
        scan=scan,
        margin_mib=margin_mib,
        consumers=consumers,
        routing=routing,
        alternatives=alternatives,
        audio_proxy=mvoices[0].name if mvoices else None,
        unclaimed=unclaimed,
        checks=checks,
    )


# -- writing the registry -------------------------------------------------------------------


def _clean(text: str, limit: int = 200) -> str:
    """Text from a service or a process, fit for a comment: one line, printable, bounded."""
    out = "".join(c if c.isprintable() else "?" for c in text.replace("\n", " "))
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _plain_ok(text: str, probe: str) -> bool:
    if not text or text != text.strip() or re.search(r"[#,\[\]{}&*!|>'\"%@`]|: |^[-?:]", text):
        return False
    try:
        return bool(yaml.safe_load(probe) == ({"k": text} if probe.startswith("k:") else [text]))
    except yaml.YAMLError:
        return False


def _scalar(value: Any, *, flow: bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    probe = f"[{text}]" if flow else f"k: {text}"
    return text if _plain_ok(text, probe) else quoted(text)


def quoted(text: str) -> str:
    """A YAML double-quoted scalar in plain ASCII: everything else escaped. (JSON's escapes
    are not enough: YAML reads a surrogate pair as two characters.)"""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def flow(value: Any) -> str:
    """`value` as one line of YAML flow style (keys are init's own identifiers)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    return _scalar(value, flow=True)


class _Doc:
    """Block-style YAML lines with comments, and the mapping they must read back as."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def comment(self, text: str, indent: int = 0) -> None:
        pad = " " * indent
        for line in textwrap.wrap(
            _clean(text, 10_000), width=98 - indent, break_on_hyphens=False
        ) or [""]:
            self.lines.append(f"{pad}# {line}".rstrip())

    def blank(self) -> None:
        self.lines.append("")

    def put(self, key: str, value: Any, indent: int = 0, note: str = "") -> None:
        pad = " " * indent
        shown = flow(value) if isinstance(value, dict | list) else _scalar(value, flow=False)
        line = f"{pad}{key}: {shown}"
        if note:
            line += f"  # {_clean(note)}"
        self.lines.append(line)

    def open(self, key: str, indent: int = 0, note: str = "") -> None:
        self.lines.append(f"{' ' * indent}{key}:" + (f"  # {_clean(note)}" if note else ""))

    def item(self, value: Any, indent: int, note: str = "") -> None:
        line = f"{' ' * indent}- {flow(value)}"
        self.lines.append(line + (f"  # {_clean(note)}" if note else ""))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _consumer_data(c: Consumer) -> dict[str, Any]:
    svc = c.service
    kind = svc.kind
    data: dict[str, Any] = {
        "type": {
            ServiceKind.MVOICE: "generic",
            ServiceKind.WHISPER: "command",
        }.get(kind, kind.value),
        "url": svc.target.url,
        "health": {
            "path": {ServiceKind.OLLAMA: "/api/version", ServiceKind.COMFYUI: "/system_stats"}.get(
                kind, "/health"
            )
        },
    }
    if kind is ServiceKind.MVOICE:
        data["paths"] = {"tts": {"path": "/api/synthesize"}, "stt": {"path": "/api/transcribe"}}
    if kind is ServiceKind.WHISPER:
        data["paths"] = {"stt": {"path": "/inference"}}
    data["vram_resident_mib"] = c.cost.mib
    if c.models:
        data["models"] = [
            {"name": m.name} if s is None else {"name": m.name, "vram_mib": s.mib}
            for m, s in c.models
        ]
    if kind is ServiceKind.MVOICE:
        data["unload"] = {"path": "/api/admin/unload", "body": {}}
        data["load"] = {"path": "/api/admin/load"}
    if kind is ServiceKind.WHISPER and svc.unit is not None and not svc.unit.user:
        data["unload"] = {"command": ["systemctl", "--no-ask-password", "stop", svc.unit.name]}
        data["load"] = {"command": ["systemctl", "--no-ask-password", "start", svc.unit.name]}
    if c.coexist:
        data["can_coexist_with"] = list(c.coexist)
    data["priority"] = c.priority
    if kind is ServiceKind.VLLM and not svc.sleep_mode:
        data["pinned"] = True
    if c.gpu_processes:
        data["gpu_processes"] = list(c.gpu_processes)
    return data


def _describe_service(c: Consumer) -> str:
    svc = c.service
    what = svc.kind.label + (f" {svc.version}" if svc.version else "")
    parts = [f"{what} at {svc.target.address}", "healthy" if svc.healthy else "NOT healthy"]
    if svc.unit is not None:
        parts.append(f"systemd {'user ' if svc.unit.user else ''}unit {svc.unit.name}")
    if svc.pid is not None:
        parts.append(f"pid {svc.pid}")
    state = {True: "loaded now", False: "not loaded now", None: "residency not told"}
    parts.append(state[svc.loaded])
    return "; ".join(parts)


def render(plan: Plan, written_at: dt.datetime | None = None) -> tuple[str, dict[str, Any]]:
    """The annotated registry, and the mapping it must read back as."""
    when = (written_at or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    r = plan.gpu.reading
    doc = _Doc()
    data: dict[str, Any] = {}
    doc.comment(f"Written by `mgpumanager init` on {when} from what this box showed.")
    doc.comment(
        f"GPU: {r.device}, {r.total_mib} MiB, {r.used_mib} MiB in use when read. Found: "
        + (", ".join(f"{c.name} ({c.service.kind.label})" for c in plan.consumers) or "nothing")
        + "."
    )
    doc.comment(
        "Sizes say where they come from: measured (the GPU's per-process figures now), "
        "reported (the service's own figure), or CHECK (a guess: read it before serving). "
        "After editing: mgpumanager check-config FILE."
    )
    doc.blank()
    data["listen"] = LISTEN
    doc.put("listen", LISTEN, note="the broker's own address")
    gpu: dict[str, Any] = {"backend": plan.gpu.backend}
    if plan.gpu.sim_url is not None:
        gpu["sim_url"] = plan.gpu.sim_url
    gpu["safety_margin_mib"] = plan.margin_mib
    data["gpu"] = gpu
    doc.open("gpu")
    doc.put("backend", gpu["backend"], 2, note=f"{_clean(r.device, 60)}, {r.total_mib} MiB")
    if "sim_url" in gpu:
        doc.put("sim_url", gpu["sim_url"], 2)
    doc.put("safety_margin_mib", plan.margin_mib, 2, note="always kept free")
    doc.blank()
    if plan.routing:
        data["routing"] = dict(plan.routing)
        doc.comment("Each kind found goes to one consumer; a kind left out answers no_consumer.")
        doc.open("routing")
        for kind, name in plan.routing.items():
            others = plan.alternatives.get(kind)
            doc.put(kind, name, 2, note=f"also able: {', '.join(others)}" if others else "")
    if plan.audio_proxy is not None:
        data["audio_proxy"] = plan.audio_proxy
        doc.put("audio_proxy", plan.audio_proxy, note="its generated audio under /audio/*")
    doc.blank()
    doc.comment(
        "Priorities: speech 3, chat 2, images 1. can_coexist_with: every pair whose sizes fit "
        f"on the card together, {plan.usable_mib} MiB with the margin."
    )
    data["consumers"] = {}
    if not plan.consumers:
        doc.put("consumers", {})
    else:
        doc.open("consumers")
    for c in plan.consumers:
        cdata = _consumer_data(c)
        data["consumers"][c.name] = cdata
        _write_consumer(doc, c, cdata, plan)
    return doc.text(), data


def _write_consumer(doc: _Doc, c: Consumer, cdata: dict[str, Any], plan: Plan) -> None:
    doc.open(c.name, 2)
    doc.comment(_describe_service(c), 4)
    fd = c.front_door
    if fd is not None:
        doc.comment(
            "Suggested front door: the broker answers on this service's address, so its "
            f"clients go through the broker unchanged. First move {c.service.kind.label} to "
            f"{fd.moved_url.removeprefix('http://')} ({fd.how}), then set url: "
            f"{fd.moved_url} and:",
            4,
        )
        doc.lines.append(f"    # front_door: {fd.listen}")
    notes = {
        "vram_resident_mib": c.cost.note,
        "priority": PRIORITY_WORD[c.priority],
        "pinned": "CHECK: no sleep mode, so nothing can unload it",
        "can_coexist_with": "fit together with it",
        "gpu_processes": "" if c.patterns_seen else "CHECK: usual names, not seen on the GPU now",
    }
    if c.service.kind is ServiceKind.WHISPER and "unload" in cdata:
        notes["unload"] = "whisper-server has no unload call: stopping its unit frees the card"
    for key, value in cdata.items():
        if key == "models":
            doc.open("models", 4)
            for (_, s), entry in zip(c.models, value, strict=True):
                note = s.note if s is not None else "size not known (not loaded alone)"
                doc.item(entry, 6, note=note)
            continue
        if key == "paths":
            doc.open("paths", 4)
            for kind, call in value.items():
                doc.put(kind, call, 6)
            continue
        doc.put(key, value, 4, note=notes.get(key, ""))


def registry_text(plan: Plan, written_at: dt.datetime | None = None) -> str:
    """The registry, checked: it reads back as the mapping init meant, and the registry's own
    loader accepts it. Anything else is a bug here, never a file written."""
    text, data = render(plan, written_at)
    if yaml.safe_load(text) != data:
        raise InitError("internal error: the written YAML does not read back as planned")
    try:
        parse_config(text, "<mgpumanager init>")
    except ConfigError as exc:
        raise InitError(f"internal error: the registry init wrote does not pass: {exc}") from exc
    return text


# -- the summary ----------------------------------------------------------------------------


def summary(plan: Plan, out: Path) -> str:
    r = plan.gpu.reading
    lines = [
        f"mgpumanager init: wrote {out} ({len(plan.consumers)} consumers; check-config: OK)",
        "",
        f"GPU  {r.device}: {r.total_mib} MiB, {r.used_mib} MiB in use ({plan.gpu.backend})",
        "",
        "Found:",
    ]
    for c in plan.consumers:
        svc = c.service
        health = "healthy" if svc.healthy else "NOT healthy"
        lines.append(
            f"  {c.name:<12} {svc.kind.label:<18} {svc.target.url:<24} {health:<11} "
            f"{c.cost.mib} MiB {c.cost.how}"
        )
    for s in plan.scan.services:
        if s.kind is ServiceKind.BROKER:
            lines.append(f"  {'-':<12} {s.kind.label:<18} {s.target.url:<24} (left out)")
    for u in plan.scan.unidentified:
        lines.append(f"  {'?':<12} {'not identified':<18} {u.target.url:<24} {u.detail}")
    for t in plan.scan.silent:
        lines.append(f"  {'-':<12} {'nothing answers':<18} {t.url}")
    lines += ["", "Proposed:"]
    routes = ", ".join(f"{k} -> {v}" for k, v in plan.routing.items())
    lines.append(f"  routing      {routes or 'none'}")
    pairs = sorted({tuple(sorted((c.name, o))) for c in plan.consumers for o in c.coexist})
    costs = {c.name: c.cost.mib for c in plan.consumers}
    shown = ", ".join(f"{a} + {b} ({costs[a] + costs[b]} MiB)" for a, b in pairs)
    lines.append(f"  coexistence  {shown or 'none (no two fit together)'}")
    by_priority: dict[int, list[str]] = {}
    for c in plan.consumers:
        by_priority.setdefault(c.priority, []).append(c.name)
    lines.append(
        "  priorities   "
        + ", ".join(
            f"{PRIORITY_WORD[p]} {p} ({', '.join(names)})"
            for p, names in sorted(by_priority.items(), reverse=True)
        )
    )
    lines.append("  front doors  (comments in the file; each needs the service moved first)")
    for c in plan.consumers:
        if c.front_door is not None:
            fd = c.front_door
            lines.append(
                f"    {c.name}: broker on {fd.listen}, {c.service.kind.label} moves to "
                f"{fd.moved_url.removeprefix('http://')}: {fd.how}"
            )
    lines += ["", "Check by hand:"]
    lines += [f"  - {_clean(line, 400)}" for line in plan.checks] or ["  nothing"]
    lines += [
        "",
        f"Next: read {out}, then `mgpumanager check-config {out}` after any edit, and",
        "`mgpumanager serve --config FILE` (or `make deploy`).",
    ]
    return "\n".join(lines) + "\n"


# -- the command ----------------------------------------------------------------------------


def refuse_overwrite(path: Path, force: bool) -> bool:
    """Whether `path` exists; InitError (exit status 2) when it does and `force` is not set."""
    exists = path.exists() or path.is_symlink()
    if exists and not force:
        raise InitError(f"{path} exists: pass --force to replace it (it is kept as {path}.bak)", 2)
    return exists


def write_registry(path: Path, text: str, *, force: bool) -> Path | None:
    """Write `text` to `path` atomically; an existing file is kept as `path.bak` (and only
    with `force`). Returns the backup's path, if one was made."""
    exists = refuse_overwrite(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.init-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    backup = None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if exists:
            st = path.stat()
            try:  # keep who may read it (the registry under /etc is root:mgpumanager 0640)
                os.chown(tmp, st.st_uid, st.st_gid)
                os.chmod(tmp, st.st_mode & 0o777)
            except OSError:
                pass
            backup = path.with_name(path.name + ".bak")
            os.replace(path, backup)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return backup


async def run_init(
    *,
    scan: Sequence[Target] = (),
    out: Path,
    force: bool = False,
    gpu_sim: str | None = None,
    usual_ports: Sequence[int] = USUAL_PORTS,
    system: LocalSystem | None = None,
    written_at: dt.datetime | None = None,
    nvml: NvmlApi | None = None,
    proc_root: Path = Path("/proc"),
) -> tuple[Plan, str]:
    """Everything `mgpumanager init` does but printing: returns the plan and the summary."""
    await asyncio.to_thread(refuse_overwrite, out, force)  # before any probing
    gpu = await read_gpu(gpu_sim, nvml=nvml, proc_root=proc_root)
    system = system if system is not None else ProcSystem(proc_root)
    found = await scan_targets(targets_to_probe(scan, usual_ports), system=system)
    plan = make_plan(found, gpu, system)
    if not plan.consumers:
        probed = ", ".join(t.address for t in targets_to_probe(scan, usual_ports))
        extra = "".join(f"\n  {line}" for line in plan.checks)
        raise InitError(
            f"found no GPU service on {probed}: nothing written. Name the ports they use with "
            f"--scan HOST:PORT{extra}"
        )
    text = registry_text(plan, written_at)
    backup = await asyncio.to_thread(write_registry, out, text, force=force)
    report = summary(plan, out)
    if backup is not None:
        report += f"The previous {out} is kept as {backup}.\n"
    return plan, report


def main_init(args: Any) -> int:
    """The CLI's `init`: argparse's namespace in, an exit status out."""
    try:
        _, report = asyncio.run(
            run_init(
                scan=args.scan,
                out=args.out,
                force=args.force,
                gpu_sim=args.gpu_sim,
                usual_ports=() if args.no_usual_ports else USUAL_PORTS,
            )
        )
    except InitError as exc:
        print(f"mgpumanager init: {exc}", file=sys.stderr)
        return exc.status
    print(report, end="")
    return 0


__all__ = [
    "Consumer",
    "FrontDoor",
    "Gpu",
    "InitError",
    "Plan",
    "Size",
    "attribute",
    "flow",
    "main_init",
    "make_plan",
    "process_pattern",
    "read_gpu",
    "registry_text",
    "render",
    "run_init",
    "size_consumer",
    "summary",
    "write_registry",
]
