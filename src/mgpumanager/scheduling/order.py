"""The order of the scheduler's jobs: which waiting job the lease goes to next.

SchedulerCore (core.py) keeps the queue and the lease; for each pick it hands an `Order` a
`QueueView`, a read-only view of what the order may look at, and takes back the job to start.
Two orders exist, chosen by the `scheduler.policy` setting: `fifo` (plain arrival order, the
baseline the benchmark compares against) and `priority`, the default, below.

Jobs of one consumer at one priority always go in arrival order (both orders keep it), so an
order sees only the oldest waiting job of each (consumer, priority) class, its head: a pick
costs the same with 10 jobs waiting as with 10,000.

Order (policy `priority`):
- level = min(4, priority + ⌊waited / aging_s⌋), priority 0..4 from the consumer or the clamped
  X-Priority. The plain order: higher level first; within a level, whoever reached it first (an
  aged job when it aged into it, so it passes newer jobs but not urgent ones there before it).
- Swap affinity: the holder's next job may pass other consumers' jobs of the same or a lower
  priority (never a higher one), whatever their aged level, while the tenure has made fewer than
  `max_batch` grants and no passed job has been held back longer than the tenure's window.
  Held back counts from when the tenure's first job finished (its swap and a lazy load are part
  of that job), or from the job's arrival if later: each tenure gets a fresh window, as a batch
  does in Linux mq-deadline, so batching survives a backlog older than the window.
- The window follows the load (`affinity_window_s`): BACKLOG_FACTOR x the work queued for the
  other consumers (their jobs waiting x each consumer's recent run time), and at most
  SWAP_AMORTIZATION x the swap it saves (the holder's measured cost plus the next consumer's).
  Under light load the others' queue is a job or two, so the window is a few seconds and the
  passed job waits about as long as its own run; under a backlog the others wait for that work
  anyway, the window grows with it, and the saved swaps shorten everyone's wait.
  `affinity_wait_s` caps the window (and is the window while a waiting consumer's run time is
  unknown).
- A new tenure goes to the first of the other consumers' best-level jobs that has waited past
  the deadline (BACKLOG_FACTOR x all the queued work, at most `affinity_wait_s`); else, among
  those of the highest priority, to a resident consumer's, else to the cheapest measured swap,
  else to the first.
- Swap costs (`schedule(resident, swap_cost_s)`): per consumer its last unload + load, and
  what its first job after a swap runs longer than the others (ComfyUI loads inside it).

No starvation: the window and the deadline never exceed `affinity_wait_s` and a tenure never
exceeds `max_batch` grants while others wait, so a job of priority p is granted within
max((4 - p) * aging_s, affinity_wait_s) + R * (c + 2 * max_queue * max_batch), R the longest a
granted job holds the lease (its swap included), c the largest max_concurrency; derived and
checked on random traces in tests/scheduling/test_core_properties.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

from mgpumanager.registry import SchedulerConfig

MAX_PRIORITY = 4
# A tenure holds others back for at most this many times the swap it saves (the holder's
# measured cost plus the next consumer's): a swap then costs at most ~1/(1+8) of the time batched.
SWAP_AMORTIZATION = 8.0
# A tenure holds others back for at most this many times the work queued for them, and a job
# that has waited this many times all the queued work gets the next tenure. Chosen on
# bench/sched_model.py's traces: 1x gave 5-10 % longer makespans under overload, 3x longer
# p95 waits under a busy closed loop than the old fixed 10 s window.
BACKLOG_FACTOR = 2.0


@dataclass(frozen=True)
class QueuedJob:
    id: int
    consumer: str
    priority: int  # 0..MAX_PRIORITY, clamped when queued
    enqueued_at: float
    exclusive: bool = False
    label: str = ""  # what the job is (its route, or `admin unload`), for status and events
    # What its consumer must load for it, where known (the prefetch reads these ahead): the
    # model of a per-model consumer, and the weight files its body names (ComfyUI loaders).
    model: str | None = None
    weights: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueueView:
    """What an order may read to choose the next job; a view, never changed by the order."""

    # The oldest waiting job of each (consumer, priority) class, in no particular order; never
    # empty. A class's other jobs came later and go after its head in either order.
    heads: Sequence[QueuedJob]
    queued: Mapping[str, int]  # jobs waiting, per consumer (those with any)
    run_s: Mapping[str, float]  # per consumer, its recent run time; missing: unknown
    holder: str | None  # the last consumer granted the lease (kept while nothing runs)
    # When the holder's first job of this tenure finished (None while it runs): from then on,
    # every further grant to the holder is affinity holding the others back.
    window_opened_at: float | None
    tenure_grants: int  # grants since the holder's tenure began
    now: float
    resident: Set[str]  # consumers whose weights are in VRAM now
    swap_cost_s: Mapping[str, float]  # usable figures only (known_costs)
    settings: SchedulerConfig

    def queued_work_s(self, *, besides: str | None = None) -> float | None:
        """The run time of the jobs waiting (those of `besides` left out), from each consumer's
        recent run time; None when a waiting consumer's is unknown."""
        total = 0.0
        for consumer, count in self.queued.items():
            if consumer == besides:
                continue
            run_s = self.run_s.get(consumer)
            if run_s is None:
                return None
            total += count * run_s
        return total


