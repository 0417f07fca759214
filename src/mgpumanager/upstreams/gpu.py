"""GPU readers: one Protocol, three backends (docs/architecture.md, "GPU readers").

- `NvmlReader`: the NVIDIA Management Library through `nvidia-ml-py` (module `pynvml`).
- `StaticReader`: no readings at all; the total comes from `gpu.total_mib`.
- `SimReader`: the simulated GPU of `mgpumanager.sim`, over HTTP (`GET {url}/v1/gpu`).

`make_reader(GpuConfig)` picks one (`auto`: nvml where it initialises, else static when
`total_mib` is set, else `GpuInitError`). `read()` never raises: a failed reading comes back with
`error` set and its figures `None` ("unknown"), and is logged, at most once a minute while the
failure lasts. NVML and aiohttp exceptions are translated here and go no further.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import aiohttp
import pynvml
from pydantic import BaseModel, ConfigDict, ValidationError

from mgpumanager.registry import GpuConfig
from mgpumanager.upstreams.containers import ContainerNames, tag_process
from mgpumanager.upstreams.devices import SINGLE_UUID, DeviceProcess, DeviceReading

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# While a reader keeps failing, repeat the warning at most this often.
LOG_EVERY_S = 60.0
SIM_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class GpuProcess:
    pid: int | None  # None when the driver hides it (containers)
    name: str  # command line or process name; on the simulated GPU, the allocation owner
    used_mib: int | None  # None when the driver does not say (containers, some drivers)


@dataclass(frozen=True)
class GpuReading:
    backend: str
    device: str
    total_mib: int
    used_mib: int | None
    free_mib: int | None
    utilization_pct: int | None
    processes: tuple[GpuProcess, ...] = ()
    # Set when the reading failed; then used/free/utilization are None.
    error: str | None = None
    # Every card, on a box with several (the figures above are then their sums); () on a box
    # with one, whose reading is the card's.
    devices: tuple[DeviceReading, ...] = ()

    @property
    def ok(self) -> bool:
        """The reading did not fail. A static reading is ok, yet has no figures."""
        return self.error is None

    @classmethod
    def without_figures(
        cls, backend: str, device: str, total_mib: int, error: str | None = None
    ) -> GpuReading:
        """No used/free/utilization: a static reader's, or a failed one's (with `error`)."""
        return cls(backend, device, total_mib, None, None, None, error=error)


class GpuReader(Protocol):
    @property
    def backend(self) -> str: ...

    @property
    def total_mib(self) -> int:
        """Known once the reader is constructed (static) or started (nvml, sim)."""
        ...

    async def read(self) -> GpuReading:
        """Never raises: a failure is a reading with `error` set."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class MultiDevice(Protocol):
    """A reader that knows the box's cards (static with `gpu.devices`, sim with several)."""

    @property
    def device_uuids(self) -> tuple[str, ...]: ...


def device_uuids(reader: GpuReader) -> tuple[str, ...]:
    """The box's devices, by UUID, in NVML index order; one for a reader that names none."""
    if isinstance(reader, MultiDevice) and reader.device_uuids:
        return reader.device_uuids
    return (SINGLE_UUID,)


def devices_of(reading: GpuReading) -> tuple[DeviceReading, ...]:
    """Per-device readings; a reading of one card is its own single device."""
    if reading.devices:
        return reading.devices
    procs = tuple(DeviceProcess(p.pid, p.name, p.used_mib) for p in reading.processes)
    return (
        DeviceReading(
            SINGLE_UUID,
            0,
            reading.device,
            reading.total_mib,
            reading.used_mib,
            reading.free_mib,
            reading.utilization_pct,
            procs,
        ),
    )


class GpuInitError(Exception):
    """The configured GPU backend cannot start; the message says what to change."""


