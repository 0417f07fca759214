"""Eviction on a box with several GPUs: a pure function, no I/O, no clock.

`plan_on_devices` answers "what must be unloaded before `target` can load on every device it
uses?": one plan per device of the target (planner.plan_eviction with that device's headroom,
capacity and its residents' cost there), the union of their victims, and then every victim that
no device needs is dropped again (a victim of one card's plan may have made room on a card
whose own plan did not need it, or be needed by none once the others are counted). Devices the
target does not use are never looked at, so nothing on them is evicted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mgpumanager.residency.planner import CannotFit, Evict, Resident, plan_eviction


def plan_on_devices(
    *,
    target: str,
    need_mib: Mapping[str, int],
    headroom_mib: Mapping[str, int],
    capacity_mib: Mapping[str, int],
    residents: Mapping[str, Sequence[Resident]],
) -> Evict | CannotFit:
    """`need_mib`: per device of the target, what it needs there; the other mappings have the
    same devices (residents: each with its cost on that device). Victims come back in the
    order the per-device plans chose them, each once."""
    victims: list[str] = []
    for device, need in need_mib.items():
        plan = plan_eviction(
            target=target,
            target_cost_mib=need,
            headroom_mib=headroom_mib[device],
            capacity_mib=capacity_mib[device],
            residents=residents.get(device, ()),
        )
        if isinstance(plan, CannotFit):
            return CannotFit(f"{plan.reason} (on {device})", plan.retryable)
        victims += [v for v in plan.victims if v not in victims]

    def cost(device: str, name: str) -> int:
        return sum(r.cost_mib for r in residents.get(device, ()) if r.name == name)

    def enough(chosen: Sequence[str]) -> bool:
        return all(
            headroom_mib[d] + sum(cost(d, v) for v in chosen) >= need
            for d, need in need_mib.items()
        )

    for victim in reversed(list(victims)):
        rest = [v for v in victims if v != victim]
        if enough(rest):
            victims = rest
    freed = sum(cost(d, v) for d in need_mib for v in victims)
    return Evict(tuple(victims), freed)