class Order(Protocol):
    """Chooses the next job to start among the waiting ones."""

    @property
    def name(self) -> str:
        """The `scheduler.policy` value this order stands for (reported in the status)."""
        ...

    def pick(self, queue: QueueView) -> QueuedJob:
        """One of `queue.heads`; reads the view, changes nothing."""
        ...


class FifoOrder:
    """Plain arrival order: ignores priorities, residency and swap costs."""

    name = "fifo"

    def pick(self, queue: QueueView) -> QueuedJob:
        return min(queue.heads, key=lambda j: j.id)  # ids follow arrival


class PriorityOrder:
    """Priorities with aging, swap affinity within bounds that follow the load, then residency
    and swap costs (the module docstring has the rules)."""

    name = "priority"

    def pick(self, queue: QueueView) -> QueuedJob:
        settings = queue.settings
        level = {j.id: self.level(j, queue.now, settings) for j in queue.heads}
        # The plain order: higher level first; within a level, who reached it first (a job at
        # its own priority reached it when it came; an aged one when it aged into it); then
        # arrival. Each head stands for its class, whose other jobs come after it.
        order = sorted(
            queue.heads,
            key=lambda j: (-level[j.id], self.reached(j, level[j.id], settings), j.id),
        )
        top = [j for j in order if level[j.id] == level[order[0].id]]
        others_top = [j for j in top if j.consumer != queue.holder]
        for i, mine in enumerate(order):
            if mine.consumer == queue.holder:
                passed = order[:i]  # all of other consumers
                contested = others_top if level[mine.id] == level[top[0].id] else passed
                if self.may_hold(mine, passed, contested, queue):
                    return mine  # the tenure goes on: a swap saved
                break
        return self.next_tenure(others_top, queue)

    def may_hold(
        self,
        mine: QueuedJob,
        passed: list[QueuedJob],
        contested: list[QueuedJob],
        queue: QueueView,
    ) -> bool:
        """Whether the holder may take `mine`, its first job in the plain order, passing
        `passed` (the heads of other consumers' classes ahead of it) while `contested` (those,
        or the others' heads at its level) wait: the bounds of swap affinity."""
        if not contested:
            return True  # first in line anyway, and nobody else waits at its level
        if queue.tenure_grants >= queue.settings.max_batch:
            return False
        if any(o.priority > mine.priority for o in passed):
            # Affinity passes jobs of the same or a lower priority only. Aging lifted them so
            # that they do not starve (the bounds below still hold for them); it does not
            # put a lower-priority consumer's batch ahead of a higher-priority job.
            return False
        if queue.window_opened_at is None:
            return True  # the tenure's first job still runs: the lease is not free anyway
        # Held back by this tenure's affinity: since its first job finished (its swap and a lazy
        # load are done by then) or since the job came, whichever is later. Like mq-deadline,
        # which checks expiry when a batch starts, a new tenure gets a fresh window, so
        # batching survives a backlog older than the window.
        oldest = min(o.enqueued_at for o in contested)
        held_back_s = queue.now - max(oldest, queue.window_opened_at)
        return held_back_s < affinity_window_s(queue, contested[0].consumer)

    def next_tenure(self, candidates: list[QueuedJob], queue: QueueView) -> QueuedJob:
        """The first job of a new tenure, among the other consumers' heads at the best level, in
        plain order."""
        deadline_s = deadline_s_of(queue)
        for j in candidates:
            if queue.now - j.enqueued_at >= deadline_s:
                return j  # its deadline has passed: no preference may pass it again
        # Preferences only among the jobs there by the highest priority of their own. (Reaching
        # below the best level for a resident consumer of the same priority saved ~1 % of
        # makespan and raised p95 waits by up to 13 % in bench/sched_model.py: not kept.)
        base = max(j.priority for j in candidates)
        peers = [j for j in candidates if j.priority == base]
        for j in peers:
            if j.consumer in queue.resident:
                return j  # resident: no swap
        # All cold: the cheapest known swap first (shortest setup first lowers the mean wait;
        # the deadline above bounds the detour). min() keeps the plain order among equals.
        return min(peers, key=lambda j: queue.swap_cost_s.get(j.consumer, math.inf))

    def reached(self, job: QueuedJob, level: int, settings: SchedulerConfig) -> float:
        """When the job reached `level`: its arrival at its own priority, later when aged."""
        return job.enqueued_at + max(0, level - job.priority) * settings.aging_s

    def level(self, job: QueuedJob, now: float, settings: SchedulerConfig) -> int:
        """The job's priority, raised one level per `aging_s` waited, at most MAX_PRIORITY."""
        aged = int((now - job.enqueued_at) // settings.aging_s)
        return min(MAX_PRIORITY, job.priority + aged)


FIFO = FifoOrder()
PRIORITY = PriorityOrder()
ORDERS: Mapping[str, Order] = {FIFO.name: FIFO, PRIORITY.name: PRIORITY}


def affinity_window_s(queue: QueueView, next_consumer: str | None) -> float:
    """How long the holder's tenure may hold the other consumers' jobs back, with
    `next_consumer` first in line after it: BACKLOG_FACTOR x the work queued for the others,
    at most SWAP_AMORTIZATION x the swap it saves (the holder's measured cost plus the next
    consumer's, nothing when it is resident), never more than `affinity_wait_s`."""
    window = queue.settings.affinity_wait_s
    work_s = queue.queued_work_s(besides=queue.holder)
    if work_s is not None:
        window = min(window, BACKLOG_FACTOR * work_s)
    holder_cost = queue.swap_cost_s.get(queue.holder) if queue.holder is not None else None
    if next_consumer is not None and next_consumer in queue.resident:
        next_cost: float | None = 0.0
    else:
        next_cost = queue.swap_cost_s.get(next_consumer) if next_consumer is not None else None
    if holder_cost is not None and next_cost is not None:
        window = min(window, SWAP_AMORTIZATION * (holder_cost + next_cost))
    return window


def deadline_s_of(queue: QueueView) -> float:
    """How long a job may wait before the next tenure must be its own (or an older job's):
    BACKLOG_FACTOR x all the work queued, never more than `affinity_wait_s`."""
    work_s = queue.queued_work_s()
    if work_s is None:
        return queue.settings.affinity_wait_s
    return min(queue.settings.affinity_wait_s, BACKLOG_FACTOR * work_s)


def known_costs(swap_cost_s: Mapping[str, float] | None) -> dict[str, float]:
    """The usable figures only: a missing, negative or non-finite cost is unknown."""
    if not swap_cost_s:
        return {}
    return {n: s for n, s in swap_cost_s.items() if math.isfinite(s) and s >= 0}
