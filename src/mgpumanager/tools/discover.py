"""What `mgpumanager init` sees on a box: which services answer where, what they are (told by
their answers, never by their port), their models, and the process and systemd unit behind
each port.

Every probe is a GET except one: a whisper.cpp server is recognised, when nothing else told,
by `POST /inference` without a file, which it refuses without touching its model. Nothing here
loads, unloads or runs anything on a service.

    scan = await scan_targets(targets, system=ProcSystem())
    scan.services        # identified, with models, health, pid and unit
    scan.unidentified    # answered, but like none of the known services: reported, not guessed
    scan.silent          # --scan targets where nothing accepts a connection

The pid and the unit of each local service come from a `LocalSystem` (`procfs.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pynvml

from mgpumanager.registry import is_loopback, split_listen
from mgpumanager.relay.proxy import UPSTREAM_FAILURES
from mgpumanager.tools.identify import (
    PROBE_PATHS,
    Answer,
    Answers,
    ServiceKind,
    describe_unknown,
    identify,
    is_whisper_refusal,
    list_of,
    ok_json,
    openai_models,
    speaches_loaded,
    status_of,
)
from mgpumanager.tools.procfs import LocalSystem, Unit
from mgpumanager.upstreams.gpu import GpuInitError, GpuReading, NvmlApi, NvmlReader, SimReader
from mgpumanager.upstreams.nvml_box import NvmlBoxReader

MIB = 1024 * 1024
PROBE_TIMEOUT_S = 3.0
MAX_ANSWER_BYTES = 4 * MIB  # /api/tags of a box with many models is large; a web page too
# Below this, memory a service holds is its CUDA context and allocator cache, not a model.
CONTEXT_MIB = 512


# Where each service listens unless told otherwise (speaches and vLLM share 8000; mVoice's is
# the one its own documentation uses).
USUAL_PORTS: tuple[int, ...] = (11434, 8188, 8000, 8080, 8765)


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    scanned: bool = False  # named with --scan (silence is then worth reporting)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def local(self) -> bool:
        return self.host in ("0.0.0.0", "::") or is_loopback(self.host)


def parse_target(text: str) -> Target:
    """`HOST:PORT`, `[V6]:PORT` or a bare `PORT` (on 127.0.0.1); ValueError otherwise."""
    text = text.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    host, port = split_listen(text)
    if not host or not 0 < port < 65536:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:11434 (got {text!r})")
    return Target(host, port, scanned=True)


def targets_to_probe(scan: Sequence[Target], usual: Sequence[int] = USUAL_PORTS) -> list[Target]:
    """The usual ports on 127.0.0.1, then the --scan list, each address once."""
    out: dict[tuple[str, int], Target] = {}
    for t in scan:
        out.setdefault((t.host, t.port), t)
    for port in usual:
        out.setdefault(("127.0.0.1", port), Target("127.0.0.1", port))
    return sorted(out.values(), key=lambda t: (not t.scanned, t.host, t.port))


# -- what init records about a service ------------------------------------------------------


@dataclass(frozen=True)
class Model:
    name: str
    loaded: bool
    disk_mib: int | None = None  # Ollama /api/tags: its size on disk
    vram_mib: int | None = None  # Ollama /api/ps size_vram: the service's own estimate


@dataclass(frozen=True)
class Service:
    target: Target
    kind: ServiceKind
    version: str | None = None
    healthy: bool = False
    health_detail: str = ""
    models: tuple[Model, ...] = ()
    # What the service says of its residency: True/False, or None where it cannot tell.
    loaded: bool | None = None
    held_mib: int | None = None  # memory it says it holds (ComfyUI's torch allocator)
    sleep_mode: bool | None = None  # vLLM: /is_sleeping answers
    pid: int | None = None
    unit: Unit | None = None
    notes: tuple[str, ...] = ()
    # The device it says it computes on where that is no GPU ("cpu", "mps"): it holds no card
    # memory, and its memory figures are the host's, not the card's.
    off_card: str | None = None
    container: str | None = None  # the Docker container it runs in (tools/containers.py)


# Devices a service may report that are not an NVIDIA card.
OFF_CARD_DEVICES = frozenset({"cpu", "mps"})


@dataclass(frozen=True)
class Unidentified:
    target: Target
    detail: str


@dataclass
class Scan:
    services: list[Service] = field(default_factory=list)
    unidentified: list[Unidentified] = field(default_factory=list)
    silent: list[Target] = field(default_factory=list)  # --scan targets nobody answers on


def _health(kind: ServiceKind, a: Answers) -> tuple[bool, str]:
    path = {
        ServiceKind.OLLAMA: "/api/version",
        ServiceKind.COMFYUI: "/system_stats",
        ServiceKind.BROKER: "/healthz",
    }.get(kind, "/health")
    status = status_of(a, path)
    if status is None:
        return False, f"GET {path}: no answer"
    if 200 <= status < 300:
        return True, f"GET {path}: {status}"
    if kind is ServiceKind.WHISPER and status == 503:
        return False, f"GET {path}: 503 (loading its model)"
    return False, f"GET {path}: {status}"


def _ollama_models(a: Answers) -> tuple[Model, ...]:
    loaded: dict[str, int | None] = {}
    for m in list_of(ok_json(a, "/api/ps"), "models") or []:
        name = m.get("name") or m.get("model") if isinstance(m, dict) else None
        if isinstance(name, str) and name:
            size = m.get("size_vram")
            loaded[name] = -(-size // MIB) if isinstance(size, int) and size > 0 else None
    out: dict[str, Model] = {}
    for m in list_of(ok_json(a, "/api/tags"), "models") or []:
        name = m.get("name") or m.get("model") if isinstance(m, dict) else None
        if isinstance(name, str) and name and name not in out:
            size = m.get("size")
            disk = -(-size // MIB) if isinstance(size, int) and size > 0 else None
            out[name] = Model(name, name in loaded, disk, loaded.get(name))
    for name, vram in loaded.items():  # resident but no longer listed (deleted meanwhile)
        out.setdefault(name, Model(name, True, None, vram))
    return tuple(out.values())


def describe(target: Target, kind: ServiceKind, a: Answers) -> Service:
    """The service's record from its answers (pid and unit come later, from the system)."""
    healthy, detail = _health(kind, a)
    notes: list[str] = []
    if kind is ServiceKind.OLLAMA:
        models = _ollama_models(a)
        return Service(
            target,
            kind,
            version=str(ok_json(a, "/api/version").get("version")),
            healthy=healthy,
            health_detail=detail,
            models=models,
            loaded=any(m.loaded for m in models),
        )
    if kind is ServiceKind.COMFYUI:
        stats = ok_json(a, "/system_stats")
        system = stats.get("system")
        version = system.get("comfyui_version") if isinstance(system, dict) else None
        devices = list_of(stats, "devices") or [{}]
        first = devices[0] if isinstance(devices[0], dict) else {}
        torch = first.get("torch_vram_total")
        held = torch // MIB if isinstance(torch, int) and torch >= 0 else None
        device = str(first.get("type", "")).lower()
        off_card = device if device in OFF_CARD_DEVICES else None
        if off_card is not None:
            # Its "VRAM" figures are the host's RAM: none of it is on the card.
            held = None
            notes.append(f"runs on {off_card.upper()}: holds no card memory")
        if len(devices) > 1:
            notes.append(f"it sees {len(devices)} devices; the registry covers GPU 0")
        return Service(
            target,
            kind,
            version=str(version) if version else None,
            healthy=healthy,
            health_detail=detail,
            loaded=None if held is None else held > CONTEXT_MIB,
            held_mib=held,
            notes=tuple(notes),
            off_card=off_card,
        )
    if kind in (ServiceKind.SPEACHES, ServiceKind.VLLM):
        listed = [str(m["id"]) for m in openai_models(a) or []]
        if kind is ServiceKind.SPEACHES:
            resident = set(speaches_loaded(a) or [])
            sleep_mode = None
            loaded: bool | None = bool(resident)
        else:
            sleeping = ok_json(a, "/is_sleeping").get("is_sleeping")
            sleep_mode = isinstance(sleeping, bool)
            loaded = not sleeping if isinstance(sleeping, bool) else True
            resident = set(listed) if loaded else set()
        version = ok_json(a, "/version").get("version")
        models = tuple(Model(n, n in resident) for n in dict.fromkeys(listed))
        return Service(
            target,
            kind,
            version=str(version) if isinstance(version, str) else None,
            healthy=healthy,
            health_detail=detail,
            models=models,
            loaded=loaded,
            sleep_mode=sleep_mode,
        )
    if kind is ServiceKind.MVOICE:
        says = ok_json(a, "/health").get("loaded")
        return Service(
            target,
            kind,
            healthy=healthy,
            health_detail=detail,
            loaded=says if isinstance(says, bool) else None,
        )
    if kind is ServiceKind.WHISPER:
        # Up and answering means its model is in: whisper-server loads before it serves.
        return Service(
            target, kind, healthy=healthy, health_detail=detail, loaded=True if healthy else None
        )
    return Service(target, kind, healthy=healthy, health_detail=detail)