def measured_mib(reading: GpuReading, patterns: Sequence[str]) -> int | None:
    """VRAM attributable to a consumer: the summed usage of the processes whose name contains
    any of `patterns`. None when there are no patterns, the reading failed, or no matching
    process has a known figure (the caller then plans with the declared cost)."""
    if not patterns or not reading.ok:
        return None
    known = [
        p.used_mib
        for p in reading.processes
        if p.used_mib is not None and any(pat in p.name for pat in patterns)
    ]
    return sum(known) if known else None


class _FailureLog:
    """Logs the first failure, then at most one reminder every `every_s`, then the recovery."""

    def __init__(self, what: str, every_s: float = LOG_EVERY_S) -> None:
        self._what = what
        self._every_s = every_s
        self._failures = 0
        self._last_logged = 0.0
        self._now: Callable[[], float] = time.monotonic

    def failed(self, message: str) -> None:
        self._failures += 1
        now = self._now()
        if self._failures == 1 or now - self._last_logged >= self._every_s:
            self._last_logged = now
            log.warning("%s: reading failed (%d in a row): %s", self._what, self._failures, message)

    def succeeded(self) -> None:
        if self._failures:
            log.info("%s: readings recovered after %d failure(s)", self._what, self._failures)
        self._failures = 0


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# --------------------------------------------------------------------------------------------
# Static


class StaticReader:
    """No readings: the broker's own accounting is all there is."""

    backend = "static"

    def __init__(self, total_mib: int, devices: Sequence[tuple[str, int]] = ()) -> None:
        """`devices`: (uuid, total_mib) of every card of a box with several; `total_mib` is
        then their sum."""
        if total_mib <= 0:
            raise ValueError(f"total_mib must be positive, got {total_mib}")
        self._total_mib = total_mib
        self._devices = tuple(
            DeviceReading(uuid, i, f"static GPU {i}", total)
            for i, (uuid, total) in enumerate(devices)
        )

    @property
    def device_uuids(self) -> tuple[str, ...]:
        return tuple(d.uuid for d in self._devices)

    @property
    def total_mib(self) -> int:
        return self._total_mib

    def resize(self, total_mib: int) -> None:
        """A reload gave the card another size."""
        if total_mib <= 0:
            raise ValueError(f"total_mib must be positive, got {total_mib}")
        self._total_mib = total_mib

    async def read(self) -> GpuReading:
        reading = GpuReading.without_figures(self.backend, "static (no readings)", self._total_mib)
        if len(self._devices) > 1:
            return dataclasses.replace(reading, devices=self._devices)
        return reading

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------------------------
# NVML


