"""The order of the scheduler's jobs: policy `priority` (DESIGN §3, issue 5) or `fifo`.

SchedulerCore (scheduler.py) keeps the queue and the lease and asks `_pick` for the next job;
this base class holds the rules, reading the core's state and never changing it.

Order (policy `priority`):
- level = min(4, priority + ⌊waited / aging_s⌋), priority 0..4 from the consumer or the clamped
  X-Priority. The plain order: higher level first; within a level, whoever reached it first (an
  aged job when it aged into it, so it passes newer jobs but not urgent ones there before it).
- Swap affinity: the holder's next job may pass other consumers' jobs of the same or a lower
  priority (never a higher one), whatever their aged level, while the tenure has made fewer than
  `max_batch` grants and no passed job has been held back `affinity_wait_s`. Held back counts
  from when the tenure's first job finished (its swap and a lazy load are part of that job), or
  from the job's arrival if later: each tenure gets a fresh window, as a batch does in Linux
  mq-deadline, so batching survives a backlog older than the window.
- A new tenure goes to the first of the other consumers' best-level jobs whose deadline
  (`affinity_wait_s`) has passed; else, among those of the highest priority, to a resident
  consumer's, else to the cheapest measured swap, else to the first.
- Swap costs (`schedule(resident, swap_cost_s)`, per consumer its last unload + load): a
  tenure's window is at most SWAP_AMORTIZATION x its consumer's cost.

No starvation: a job of priority p is granted within
max((4 - p) * aging_s, affinity_wait_s) + R * (c + 2 * max_queue * max_batch), R the longest a
granted job holds the lease (its swap included), c the largest max_concurrency; derived and
checked on random traces in tests/test_scheduler_properties.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass

from .clock import Clock
from .config import SchedulerConfig

MAX_PRIORITY = 4
# A tenure holds others back for at most this many times its consumer's measured swap cost (and
# never longer than affinity_wait_s): a swap then costs at most ~1/(1+8) of the time batched.
SWAP_AMORTIZATION = 8.0


@dataclass
class QueuedJob:
    id: int
    consumer: str
    priority: int
    enqueued_at: float
    exclusive: bool = False
    started_at: float | None = None
    ready: bool = False


class PriorityOrder:
    """The rules; SchedulerCore provides the state below."""

    _settings: SchedulerConfig
    _clock: Clock
    _waiting: dict[int, QueuedJob]  # insertion order == arrival order
    _holder: str | None
    _window_opened_at: float | None
    _tenure_grants: int

    def _pick(self, resident: Set[str], costs: Mapping[str, float]) -> QueuedJob:
        jobs = list(self._waiting.values())  # arrival order
        if self._settings.policy == "fifo":
            return jobs[0]
        now = self._clock.now()
        level = {j.id: self._level(j, now) for j in jobs}
        # The plain order: higher level first; within a level, who reached it first (a job at
        # its own priority reached it when it came; an aged one when it aged into it).
        order = sorted(jobs, key=lambda j: (-level[j.id], self._reached(j, level[j.id])))
        top = [j for j in order if level[j.id] == level[order[0].id]]
        others_top = [j for j in top if j.consumer != self._holder]
        for i, mine in enumerate(order):
            if mine.consumer == self._holder:
                passed = order[:i]  # all of other consumers
                contested = others_top if level[mine.id] == level[top[0].id] else passed
                if self._may_hold(mine, passed, contested, now, costs):
                    return mine  # the tenure goes on: a swap saved
                break
        return self._next_tenure(others_top, now, resident, costs)

    def _may_hold(
        self,
        mine: QueuedJob,
        passed: list[QueuedJob],
        contested: list[QueuedJob],
        now: float,
        costs: Mapping[str, float],
    ) -> bool:
        """Whether the holder may take `mine`, its first job in the plain order, passing
        `passed` (the jobs of other consumers ahead of it) while `contested` (those and the
        others at its level) wait: the bounds of swap affinity."""
        if not contested:
            return True  # first in line anyway, and nobody else waits at its level
        if self._tenure_grants >= self._settings.max_batch:
            return False
        if any(o.priority > mine.priority for o in passed):
            # Affinity passes jobs of the same or a lower priority only. Aging lifted them so
            # that they do not starve (the bounds below still hold for them); it does not
            # put a lower-priority consumer's batch ahead of a higher-priority job.
            return False
        if self._window_opened_at is None:
            return True  # the tenure's first job still runs: the lease is not free anyway
        # Held back by this tenure's affinity: since its first job finished (its swap and a lazy
        # load are done by then) or since the job came, whichever is later. Like mq-deadline,
        # which checks expiry when a batch starts, a new tenure gets a fresh window, so
        # batching survives a backlog older than the window.
        oldest = min(o.enqueued_at for o in contested)
        held_back_s = now - max(oldest, self._window_opened_at)
        return held_back_s < self.affinity_window_s(self._holder, costs)

    def affinity_window_s(
        self, consumer: str | None, swap_cost_s: Mapping[str, float] | None = None
    ) -> float:
        """How long a tenure of `consumer` may hold others back: `affinity_wait_s`, shortened
        to SWAP_AMORTIZATION x its measured swap cost when that is less. Holding others back
        longer than that buys little: the swap it saves is then a small part of the time."""
        window = self._settings.affinity_wait_s
        cost = known_costs(swap_cost_s).get(consumer) if consumer is not None else None
        if cost is not None:
            window = min(window, SWAP_AMORTIZATION * cost)
        return window

    def _next_tenure(
        self,
        candidates: list[QueuedJob],
        now: float,
        resident: Set[str],
        costs: Mapping[str, float],
    ) -> QueuedJob:
        """The first job of a new tenure, among the other consumers' jobs at the best level, in
        plain order."""
        for j in candidates:
            if now - j.enqueued_at >= self._settings.affinity_wait_s:
                return j  # its deadline has passed: no preference may pass it again
        # Preferences only among the jobs there by the highest priority of their own. (Reaching
        # below the best level for a resident consumer of the same priority saved ~1 % of
        # makespan and raised p95 waits by up to 13 % in bench/sched_model.py: not kept.)
        base = max(j.priority for j in candidates)
        peers = [j for j in candidates if j.priority == base]
        for j in peers:
            if j.consumer in resident:
                return j  # resident: no swap
        # All cold: the cheapest known swap first (shortest setup first lowers the mean wait;
        # the deadline above bounds the detour). min() keeps the plain order among equals.
        return min(peers, key=lambda j: costs.get(j.consumer, math.inf))

    def _reached(self, job: QueuedJob, level: int) -> float:
        """When the job reached `level`: its arrival at its own priority, later when aged."""
        return job.enqueued_at + max(0, level - job.priority) * self._settings.aging_s

    def _level(self, job: QueuedJob, now: float) -> int:
        aged = int((now - job.enqueued_at) // self._settings.aging_s)
        return min(MAX_PRIORITY, job.priority + aged)


def known_costs(swap_cost_s: Mapping[str, float] | None) -> dict[str, float]:
    """The usable figures only: a missing, negative or non-finite cost is unknown."""
    if not swap_cost_s:
        return {}
    return {n: s for n, s in swap_cost_s.items() if math.isfinite(s) and s >= 0}
