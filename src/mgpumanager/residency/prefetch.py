"""Weight prefetch: the next tenure's weight files read into the page cache while the current
job runs (docs/residency.md, "Prefetch").

Most of a swap is the upstream's load, and most of a load is reading weights from disk: a cold
file reads at the disk's pace (0.5-1 GiB/s on an SSD, far less on a disk), the same file from
the page cache several times faster. The broker knows before anyone which load comes next: the
job the scheduler's order would pick once the holder's jobs are done (`SchedulerCore.
next_tenure`). When that job's consumer (or model) is not resident, its weight files are read
ahead, one chunk at a time, on a thread of their own:

- which files: the registry's `weights` for the model, else what the job itself names (a
  ComfyUI prompt's loader nodes, found under `model_dirs`) or what Ollama's `/api/show` gives
  (the modelfile's FROM blob), else the consumer's `weights`;
- how much: never more than `prefetch.max_ram_fraction` of MemAvailable, read when it starts;
- when: only while a tenure runs and no residency change is under way (an eviction, a load),
  so it never competes with a load's I/O; paused meanwhile, and cancelled as soon as the
  forecast changes (a job arrives, leaves, or the lease passes) or the load it was for begins.
  The thread also asks the kernel for the idle I/O class where it may.

When the forecast tenure begins, the prefetch says whether its load found the files warm
(`prefetch.used`: everything read ahead, and the share of the files in the page cache, asked
with mincore(2) where it can). Events: `prefetch.started`, `prefetch.done`,
`prefetch.cancelled`, `prefetch.used`; `/v1/status` shows the last one and the totals.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import glob
import json
import logging
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mgpumanager.clock import Clock
from mgpumanager.errors import BrokerError
from mgpumanager.events import Emit, no_emit
from mgpumanager.registry import AdapterType, Config, HttpCall
from mgpumanager.residency.records import State
from mgpumanager.residency.view import ResidencyView
from mgpumanager.scheduling.core import Grant, Outcome, SchedulerCore
from mgpumanager.scheduling.order import QueuedJob
from mgpumanager.upstreams.adapters import ConsumerAdapter
from mgpumanager.upstreams.adapters.comfyui import PROMPT_PATHS

log = logging.getLogger("mgpumanager.residency.prefetch")

__all__ = [
    "LOADER_KEYS",
    "Prefetch",
    "Prefetcher",
    "cached_fraction",
    "loader_files",
    "mem_available_bytes",
]

MIB = 1024 * 1024
GIB = 1024 * MIB
CHUNK_BYTES = 16 * MIB  # read per step: a cancel or a pause takes effect within one
# The inputs of ComfyUI's loader nodes that name a model file (CheckpointLoaderSimple,
# UNETLoader, CLIPLoader, DualCLIPLoader, VAELoader, LoraLoader...).
LOADER_KEYS: tuple[str, ...] = (
    *("ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2"),
    *("vae_name", "lora_name"),
)


@dataclass
class Prefetch:
    """One prefetch: what it was for, what it planned and read, how it ended."""

    consumer: str
    model: str | None
    state: str = "planning"  # planning, reading, paused, done, cancelled, failed, nothing
    files: list[str] = field(default_factory=list)
    planned_bytes: int = 0
    read_bytes: int = 0
    budget_bytes: int | None = None
    started_at: float = 0.0
    read_s: float = 0.0
    reason: str = ""
    # Set when the tenure it was for began: all of it read by then, and the share of its
    # files' pages in the page cache at that moment (None: could not ask).
    warm: bool | None = None
    cached_fraction: float | None = None

    def document(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "model": self.model,
            "state": self.state,
            "files": list(self.files),
            "planned_bytes": self.planned_bytes,
            "read_bytes": self.read_bytes,
            "budget_bytes": self.budget_bytes,
            "read_s": round(self.read_s, 3),
            "reason": self.reason,
            "warm": self.warm,
            "cached_fraction": self.cached_fraction,
        }


@dataclass
class PrefetchCounters:
    started: int = 0
    done: int = 0
    cancelled: int = 0
    bytes_read: int = 0
    warm_loads: int = 0  # a forecast tenure began with everything read ahead
    cold_loads: int = 0  # ... with part of it or nothing read


# What the prefetcher reads files with: (path, offset, length) -> bytes read. A seam for tests.
ReadRange = Callable[[str, int, int], int]


class Prefetcher:
    """Owns at most one prefetch at a time; told of every queue change by the core's observers
    (`attach`), it re-forecasts on the next loop turn and starts, keeps or cancels."""

    def __init__(
        self,
        config: Callable[[], Config],
        residency: ResidencyView,
        core: SchedulerCore,
        adapters: Callable[[], Mapping[str, ConsumerAdapter]],
        clock: Clock,
        *,
        emit: Emit = no_emit,
        mem_available: Callable[[], int | None] | None = None,
        read_range: ReadRange | None = None,
    ) -> None:
        self._config = config
        self._residency = residency
        self._core = core
        self._adapters = adapters
        self._clock = clock
        self._emit = emit
        self._mem_available = mem_available or mem_available_bytes
        self._read_range = read_range or read_range_into_cache
        self.counters = PrefetchCounters()
        self.current: Prefetch | None = None  # the one under way, or the last one
        self._key: tuple[str, str | None, tuple[str, ...]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # something changed: a paused prefetch looks again
        self._pending = False  # a re-forecast is scheduled
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="prefetch", initializer=_idle_io_priority
        )

    # -- being told -----------------------------------------------------------------------------

    def attach(self) -> None:
        """Follow the core: every job queued, granted, finished or gone changes the forecast."""
        self._core.on_submit.append(lambda job: self.poke())
        self._core.on_grant.append(self._granted)
        self._core.on_finish.append(lambda job_id, outcome: self.poke())
        self._core.on_leave.append(self._left)
        self._core.on_ready.append(lambda job_id: self.poke())

    def _left(self, job: QueuedJob, outcome: Outcome) -> None:
        self.poke()

    def _granted(self, grant: Grant) -> None:
        if grant.prepare:
            # A tenure begins: its residency change (a load, maybe) must not share the disk.
            self._tenure_began(grant)
        self.poke()

    def poke(self) -> None:
        """Re-forecast on the next loop turn (a burst of changes makes one)."""
        self._wake.set()
        if self._pending or self._closed:
            return
        self._pending = True
        asyncio.get_running_loop().call_soon(self._reforecast)

    # -- deciding -------------------------------------------------------------------------------

    def _reforecast(self) -> None:
        self._pending = False
        if self._closed:
            return
        config = self._config()
        if not config.prefetch.enabled:
            self._cancel("prefetch is off")
            return
        core, residency = self._core, self._residency
        if not core.others_waiting:  # most changes (a job of the holder's): cheap to tell
            self._cancel("no other consumer's job waits")
            return
        job = core.next_tenure(residency.resident_set(), residency.swap_costs())
        if job is None or job.exclusive or job.consumer not in config.consumers:
            self._cancel("no other consumer's job waits")
            return
        model = residency.model_key(job.consumer, job.model) if job.model else None
        if _ready(residency, job.consumer, model):
            self._cancel(f"{job.consumer} is resident: nothing to load")
            return
        key = (job.consumer, model, job.weights)
        if key == self._key and self._task is not None and not self._task.done():
            return  # the same forecast: it goes on
        self._cancel("the next tenure changed")
        self._key = key
        self.current = Prefetch(job.consumer, model, started_at=self._clock.now())
        self._task = asyncio.ensure_future(self._run(self.current, job.weights))

    def _may_read(self) -> bool:
        """A tenure runs and nothing changes residency: no load's I/O to compete with."""
        core = self._core
        return core.in_flight > 0 and not core.preparing and not self._residency.changing.locked()

    def _cancel(self, reason: str) -> None:
        task, self._task, self._key = self._task, None, None
        if task is not None and not task.done():
            current = self.current
            if current is not None:
                current.reason = reason
            task.cancel()

    def _tenure_began(self, grant: Grant) -> None:
        current = self.current
        job = self._core.running.get(grant.job_id)
        if current is None or job is None or current.warm is not None:
            return
        model = self._residency.model_key(job.consumer, job.model) if job.model else None
        if (job.consumer, model) != (current.consumer, current.model):
            return
        self._cancel("its tenure began")
        if current.planned_bytes == 0:
            return
        current.warm = current.state == "done"
        if current.warm:
            self.counters.warm_loads += 1
        else:
            self.counters.cold_loads += 1
        files = list(current.files)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, cached_fraction, files)
        future.add_done_callback(lambda f: self._used(current, f))

    def _used(self, prefetch: Prefetch, future: asyncio.Future[float | None]) -> None:
        if not future.cancelled() and future.exception() is None:
            fraction = future.result()
            prefetch.cached_fraction = None if fraction is None else round(fraction, 3)
        self._emit(
            "prefetch.used",
            consumer=prefetch.consumer,
            model=prefetch.model,
            warm=prefetch.warm,
            read_bytes=prefetch.read_bytes,
            planned_bytes=prefetch.planned_bytes,
            cached_fraction=prefetch.cached_fraction,
        )

    # -- reading --------------------------------------------------------------------------------

    async def _run(self, prefetch: Prefetch, named: tuple[str, ...]) -> None:
        name, model = prefetch.consumer, prefetch.model
        loop = asyncio.get_running_loop()
        try:
            patterns, where = await self._sources(name, model, named)
            paths = await loop.run_in_executor(self._executor, _expand, patterns, where)
            available = self._mem_available()
            fraction = self._config().prefetch.max_ram_fraction
            budget = None if available is None else int(available * fraction)
            plan = _plan(paths, budget)
            prefetch.budget_bytes = budget
            prefetch.files = [p for p, _ in plan]
            prefetch.planned_bytes = sum(n for _, n in plan)
            if not plan:
                prefetch.state = "nothing"
                prefetch.reason = "no weight files known" if not paths else "no memory to spare"
                return
            prefetch.state = "reading"
            self.counters.started += 1
            self._emit(
                "prefetch.started",
                consumer=name,
                model=model,
                files=prefetch.files,
                bytes=prefetch.planned_bytes,
                budget_bytes=budget,
            )
            for path, length in plan:
                offset = 0
                while offset < length:
                    await self._until_may_read(prefetch)
                    step = min(CHUNK_BYTES, length - offset)
                    started = self._clock.now()
                    got = await loop.run_in_executor(
                        self._executor, self._read_range, path, offset, step
                    )
                    prefetch.read_s += self._clock.now() - started
                    prefetch.read_bytes += got
                    self.counters.bytes_read += got
                    if got < step:
                        break  # the file is shorter than when it was planned
                    offset += step
            prefetch.state = "done"
            self.counters.done += 1
            self._emit(
                "prefetch.done",
                consumer=name,
                model=model,
                bytes=prefetch.read_bytes,
                read_s=round(prefetch.read_s, 3),
                gib_per_s=_rate(prefetch),
            )
        except asyncio.CancelledError:
            started = prefetch.state in ("reading", "paused")
            prefetch.state = "cancelled"
            if started:  # one still planning had announced nothing
                self.counters.cancelled += 1
                self._emit(
                    "prefetch.cancelled",
                    consumer=name,
                    model=model,
                    read_bytes=prefetch.read_bytes,
                    reason=prefetch.reason,
                )
            raise
        except (BrokerError, OSError, ValueError) as exc:
            prefetch.state = "failed"
            prefetch.reason = str(exc)
            log.info("%s: prefetch failed: %s", name, exc)

    async def _until_may_read(self, prefetch: Prefetch) -> None:
        if not self._config().prefetch.enabled:  # switched off by a reload meanwhile
            prefetch.reason = "prefetch is off"
            raise asyncio.CancelledError
        while not self._may_read():
            prefetch.state = "paused"
            self._wake.clear()
            await self._wake.wait()
        prefetch.state = "reading"

    async def _sources(
        self, name: str, model: str | None, named: tuple[str, ...]
    ) -> tuple[list[str], list[str]]:
        """Patterns (paths or globs) of `name`'s (or `model`'s) weight files, and the folders
        bare file names are looked for in."""
        c = self._config().consumers[name]
        entry = self._residency.model_entry(name, model) if model is not None else None
        if entry is not None and entry.weights:
            return list(entry.weights), []
        if c.type is AdapterType.COMFYUI and named:
            return list(named), list(c.model_dirs)
        if c.type is AdapterType.OLLAMA and model is not None:
            blobs = await ollama_blobs(self._adapters()[name], model)
            if blobs:
                where = [d for m in c.model_dirs for d in (m, os.path.join(m, "blobs"))]
                return blobs, where
        return list(c.weights), list(c.model_dirs)

    async def aclose(self) -> None:
        self._closed = True
        self._cancel("shutting down")
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _ready(residency: ResidencyView, name: str, model: str | None) -> bool:
    record = residency.records.get(name)
    if record is None or record.state is not State.RESIDENT:
        return False
    return model is None or model in record.models