# -- probing --------------------------------------------------------------------------------


async def _fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    timeout_s: float,
    data: aiohttp.FormData | None = None,
) -> Answer | None:
    try:
        async with asyncio.timeout(timeout_s):
            async with session.request(method, url, data=data, allow_redirects=False) as resp:
                body = await resp.content.read(MAX_ANSWER_BYTES)
                return Answer(
                    resp.status,
                    resp.headers.get("Content-Type", ""),
                    resp.headers.get("Server", ""),
                    body.decode(errors="replace"),
                )
    except UPSTREAM_FAILURES:
        return None


async def _accepts(target: Target, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(target.host, target.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def probe(
    session: aiohttp.ClientSession, target: Target, timeout_s: float = PROBE_TIMEOUT_S
) -> Service | Unidentified | None:
    """One target: None when nothing accepts a connection there."""
    if not await _accepts(target, timeout_s):
        return None
    results = await asyncio.gather(
        *(_fetch(session, "GET", target.url + p, timeout_s) for p in PROBE_PATHS)
    )
    answers: dict[str, Answer | None] = dict(zip(PROBE_PATHS, results, strict=True))
    kind = identify(answers)
    if kind is None and status_of(answers, "/health") in (200, 503):
        # Last, and only where /health answers as whisper-server's does (503 while it loads):
        # it refuses a request without a file before it touches its model.
        form = aiohttp.FormData()
        form.add_field("response_format", "json")
        refusal = await _fetch(session, "POST", target.url + "/inference", timeout_s, form)
        if is_whisper_refusal(refusal):
            kind = ServiceKind.WHISPER
    if kind is None:
        return Unidentified(target, describe_unknown(answers))
    return describe(target, kind, answers)


async def scan_targets(
    targets: Sequence[Target],
    *,
    system: LocalSystem,
    session: aiohttp.ClientSession | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> Scan:
    """Probe every target at once; the local ones get their pid and unit."""
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        found = await asyncio.gather(*(probe(session, t, timeout_s) for t in targets))
    finally:
        if own:
            await session.close()
    scan = Scan()
    for target, result in zip(targets, found, strict=True):
        if result is None:
            if target.scanned:
                scan.silent.append(target)
        elif isinstance(result, Unidentified):
            scan.unidentified.append(result)
        else:
            scan.services.append(await asyncio.to_thread(_with_process, result, system))
    return scan


def _with_process(service: Service, system: LocalSystem) -> Service:
    if not service.target.local:
        return service
    pid = system.listening_pid(service.target.port)
    if pid is None:
        return service
    return dataclasses.replace(service, pid=pid, unit=system.unit_of(pid))


# -- the card and errors ----------------------------------------------------------------


class InitError(Exception):
    """Init cannot go on; the message says what to do. `status` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def one_line(text: str, limit: int = 200) -> str:
    """Text from a service or a process, fit for a comment: one line, printable, bounded."""
    out = "".join(c if c.isprintable() else "?" for c in text.replace("\n", " "))
    return out if len(out) <= limit else out[: limit - 3] + "..."


# -- the GPU --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    reading: GpuReading
    sim_url: str | None = None  # the simulated GPU's URL; None: NVML (or static)

    @property
    def backend(self) -> str:
        if self.sim_url is not None:
            return "sim"
        return "static" if self.reading.backend == "static" else "nvml"


async def read_gpu(
    sim_url: str | None,
    index: int = 0,
    *,
    nvml: NvmlApi | None = None,
    proc_root: Path = Path("/proc"),
    total_mib: int | None = None,
) -> Gpu:
    """One reading of the card, or InitError saying why there is none. `total_mib`: the
    card's size as the user gives it (a box without NVML): no reading, backend static."""
    if total_mib is not None:
        if sim_url is not None:
            raise InitError("give --total-mib or --gpu-sim, not both", status=2)
        if total_mib <= 0:
            raise InitError(f"--total-mib must be positive (got {total_mib})", status=2)
        device = f"a card of {total_mib} MiB (given: --total-mib)"
        return Gpu(GpuReading.without_figures("static", device, total_mib))
    reader: SimReader | NvmlReader | NvmlBoxReader = (
        SimReader(sim_url) if sim_url else NvmlReader(index, nvml=nvml, proc_root=proc_root)
    )
    api: NvmlApi = nvml if nvml is not None else pynvml
    try:
        if not sim_url and index == 0 and hasattr(api, "nvmlDeviceGetCount"):
            # A box with several GPUs (or MIG instances): every device, with its processes.
            box = await NvmlBoxReader.open(api, proc_root=proc_root)
            if box is not None:
                reader = box
        if not isinstance(reader, NvmlBoxReader):
            await reader.start()
        reading = await reader.read()
    except GpuInitError as exc:
        hint = (
            "is the simulated GPU running?"
            if sim_url
            else "init needs NVIDIA's driver to read the card; without one, give the card's "
            "size with --total-mib N (the registry's backend is then static), or read a "
            "simulated card with --gpu-sim URL"
        )
        raise InitError(f"cannot read the GPU: {exc}; {hint}") from exc
    finally:
        await reader.aclose()
    if not reading.ok:
        raise InitError(f"cannot read the GPU: {reading.error}")
    return Gpu(reading, sim_url)


__all__ = [
    "CONTEXT_MIB",
    "USUAL_PORTS",
    "Answer",
    "Gpu",
    "InitError",
    "Model",
    "Scan",
    "Service",
    "ServiceKind",
    "Target",
    "Unidentified",
    "describe",
    "identify",
    "one_line",
    "parse_target",
    "probe",
    "read_gpu",
    "scan_targets",
    "targets_to_probe",
]
