"""Every NVIDIA device of the box, read as one: `NvmlBoxReader`.

One `NvmlReader` per device: each physical GPU, or, on a GPU in MIG mode, each MIG instance
(a device of its own, with its own memory and processes, keyed `MIG-…`). Devices are listed in
NVML index order, which is PCI bus order and not necessarily CUDA's (docs/multi-gpu.md). The
reading is the sum over the devices, with `devices` holding each one; a box where NVML finds
one device keeps the plain `NvmlReader` (`make_reader` decides).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pynvml

from mgpumanager.upstreams.devices import DeviceProcess, DeviceReading
from mgpumanager.upstreams.gpu import GpuInitError, GpuReading, NvmlApi, NvmlReader

log = logging.getLogger(__name__)


def device_count(nvml: NvmlApi) -> int:
    """How many GPUs NVML sees (1 where the library cannot say); NVML must be initialised."""
    count = getattr(nvml, "nvmlDeviceGetCount", None)
    if count is None:
        return 1
    try:
        return int(count())
    except pynvml.NVMLError:
        return 1


def _mig_handles(nvml: Any, index: int) -> list[int]:
    """The MIG instance slots of GPU `index` that hold an instance; [] when not in MIG mode."""
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        current, _ = nvml.nvmlDeviceGetMigMode(handle)
        if current != getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1):
            return []
        slots = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))
    except (pynvml.NVMLError, AttributeError):
        return []
    found = []
    for slot in range(slots):
        try:
            nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError:
            continue  # an empty slot
        found.append(slot)
    return found


def _mig(index: int, slot: int) -> Any:
    def handle_of(nvml: Any) -> Any:
        return nvml.nvmlDeviceGetMigDeviceHandleByIndex(
            nvml.nvmlDeviceGetHandleByIndex(index), slot
        )

    return handle_of


class NvmlBoxReader:
    backend = "nvml"

    def __init__(self, readers: list[NvmlReader]) -> None:
        self._readers = readers

    @classmethod
    async def open(
        cls, nvml: NvmlApi, total_cap_mib: int | None = None, *, proc_root: Path = Path("/proc")
    ) -> NvmlBoxReader | None:
        """The started reader of every device, or None when NVML sees one GPU (not in MIG
        mode): the caller then keeps the one-device reader. Raises GpuInitError."""

        def plan() -> list[tuple[int, int | None]]:
            nvml.nvmlInit()
            try:
                out: list[tuple[int, int | None]] = []
                for i in range(device_count(nvml)):
                    slots = _mig_handles(nvml, i)
                    out += [(i, s) for s in slots] if slots else [(i, None)]
                return out
            finally:
                nvml.nvmlShutdown()

        try:
            devices = await asyncio.to_thread(plan)
        except pynvml.NVMLError as exc:
            raise GpuInitError(f"NVML cannot list the GPUs: {exc}") from exc
        if len(devices) <= 1:
            return None
        readers = [
            NvmlReader(
                i,
                total_cap_mib,
                nvml,
                proc_root=proc_root,
                handle_of=None if s is None else _mig(i, s),
            )
            for i, s in devices
        ]
        started: list[NvmlReader] = []
        try:
            for reader in readers:
                await reader.start()
                started.append(reader)
        except GpuInitError:
            for reader in started:
                await reader.aclose()
            raise
        box = cls(readers)
        log.info("nvml: %d devices: %s", len(readers), ", ".join(box.device_uuids))
        return box

    @property
    def device_uuids(self) -> tuple[str, ...]:
        return tuple(r.uuid or f"GPU-{i}" for i, r in enumerate(self._readers))

    @property
    def total_mib(self) -> int:
        return sum(r.total_mib for r in self._readers)

    async def read(self) -> GpuReading:
        readings = [await r.read() for r in self._readers]
        failed = next((r.error for r in readings if not r.ok), None)
        devices = tuple(
            DeviceReading(
                uuid,
                i,
                r.device,
                r.total_mib,
                r.used_mib,
                r.free_mib,
                r.utilization_pct,
                tuple(DeviceProcess(p.pid, p.name, p.used_mib) for p in r.processes),
            )
            for i, (uuid, r) in enumerate(zip(self.device_uuids, readings, strict=True))
        )
        total = sum(r.total_mib for r in readings)
        if failed is not None:
            reading = GpuReading.without_figures(self.backend, self._name(), total, error=failed)
            return dataclasses.replace(reading, devices=devices)
        utils = [r.utilization_pct for r in readings if r.utilization_pct is not None]
        return GpuReading(
            backend=self.backend,
            device=self._name(),
            total_mib=total,
            used_mib=sum(r.used_mib or 0 for r in readings),
            free_mib=sum(r.free_mib or 0 for r in readings),
            utilization_pct=max(utils) if utils else None,
            processes=tuple(p for r in readings for p in r.processes),
            devices=devices,
        )

    def _name(self) -> str:
        return f"{len(self._readers)} GPUs"

    async def aclose(self) -> None:
        for reader in self._readers:
            await reader.aclose()
