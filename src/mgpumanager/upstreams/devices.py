"""The cards of a box: one reading per device, and which devices each consumer is bound to.

A device is keyed by its NVML UUID (`GPU-…`; a MIG instance is a device of its own, `MIG-…`).
The NVML index orders devices by PCI bus, which is not always CUDA's order (CUDA puts the
fastest first unless `CUDA_VISIBLE_DEVICES`/`CUDA_DEVICE_ORDER=PCI_BUS_ID` say otherwise): the
registry's `devices: [0, 1]` means NVML indices, the order `nvidia-smi` shows (docs/multi-gpu.md).

`binding(config, uuids)` resolves every consumer's `devices:` to a set of UUIDs (every device
when it declares none); `misplaced(...)` names the devices a consumer's processes were found on
that it did not declare (reported in status and events, never silently accepted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mgpumanager.registry import Config, ConsumerConfig


@dataclass(frozen=True)
class DeviceProcess:
    pid: int | None
    name: str
    used_mib: int | None


@dataclass(frozen=True)
class DeviceReading:
    """One card (or MIG instance): its figures, or None where the reader has none (static)."""

    uuid: str
    index: int
    name: str
    total_mib: int
    used_mib: int | None = None
    free_mib: int | None = None
    utilization_pct: int | None = None
    processes: tuple[DeviceProcess, ...] = ()


SINGLE_UUID = "GPU-0"  # the key of the one device of a reader that names none


def resolve(ref: int | str, uuids: Sequence[str]) -> str | None:
    """An index or UUID of the registry's `devices:` as a UUID; None when the box has none such.
    On a box of one card whose UUID the reader does not name, any UUID means that card."""
    if isinstance(ref, int):
        return uuids[ref] if 0 <= ref < len(uuids) else None
    if list(uuids) == [SINGLE_UUID]:
        return SINGLE_UUID
    return ref if ref in uuids else None


def consumer_devices(consumer: ConsumerConfig, uuids: Sequence[str]) -> frozenset[str]:
    """The UUIDs `consumer` is bound to: its `devices:` (unknown ones left out: `check-config`
    refuses them where it can read the GPU), every device when it declares none, or when none
    of those it names exists here (the safe side: it may use any card)."""
    if consumer.devices is None:
        return frozenset(uuids)
    found = {u for ref in consumer.devices if (u := resolve(ref, uuids)) is not None}
    return frozenset(found) if found else frozenset(uuids)


def binding(config: Config, uuids: Sequence[str]) -> dict[str, frozenset[str]]:
    """Every consumer's device set."""
    return {name: consumer_devices(c, uuids) for name, c in config.consumers.items()}


def unknown_refs(consumer: ConsumerConfig, uuids: Sequence[str]) -> list[int | str]:
    """The entries of `consumer.devices` that name no device of this box."""
    return [ref for ref in consumer.devices or () if resolve(ref, uuids) is None]


def unknown_bindings(config: Config, uuids: Sequence[str]) -> list[str]:
    """One line per `devices:` entry that names no device of this box (`check-config` refuses
    them where it reads the GPU; the broker warns and binds such a consumer to every device)."""
    return [
        f"consumers.{name}.devices: no GPU {ref!r} on this box "
        f"(indices 0..{len(uuids) - 1}; UUIDs {', '.join(uuids)})"
        for name, c in config.consumers.items()
        for ref in unknown_refs(c, uuids)
    ]


def misplaced(
    patterns: Iterable[str], bound: frozenset[str], devices: Sequence[DeviceReading]
) -> list[str]:
    """UUIDs of devices outside `bound` where a process matching `patterns` holds memory."""
    pats = list(patterns)
    if not pats:
        return []
    return [
        d.uuid
        for d in devices
        if d.uuid not in bound and any(any(p in proc.name for p in pats) for proc in d.processes)
    ]


def measured_on(patterns: Iterable[str], device: DeviceReading) -> int | None:
    """What the processes matching `patterns` hold on `device`; None when none is known."""
    pats = list(patterns)
    known = [
        p.used_mib
        for p in device.processes
        if p.used_mib is not None and any(pat in p.name for pat in pats)
    ]
    return sum(known) if pats and known else None


def totals(devices: Sequence[DeviceReading]) -> Mapping[str, int]:
    return {d.uuid: d.total_mib for d in devices}
