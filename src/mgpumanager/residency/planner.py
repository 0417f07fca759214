"""The eviction planner (docs/residency.md): a pure function, no I/O, no clock.

`plan_eviction` answers "what must be unloaded before `target` can load?":

- `CannotFit(retryable=False)` when the target needs more than the usable capacity;
- `Evict(())` when it fits the headroom already;
- else the victims: residents that are neither pinned, nor busy, nor the target, taken in the
  eviction order (those that may NOT coexist with the target first, each group least recently
  used first, ties by name) until there is room; then every victim that turned out unnecessary
  is dropped again, the most recently used / coexistent first, so that each victim left is
  needed;
- `CannotFit` when even every candidate is not enough. That is retryable: what holds the
  memory (a busy or pinned resident, or a process of no consumer — a training run, a game)
  lets go in time. Only a target larger than the usable capacity can never fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    name: str
    cost_mib: int  # max(declared, measured): the caller decides
    last_used: float  # clock seconds; smaller is less recently used
    pinned: bool = False
    busy: bool = False  # a job in flight (or work the broker did not send)
    why_busy: str = "busy"  # how messages say it: a job in flight is not an unconfirmed unload
    coexists: bool = False  # may stay resident together with the target


@dataclass(frozen=True)
class Evict:
    victims: tuple[str, ...]  # in unload order; () when the target fits already
    freed_mib: int


@dataclass(frozen=True)
class CannotFit:
    reason: str
    retryable: bool


def eviction_order(resident: Resident) -> tuple[bool, float, str]:
    """Sort key: non-coexistent before coexistent, then least recently used, then by name."""
    return (resident.coexists, resident.last_used, resident.name)


def plan_eviction(
    *,
    target: str,
    target_cost_mib: int,
    headroom_mib: int,
    capacity_mib: int,
    residents: Sequence[Resident],
) -> Evict | CannotFit:
    """Victims to unload so that `target_cost_mib` fits, or why it cannot.

    `capacity_mib` is the GPU total less the safety margin; `headroom_mib` what is free now
    (already less the margin; may be negative). Resident names must be unique.
    """
    names = [r.name for r in residents]
    if len(set(names)) != len(names):
        raise ValueError(f"resident names must be unique, got {sorted(names)}")
    if target_cost_mib > capacity_mib:
        return CannotFit(
            f"{target!r} needs {target_cost_mib} MiB but the GPU has only {capacity_mib} MiB "
            "usable (total less the safety margin): it can never fit",
            retryable=False,
        )
    if target_cost_mib <= headroom_mib:
        return Evict((), 0)
    need_mib = target_cost_mib - headroom_mib
    others = [r for r in residents if r.name != target]
    candidates = sorted((r for r in others if not (r.pinned or r.busy)), key=eviction_order)

    victims: list[Resident] = []
    freed_mib = 0
    for r in candidates:
        if freed_mib >= need_mib:
            break
        victims.append(r)
        freed_mib += r.cost_mib
    if freed_mib < need_mib:
        return _cannot_fit(target, target_cost_mib, headroom_mib, freed_mib, candidates, others)

    # Drop the victims that are not needed after all, the last taken (the most recently used,
    # the coexistent) first. One pass is enough: `freed_mib` only shrinks, so a victim found
    # necessary stays necessary.
    for r in reversed(list(victims)):
        if freed_mib - r.cost_mib >= need_mib:
            victims.remove(r)
            freed_mib -= r.cost_mib
    return Evict(tuple(r.name for r in victims), freed_mib)


def _cannot_fit(
    target: str,
    target_cost_mib: int,
    headroom_mib: int,
    candidates_mib: int,
    candidates: Sequence[Resident],
    others: Sequence[Resident],
) -> CannotFit:
    blockers = sorted((r for r in others if r.pinned or r.busy), key=lambda r: r.name)
    blocked_mib = sum(r.cost_mib for r in blockers)
    best_mib = headroom_mib + candidates_mib
    evictable = f" after evicting {_list(candidates)}" if candidates else ""
    reason = f"{target!r} needs {target_cost_mib} MiB; {best_mib} MiB could be free{evictable}"
    if blockers and best_mib + blocked_mib >= target_cost_mib:
        in_the_way = ", ".join(
            f"{r.name!r} ({r.cost_mib} MiB, {r.why_busy if r.busy else 'pinned'})" for r in blockers
        )
        return CannotFit(f"{reason}; in the way: {in_the_way}", retryable=True)
    if blockers:
        reason += f"; busy or pinned {_list(blockers)} hold {blocked_mib} MiB"
    return CannotFit(f"{reason}; the rest is held outside the broker's consumers", retryable=True)


def _list(residents: Iterable[Resident]) -> str:
    return ", ".join(f"{r.name!r} ({r.cost_mib} MiB)" for r in residents)
