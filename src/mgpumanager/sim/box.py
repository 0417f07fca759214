"""A simulated box with several cards: one `SimGPU` ledger per device, read as one.

`GET /v1/gpu` on such a box (``gpu_app(..., box=...)``) answers the sums, as a one-card reader
sees them, plus ``devices``: each card's figures and processes, keyed by a UUID in NVML's
form. Each fake allocates on the card it is bound to (``start_cluster(gpus=N, devices=...)``),
so an out-of-memory is counted on the card where it happened.
"""

from __future__ import annotations

from typing import Any

from mgpumanager.sim.gpu import SimGPU


def sim_uuid(index: int) -> str:
    return f"GPU-sim-{index:04d}"


class SimBox:
    def __init__(self, cards: list[SimGPU]) -> None:
        if not cards:
            raise ValueError("a box needs at least one card")
        self.cards = cards

    @property
    def uuids(self) -> list[str]:
        return [sim_uuid(i) for i in range(len(self.cards))]

    @property
    def oom_count(self) -> int:
        return sum(c.oom_count for c in self.cards)

    @property
    def total_mib(self) -> int:
        return sum(c.total_mib for c in self.cards)

    def snapshot(self) -> dict[str, Any]:
        shots = [c.snapshot() for c in self.cards]
        return {
            "name": f"{len(self.cards)} simulated GPUs",
            "total_mib": sum(s["total_mib"] for s in shots),
            "used_mib": sum(s["used_mib"] for s in shots),
            "free_mib": sum(s["free_mib"] for s in shots),
            "utilization_pct": max(s["utilization_pct"] for s in shots),
            "peak_used_mib": sum(s["peak_used_mib"] for s in shots),
            "oom_count": sum(s["oom_count"] for s in shots),
            "processes": [p for s in shots for p in s["processes"]],
            "devices": [{"uuid": sim_uuid(i), "index": i, **s} for i, s in enumerate(shots)],
        }