def _rate(prefetch: Prefetch) -> float | None:
    if prefetch.read_s <= 0:
        return None
    return round(prefetch.read_bytes / GIB / prefetch.read_s, 2)


def _plan(paths: Sequence[tuple[str, int]], budget: int | None) -> list[tuple[str, int]]:
    """The files in order, each whole, until the budget is spent (the last one cut short)."""
    plan = []
    left = budget
    for path, size in paths:
        take = size if left is None else min(size, left)
        if take <= 0:
            break
        plan.append((path, take))
        if left is not None:
            left -= take
    return plan


def _expand(patterns: Iterable[str], where: Sequence[str]) -> list[tuple[str, int]]:
    """Regular files (with their sizes) the patterns name: absolute paths and globs as they
    are, a relative name under each of `where` (and its subfolders: ComfyUI's checkpoints/,
    loras/...); the first found for each; no file twice."""
    found: dict[str, int] = {}
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isabs(pattern) or not where:
            candidates = sorted(glob.glob(pattern, recursive=True))
        else:
            candidates = []
            for folder in where:
                folder = os.path.expanduser(folder)
                direct = sorted(glob.glob(os.path.join(folder, pattern), recursive=True))
                deeper = sorted(glob.glob(os.path.join(folder, "**", pattern), recursive=True))
                candidates = direct or deeper
                if candidates:
                    break
        if not candidates and os.path.isabs(pattern) and where:
            # An upstream's own path (Ollama's blob) not readable here: its name in `where`.
            base = os.path.basename(pattern)
            candidates = [os.path.join(os.path.expanduser(f), base) for f in where]
        for path in candidates:
            real = os.path.realpath(path)
            if real in found or not os.path.isfile(real):
                continue
            found[real] = os.path.getsize(real)
            if not glob.has_magic(pattern):
                break
    return list(found.items())