class NvmlApi(Protocol):
    """The part of `pynvml` the reader uses; tests pass a stand-in. Structures come back as
    `Any`: the reader reads only `.total/.free/.used`, `.gpu`, `.pid/.usedGpuMemory` from them.
    The compute-process calls (`nvmlDeviceGetComputeRunningProcesses[_v3|_v2]`) are looked up
    by name, newest first, because which of them exist depends on the package version."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlSystemGetProcessName(self, pid: int) -> str | bytes: ...


_PROCESS_CALLS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)
# The v2 memory call (whose `used` leaves out driver-reserved memory) is missing on old
# drivers (FunctionNotFound), refused by some (NotSupported, ArgumentVersionMismatch), and old
# pynvml releases do not take `version` at all (TypeError). v1 then.
_V2_UNAVAILABLE: tuple[type[BaseException], ...] = (
    pynvml.NVMLError_FunctionNotFound,
    pynvml.NVMLError_NotSupported,
    getattr(pynvml, "NVMLError_ArgumentVersionMismatch", pynvml.NVMLError_NotSupported),
    TypeError,
)
# The unversioned process call raises this when the library lacks the newest variant.
_CALL_MISSING: tuple[type[BaseException], ...] = (
    pynvml.NVMLError_FunctionNotFound,
    getattr(pynvml, "NVMLLibraryMismatchError", pynvml.NVMLError_FunctionNotFound),
)


class NvmlReader:
    """Readings of one NVIDIA GPU. Call `start()` (or use `make_reader`) before reading.

    `total_cap_mib` caps the total (config `gpu.total_mib`: "a cap otherwise"); free memory
    is then capped to what is left under the cap. NVML is blocking, so every call runs in a
    worker thread, one at a time.
    """

    backend = "nvml"

    def __init__(
        self,
        index: int = 0,
        total_cap_mib: int | None = None,
        nvml: NvmlApi | None = None,
        *,
        proc_root: Path = Path("/proc"),
        containers: ContainerNames | None = None,
        handle_of: Callable[[NvmlApi], Any] | None = None,
    ) -> None:
        """`handle_of`: how to find the device when it is not a plain index (a MIG instance,
        upstreams/nvml_box.py)."""
        self._index = index
        self._handle_of = handle_of
        self.uuid: str | None = None  # read at start where the library can tell
        # Names the container a GPU process runs in (`[container:NAME]`, upstreams/containers.py).
        self._containers = containers if containers is not None else ContainerNames()
        self._cap_mib = total_cap_mib
        self._nvml: NvmlApi = nvml if nvml is not None else pynvml
        self._proc_root = proc_root
        self._handle: Any = None
        self._device = f"GPU {index}"
        self._total_mib: int | None = None
        self._use_v2 = hasattr(pynvml, "nvmlMemory_v2")
        self._process_calls = [n for n in _PROCESS_CALLS if hasattr(self._nvml, n)]
        self._lock = asyncio.Lock()
        self._failures = _FailureLog(f"nvml GPU {index}")
        self._started = False

    @property
    def total_mib(self) -> int:
        if self._total_mib is None:
            raise RuntimeError("NvmlReader.start() has not been called")
        return self._total_mib

    @property
    def device(self) -> str:
        return self._device

    async def start(self) -> None:
        """Initialise NVML and find the device; `GpuInitError` when that fails."""
        async with self._lock:
            if self._started:
                return
            try:
                await asyncio.to_thread(self._start_sync)
            except pynvml.NVMLError as exc:
                raise GpuInitError(f"NVML cannot read GPU {self._index}: {_describe(exc)}") from exc
            self._started = True
            log.info("nvml: %s, %d MiB", self._device, self._total_mib)

    def _start_sync(self) -> None:
        self._nvml.nvmlInit()
        try:
            if self._handle_of is not None:
                self._handle = self._handle_of(self._nvml)
            else:
                self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self._index)
            self._device = _text(self._nvml.nvmlDeviceGetName(self._handle))
            get_uuid = getattr(self._nvml, "nvmlDeviceGetUUID", None)
            if get_uuid is not None:
                self.uuid = _text(get_uuid(self._handle))
            total_mib, _, _ = self._memory_sync()
        except BaseException:
            self._nvml.nvmlShutdown()
            raise
        self._total_mib = total_mib

    async def read(self) -> GpuReading:
        async with self._lock:
            if not self._started:
                return self._failed("reader not started")
            try:
                reading = await asyncio.to_thread(self._read_sync)
            except Exception as exc:  # NVMLError mostly; anything else must not escape either
                return self._failed(_describe(exc))
        self._failures.succeeded()
        return reading

    def _failed(self, message: str) -> GpuReading:
        self._failures.failed(message)
        return GpuReading.without_figures(
            self.backend, self._device, self._total_mib or 0, error=message
        )

    def _read_sync(self) -> GpuReading:
        total_mib, used_mib, free_mib = self._memory_sync()
        return GpuReading(
            backend=self.backend,
            device=self._device,
            total_mib=total_mib,
            used_mib=used_mib,
            free_mib=free_mib,
            utilization_pct=self._utilization_sync(),
            processes=self._processes_sync(),
        )

    def _memory_sync(self) -> tuple[int, int, int]:
        """(total, used, free) in MiB, total and free capped by `total_cap_mib`."""
        if self._use_v2:
            try:
                mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle, version=pynvml.nvmlMemory_v2)
            except _V2_UNAVAILABLE as exc:
                log.info("nvml: v2 memory call unavailable (%s), using v1", _describe(exc))
                self._use_v2 = False
                mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        else:
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        total_mib, used_mib, free_mib = mem.total // MIB, mem.used // MIB, mem.free // MIB
        if self._cap_mib is not None and self._cap_mib < total_mib:
            total_mib = self._cap_mib
            free_mib = min(free_mib, max(0, total_mib - used_mib))
        return int(total_mib), int(used_mib), int(free_mib)

    def _utilization_sync(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_NoPermission):
            return None

    def _processes_sync(self) -> tuple[GpuProcess, ...]:
        while self._process_calls:
            call = getattr(self._nvml, self._process_calls[0])
            try:
                raw = call(self._handle)
                break
            except _CALL_MISSING:
                self._process_calls.pop(0)  # this library is older: try the next variant
            except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_NoPermission):
                return ()
        else:
            return ()
        return tuple(self._process(p) for p in raw)

    def _process(self, raw: Any) -> GpuProcess:
        pid = int(raw.pid) if raw.pid else None
        used = raw.usedGpuMemory  # None: unknown (containers, WDDM); pynvml maps N/A to None
        name = self._process_name(pid) or f"pid:{raw.pid}"
        return GpuProcess(
            pid=pid,
            name=tag_process(name, pid, self._containers, self._proc_root),
            used_mib=int(used) // MIB if used is not None else None,
        )

    def _process_name(self, pid: int | None) -> str | None:
        """The command line (what `gpu_processes` patterns match), else NVML's process name.
        In a container the driver's PIDs may be the host's: then neither works, and the name
        stays unknown."""
        if pid is None:
            return None
        try:
            raw = (self._proc_root / str(pid) / "cmdline").read_bytes()
            cmdline = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
            if cmdline:
                return cmdline
        except OSError:
            pass
        try:
            return _text(self._nvml.nvmlSystemGetProcessName(pid)) or None
        except pynvml.NVMLError:
            return None

    async def aclose(self) -> None:
        async with self._lock:
            if not self._started:
                return
            self._started = False
            try:
                await asyncio.to_thread(self._nvml.nvmlShutdown)
            except pynvml.NVMLError as exc:
                log.warning("nvml: shutdown failed: %s", _describe(exc))


# --------------------------------------------------------------------------------------------
# Simulated GPU


class _SimProcess(BaseModel):
    model_config = ConfigDict(extra="ignore")
    pid: int | None = None
    name: str
    used_mib: int | None = None


class _SimDevice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    uuid: str
    index: int
    name: str = "simulated GPU"
    total_mib: int
    used_mib: int
    free_mib: int
    processes: list[_SimProcess] = []


class _SimGpu(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = "simulated GPU"
    total_mib: int
    used_mib: int
    free_mib: int
    utilization_pct: int | None = None
    processes: list[_SimProcess] = []
    devices: list[_SimDevice] = []  # a simulated box with several cards


class SimReader:
    """Readings of the simulated GPU (`mgpumanager.sim`): `GET {url}/v1/gpu`."""

    backend = "sim"

    def __init__(self, url: str, session: aiohttp.ClientSession | None = None) -> None:
        self._url = url.rstrip("/") + "/v1/gpu"
        self._session = session
        self._own_session = session is None
        self._device = f"sim {url}"
        self._total_mib: int | None = None
        self._uuids: tuple[str, ...] = ()
        self._failures = _FailureLog(f"sim GPU {url}")

    @property
    def device_uuids(self) -> tuple[str, ...]:
        return self._uuids

    @property
    def total_mib(self) -> int:
        if self._total_mib is None:
            raise RuntimeError("SimReader.start() has not been called")
        return self._total_mib

    async def start(self) -> None:
        """Fetch the total once; `GpuInitError` when the simulated GPU does not answer."""
        try:
            await self._fetch()
        except (aiohttp.ClientError, TimeoutError, ValueError, ValidationError) as exc:
            raise GpuInitError(f"simulated GPU at {self._url}: {_describe(exc)}") from exc

    async def _fetch(self) -> GpuReading:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=SIM_TIMEOUT_S)
        async with self._session.get(self._url, timeout=timeout) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status} from {self._url}")
            gpu = _SimGpu.model_validate_json(await resp.read())
        self._total_mib = gpu.total_mib
        self._device = gpu.name
        devices = tuple(
            DeviceReading(
                d.uuid,
                d.index,
                d.name,
                d.total_mib,
                d.used_mib,
                d.free_mib,
                None,
                tuple(DeviceProcess(p.pid, p.name, p.used_mib) for p in d.processes),
            )
            for d in gpu.devices
        )
        if not self._uuids and len(devices) > 1:
            self._uuids = tuple(d.uuid for d in devices)
        return GpuReading(
            backend=self.backend,
            device=gpu.name,
            total_mib=gpu.total_mib,
            used_mib=gpu.used_mib,
            free_mib=gpu.free_mib,
            utilization_pct=gpu.utilization_pct,
            processes=tuple(GpuProcess(p.pid, p.name, p.used_mib) for p in gpu.processes),
            devices=devices if len(devices) > 1 else (),
        )

    async def read(self) -> GpuReading:
        try:
            reading = await self._fetch()
        except (aiohttp.ClientError, TimeoutError, ValueError, ValidationError) as exc:
            message = _describe(exc)
            self._failures.failed(message)
            return GpuReading.without_figures(
                self.backend, self._device, self._total_mib or 0, error=message
            )
        self._failures.succeeded()
        return reading

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None


# --------------------------------------------------------------------------------------------


def _static_box(gpu: GpuConfig) -> StaticReader:
    """`gpu.devices` of a static box: its cards, the total their sum."""
    cards = [(d.uuid, d.total_mib) for d in gpu.devices or ()]
    return StaticReader(sum(t for _, t in cards), cards)


async def make_reader(
    gpu: GpuConfig,
    *,
    nvml: NvmlApi | None = None,
    session: aiohttp.ClientSession | None = None,
) -> GpuReader:
    """The started reader `gpu.backend` asks for. Raises `GpuInitError`."""
    if gpu.backend == "static":
        if gpu.devices:
            return _static_box(gpu)
        if gpu.total_mib is None:
            raise GpuInitError("gpu.backend 'static' needs gpu.total_mib")
        return StaticReader(gpu.total_mib)
    if gpu.backend == "sim":
        sim = SimReader(gpu.sim_url, session)
        try:
            await sim.start()
        except GpuInitError:
            await sim.aclose()
            raise
        return sim
    api: NvmlApi = nvml if nvml is not None else pynvml
    if gpu.index == 0 and hasattr(api, "nvmlDeviceGetCount"):
        # Every device of the box (a `gpu.index` other than 0 keeps to that one card). The
        # import is here because the box reader is built of this module's NvmlReader.
        from mgpumanager.upstreams.nvml_box import NvmlBoxReader

        try:
            box = await NvmlBoxReader.open(api, gpu.total_mib)
        except GpuInitError:
            box = None  # the one-card reader below says why, and `auto` falls back
        if box is not None:
            return box
    reader = NvmlReader(gpu.index, gpu.total_mib, nvml)
    try:
        await reader.start()
    except GpuInitError as exc:
        if gpu.backend == "nvml":
            raise
        if gpu.devices:
            log.warning("gpu: %s; using the static backend with gpu.devices", exc)
            return _static_box(gpu)
        if gpu.total_mib is None:
            raise GpuInitError(
                f"gpu.backend 'auto': no NVIDIA GPU readable ({exc}) and gpu.total_mib is not "
                "set; set gpu.total_mib (static backend: the broker's own accounting only), "
                "or use gpu.backend 'sim' with a simulated GPU"
            ) from exc
        log.warning("gpu: %s; using the static backend with %d MiB", exc, gpu.total_mib)
        return StaticReader(gpu.total_mib)
    return reader
