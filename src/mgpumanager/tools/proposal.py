"""What `mgpumanager init` proposes for a box, from what `discover` found and one GPU reading.

- each GPU process goes to the service it belongs to: by process id (the process listening on
  the service's port, or one of its children: Ollama's runners are), else by name;
- each consumer's cost: **measured** (its GPU processes now) where it is loaded; else what the
  service itself reports; else an estimate marked CHECK (an Ollama model on disk + 20%); else
  the whole card, the safe side, marked CHECK;
- routing for each kind found (speech: mVoice, whisper.cpp, speaches; chat: Ollama, vLLM;
  images: ComfyUI), with the others able named;
- coexistence: every pair whose costs fit on the card together with the safety margin;
- priorities: speech 3, chat 2, images 1;
- a front door for each service: the port it would move to, and how.

`make_plan` is pure given the scan, the reading and the `LocalSystem`; `init.py` writes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from mgpumanager.registry import KINDS, GpuConfig
from mgpumanager.tools.discover import (
    CONTEXT_MIB,
    Gpu,
    InitError,
    Model,
    Scan,
    Service,
    ServiceKind,
    Target,
    one_line,
    read_gpu,
)
from mgpumanager.tools.frontends import FrontEnd
from mgpumanager.tools.procfs import LocalSystem
from mgpumanager.upstreams.gpu import GpuProcess, GpuReading, measured_mib

if TYPE_CHECKING:
    from mgpumanager.tools.containers import Containers

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
    if svc.off_card is not None:
        # Its own memory figures are the host's: none of them is taken as the card's.
        where = svc.off_card.upper()
        c.cost = Size(
            0,
            "reported",
            f"runs on {where}: holds no card memory; once it runs on the GPU, run init again",
        )
        return
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
        # A service on another machine has no process on this card.
        pool = by_pid or [i for i, c in enumerate(consumers) if c.service.target.local]
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
        if not patterns and alone and c.service.target.local:
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
    # Web front ends found (their origins are proposed for auth.allowed_origins).
    front_ends: list[FrontEnd] = field(default_factory=list)
    # The running Docker containers (tools/containers.py); None: not looked for.
    containers: Containers | None = None

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


def _consumer_checks(c: Consumer) -> list[str]:
    """What to check by hand about one consumer."""
    svc = c.service
    checks: list[str] = []
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
    if not svc.target.local:
        checks.append(
            f"{c.name}: it runs on another machine, whose GPU init did not read; a broker "
            "manages the card of the box it runs on"
        )
    elif svc.pid is None:
        checks.append(
            f"{c.name}: the process on port {svc.target.port} is not visible "
            "(another user's? run init as root to see it and its unit)"
        )
    checks.extend(f"{c.name}: {n}" for n in svc.notes)
    checks.extend(f"{c.name}: {n}" for n in c.checks)
    return checks


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
    checks = [line for c in consumers for line in _consumer_checks(c)]
    for kind, others in alternatives.items():
        if others:
            checks.append(
                f"routing.{kind}: {routing[kind]} chosen; {', '.join(others)} could serve it too"
            )
    for proc in unclaimed:
        used = "?" if proc.used_mib is None else f"{proc.used_mib} MiB"
        checks.append(
            f"GPU process {one_line(proc.name, 60)} (pid {proc.pid}, {used}) belongs to no "
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


__all__ = [
    "LISTEN",
    "PRIORITY_WORD",
    "Consumer",
    "FrontDoor",
    "Gpu",
    "InitError",
    "Plan",
    "Size",
    "attribute",
    "make_plan",
    "one_line",
    "process_pattern",
    "read_gpu",
    "size_consumer",
]