async def ollama_blobs(adapter: ConsumerAdapter, model: str) -> list[str]:
    """The files Ollama loads for `model`: the FROM (and ADAPTER) paths of the modelfile that
    `/api/show` gives; [] when it cannot tell."""
    request_json = getattr(adapter, "request_json", None)
    if request_json is None:
        return []
    try:
        shown = await request_json("POST", "/api/show", body={"model": model}, timeout_s=5.0)
    except BrokerError as exc:
        log.debug("ollama /api/show %s: %s", model, exc)
        return []
    modelfile = shown.get("modelfile") if isinstance(shown, dict) else None
    if not isinstance(modelfile, str):
        return []
    paths = []
    for line in modelfile.splitlines():
        word, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if word.upper() in ("FROM", "ADAPTER") and rest.startswith(("/", "~")):
            paths.append(rest)
    return paths


class WholeBody(Protocol):
    """A request body received whole (a spooled one reads back from its file)."""

    def read_all(self) -> bytes: ...


def loader_files(body: bytes | WholeBody | None) -> tuple[str, ...]:
    """The model files a ComfyUI prompt's loader nodes name, in graph order; () when the body
    is no prompt (the adapter refuses those itself)."""
    if body is None:
        return ()
    raw = body if isinstance(body, bytes) else body.read_all()
    try:
        prompt = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return ()
    graph = prompt.get("prompt") if isinstance(prompt, dict) else None
    if not isinstance(graph, dict):
        return ()
    names: list[str] = []
    for node in graph.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for key in LOADER_KEYS:
            value = inputs.get(key)
            if isinstance(value, str) and value and value not in names:
                names.append(value)
    return tuple(names)


