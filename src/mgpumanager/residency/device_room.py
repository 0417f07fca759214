"""Room per device on a box with several GPUs: each consumer's cost on each card, each card's
headroom, and the per-device eviction plan (residency/per_device.py) built from the view.

A consumer's cost on a device is what the GPU reading attributes to its processes there where
the reader can tell (NVML, the simulated GPU); without per-process figures (static backend, a
consumer not loaded yet) it is its whole cost on every device it is bound to, the safe side:
Ollama, spanning several cards, puts a model on whichever card it likes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mgpumanager.residency.per_device import plan_on_devices
from mgpumanager.residency.planner import CannotFit, Evict, Resident
from mgpumanager.residency.records import HOLDS_MEMORY
from mgpumanager.upstreams.devices import DeviceReading, measured_on, misplaced
from mgpumanager.upstreams.gpu import GpuReading, devices_of

if TYPE_CHECKING:
    from mgpumanager.residency.view import ResidencyView

UNIT_SEPARATOR = "/"


def device_reading(reading: GpuReading, uuid: str) -> DeviceReading | None:
    return next((d for d in devices_of(reading) if d.uuid == uuid), None)


def cost_on(view: ResidencyView, name: str, uuid: str, reading: GpuReading) -> int:
    """What `name` holds (or would hold) on device `uuid`."""
    record = view.records[name]
    patterns = view.config.consumers[name].gpu_processes
    device = device_reading(reading, uuid)
    if reading.ok and patterns and device is not None and record.measured_mib:
        return measured_on(patterns, device) or 0  # the card's own word, wherever it is
    return record.cost_mib if uuid in view.bound[name] else 0


def total_on(reading: GpuReading, uuid: str, fallback: int) -> int:
    device = device_reading(reading, uuid)
    return device.total_mib if device is not None else fallback


def headroom_on(
    view: ResidencyView, reading: GpuReading, uuid: str, exclude: str | None = None
) -> int:
    """min(free on the card, its total - what residents hold there) - margin."""
    device = device_reading(reading, uuid)
    total = device.total_mib if device is not None else view.total_mib
    held = sum(
        cost_on(view, name, uuid, reading)
        for name, r in view.records.items()
        if r.state in HOLDS_MEMORY and name != exclude
    )
    free = device.free_mib if device is not None and reading.ok else None
    by_accounting = total - held
    headroom = by_accounting if free is None else min(free, by_accounting)
    return headroom - view.config.gpu.safety_margin_mib


def residents_on(
    view: ResidencyView, reading: GpuReading, uuid: str, units: Sequence[Resident]
) -> list[Resident]:
    """The planner's units that hold memory on `uuid`, each with its cost there (a model of a
    consumer spanning cards: at most what the consumer holds on this one)."""
    out = []
    for unit in units:
        consumer = unit.name.split(UNIT_SEPARATOR, 1)[0]
        here = cost_on(view, consumer, uuid, reading)
        if here > 0:
            cost = min(unit.cost_mib, here) if UNIT_SEPARATOR in unit.name else here
            out.append(dataclasses.replace(unit, cost_mib=cost))
    return out


def plan(
    view: ResidencyView,
    reading: GpuReading,
    target: str,
    need: int,
    exclude: str | None,
    units: Sequence[Resident],
) -> Evict | CannotFit:
    """Victims so that `target` fits on every device it is bound to (its whole `need` on each:
    where it lands is its own choice)."""
    devices = sorted(view.bound[target])
    margin = view.config.gpu.safety_margin_mib
    return plan_on_devices(
        target=target,
        need_mib={d: need for d in devices},
        headroom_mib={d: headroom_on(view, reading, d, exclude) for d in devices},
        capacity_mib={d: total_on(reading, d, view.total_mib) - margin for d in devices},
        residents={d: residents_on(view, reading, d, units) for d in devices},
    )


def device_figures(view: ResidencyView, reading: GpuReading) -> list[dict[str, object]]:
    """Per device, for `/v1/status.gpus`: its figures, headroom, the consumers bound to it, what
    each holds there, and the consumers whose processes sit on it undeclared."""
    out: list[dict[str, object]] = []
    for device in devices_of(reading):
        uuid = device.uuid
        holding = {
            name: cost_on(view, name, uuid, reading)
            for name, r in view.records.items()
            if r.state in HOLDS_MEMORY
        }
        out.append(
            {
                "uuid": uuid,
                "index": device.index,
                "name": device.name,
                "total_mib": device.total_mib,
                "used_mib": device.used_mib,
                "free_mib": device.free_mib,
                "headroom_mib": headroom_on(view, reading, uuid),
                "consumers": sorted(n for n, b in view.bound.items() if uuid in b),
                "vram_mib": {n: mib for n, mib in sorted(holding.items()) if mib > 0},
                "undeclared": sorted(
                    n for n in view.records if uuid in misplaced_devices(view, n, reading)
                ),
            }
        )
    return out


def misplaced_devices(view: ResidencyView, name: str, reading: GpuReading) -> list[str]:
    """Devices where `name`'s processes hold memory though it did not declare them."""
    if not reading.ok or not view.multi_device:
        return []
    return misplaced(
        view.config.consumers[name].gpu_processes, view.bound[name], devices_of(reading)
    )