# -- the files themselves (worker thread) -------------------------------------------------------


def read_range_into_cache(path: str, offset: int, length: int) -> int:
    """Read `length` bytes of `path` from `offset` (into a scratch buffer: what stays is the
    page cache), after asking the kernel to read the next range ahead. Answers bytes read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset + length, CHUNK_BYTES, os.POSIX_FADV_WILLNEED)
        buffer = _scratch(min(length, CHUNK_BYTES))
        done = 0
        while done < length:
            view = memoryview(buffer)[: min(len(buffer), length - done)]
            got = os.preadv(fd, [view], offset + done)
            if got == 0:
                break
            done += got
        return done
    finally:
        os.close(fd)


_SCRATCH: dict[int, bytearray] = {}


def _scratch(size: int) -> bytearray:
    # One buffer per worker thread (the executor has one): no 16 MiB allocation per chunk.
    buffer = _SCRATCH.get(size)
    if buffer is None:
        _SCRATCH.clear()
        buffer = _SCRATCH[size] = bytearray(size)
    return buffer


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def cached_fraction(paths: Sequence[str]) -> float | None:
    """The share of the files' pages in the page cache now (mincore(2)); None where it cannot
    be asked."""
    libc = _libc()
    if libc is None:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    total = cached = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            # A read-only shared mapping: nothing is read, nothing committed.
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + page - 1) // page
                vector = (ctypes.c_ubyte * pages)()
                if libc.mincore(address, size, vector) != 0:
                    return None
            finally:
                libc.munmap(address, size)
            total += pages
            cached += pages - bytes(vector).count(0)  # the low bit: resident
        finally:
            os.close(fd)
    return cached / total if total else None


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def _idle_io_priority() -> None:
    """The prefetch thread's disk reads in the idle I/O class (ioprio_set(2)): they get the
    disk only when nobody else wants it, where the I/O scheduler honours classes."""
    libc = _libc()
    number = {"x86_64": 251, "aarch64": 30}.get(os.uname().machine)
    if libc is None or number is None:
        return
    ioprio_class_idle, ioprio_who_process = 3, 1
    # who = this thread (its tid): the broker's other threads keep their priority.
    libc.syscall(number, ioprio_who_process, 0, ioprio_class_idle << 13)


def job_weights(
    config: Config, name: str, call: HttpCall, body: bytes | WholeBody | None
) -> tuple[str, ...]:
    """What a job's body says its consumer loads, for reading ahead: a ComfyUI prompt's loader
    files (nothing for other calls or types, or with prefetch off: no body is parsed for it)."""
    if not config.prefetch.enabled or config.consumers[name].type is not AdapterType.COMFYUI:
        return ()
    if call.method != "POST" or call.path.split("?", 1)[0] not in PROMPT_PATHS:
        return ()  # an upload, say: not a prompt, and maybe large
    return loader_files(body)
