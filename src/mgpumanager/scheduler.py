"""The scheduler core: one lease for the whole GPU, decided without any I/O.

It owns the queue, the lease holder and the statistics. Callers tell it what happened
(`submit`, `cancel`, `ready`, `finish`) and ask it what to start (`schedule`); it never awaits,
never sleeps and never reads a clock except the injected one, so every decision is tested step
by step with a fake clock (tests/test_scheduler.py).

Lease rules (DESIGN §3):
- one consumer holds the lease at a time; it may run up to its `max_concurrency` jobs at once;
- a grant that starts a tenure (nobody in flight) has `prepare=True`: the caller makes the
  consumer resident, then calls `ready()`. Until then nothing else is granted, because residency
  changes must happen while no other job runs;
- when the policy's next pick belongs to another consumer, the holder gets no more grants and the
  lease passes once its jobs in flight have finished (drain, then hand over).

Order (policy `priority`, issue 5):
- level = min(4, priority + ⌊waited / aging_s⌋), priority 0..4 from the consumer or, where
  allowed, the request's X-Priority (the core clamps what it is given). The plain order is the
  higher level first, and within a level whoever reached it first (a job at its own priority
  reached it when it came; an aged one when it aged into it, so aging lifts an old job past
  newer ones without putting it ahead of the urgent jobs that were there before it).
- Swap affinity: the lease holder's next job may pass jobs of other consumers of the same or a
  lower priority (never a higher one), whatever their aged level, within two bounds: the
  tenure (the holder's consecutive grants) has made fewer than `max_batch` grants, and no job
  of another consumer has been held back by it for `affinity_wait_s`. Held back counts from
  when the tenure's first job finished (before that the lease was not free anyway; its swap
  and a lazy load are part of that job) or from the job's arrival if later. So a new tenure
  gets a fresh window, as a batch does in Linux mq-deadline, which checks deadlines when a batch
  starts: batching then survives a backlog older than the window instead of turning into one
  swap per job.
- A new tenure (the holder has nothing to pass with, or its bounds are spent) starts with the
  other consumers' best-level jobs in plain order: the first whose wait has reached
  `affinity_wait_s` (its deadline has passed; no preference may pass it again); before that,
  among the jobs of the highest priority, a resident consumer's (no swap), else the cheapest
  measured swap (shortest setup first lowers the mean wait), else the first.
- Swap costs: `schedule(resident, swap_cost_s)` takes per consumer the measured seconds of one
  swap cycle (its last unload + its last load). A tenure's window is
  min(affinity_wait_s, SWAP_AMORTIZATION x its consumer's cost): holding others back much
  longer than a cheap swap takes buys nothing. Unknown costs change nothing.

No starvation: a job of priority p is granted within
max((4 - p) * aging_s, affinity_wait_s) + R * (c + 2 * max_queue * max_batch), R the longest a
granted job holds the lease (its swap included) and c the largest max_concurrency; the
derivation is in tests/test_scheduler_properties.py, which checks it on random traces.

Policy `fifo` is the plain arrival order of the original brief's step 4, kept as the baseline.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from .clock import Clock
from .config import SchedulerConfig
from .errors import BrokerError, ErrorCode

MAX_PRIORITY = 4
# A tenure holds others back for at most this many times its consumer's measured swap cost (and
# never longer than affinity_wait_s): a swap then costs at most ~1/(1+8) of the time batched.
SWAP_AMORTIZATION = 8.0


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class ConsumerPolicy:
    priority: int = 2
    max_concurrency: int = 1


@dataclass(frozen=True)
class Grant:
    job_id: int
    consumer: str
    prepare: bool
    waited_s: float


@dataclass
class _Job:
    id: int
    consumer: str
    priority: int
    enqueued_at: float
    exclusive: bool = False
    started_at: float | None = None
    ready: bool = False


@dataclass
class _Counters:
    total_jobs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    handoffs: int = 0
    last_wait_ms: float | None = None
    last_run_ms: float | None = None


@dataclass(frozen=True)
class ConsumerQueueStats:
    queue_depth: int
    in_flight: int


@dataclass(frozen=True)
class SchedulerStats:
    policy: str
    queue_depth: int
    in_flight: int
    total_jobs: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    handoffs: int
    last_wait_ms: float | None
    last_run_ms: float | None
    oldest_queued: float | None
    holder: str | None
    accepting: bool
    consumers: dict[str, ConsumerQueueStats] = field(default_factory=dict)


class SchedulerCore:
    def __init__(
        self,
        settings: SchedulerConfig,
        consumers: Mapping[str, ConsumerPolicy],
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._consumers = dict(consumers)
        self._clock = clock
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Job] = {}  # insertion order == arrival order
        self._running: dict[int, _Job] = {}
        self._holder: str | None = None  # the last consumer granted the lease (kept while idle)
        # When the holder's first job of this tenure finished: from then on, every further grant
        # to the holder is affinity holding the others back (before, the lease was not free).
        self._window_opened_at: float | None = None
        self._tenure_grants = 0  # grants since the holder's tenure began
        self._accepting = True
        self._c = _Counters()

    # -- what happened ------------------------------------------------------------------------

    def submit(self, consumer: str, priority: int | None = None, *, exclusive: bool = False) -> int:
        """Queue a job; returns its id. Raises BrokerError(queue_full | shutting_down).

        An exclusive job (admin load/unload) starts only when nothing runs, and nothing else is
        granted until it finishes: it is never `ready`."""
        policy = self._consumers.get(consumer)
        if policy is None:
            raise BrokerError(ErrorCode.SCHEDULER_ERROR, f"unknown consumer {consumer!r}")
        if not self._accepting:
            raise BrokerError(
                ErrorCode.SHUTTING_DOWN, "the broker is shutting down", consumer=consumer
            )
        if len(self._waiting) >= self._settings.max_queue:
            raise BrokerError(
                ErrorCode.QUEUE_FULL,
                f"{len(self._waiting)} jobs are waiting (max_queue {self._settings.max_queue})",
                consumer=consumer,
                headers={"Retry-After": str(self._retry_after_s())},
            )
        level = policy.priority if priority is None else priority
        job = _Job(
            id=next(self._ids),
            consumer=consumer,
            priority=max(0, min(MAX_PRIORITY, level)),
            enqueued_at=self._clock.now(),
            exclusive=exclusive,
        )
        self._waiting[job.id] = job
        self._c.total_jobs += 1
        return job.id

    def cancel(self, job_id: int, outcome: Outcome = Outcome.CANCELLED) -> bool:
        """Remove a waiting job (client gone, queue timeout). False if it was not waiting."""
        job = self._waiting.pop(job_id, None)
        if job is None:
            return False
        self._count(outcome)
        return True

    def ready(self, job_id: int) -> None:
        """The prepared job's consumer is resident: further grants may follow."""
        self._running[job_id].ready = True

    def finish(self, job_id: int, outcome: Outcome) -> None:
        job = self._running.pop(job_id)
        if job.consumer == self._holder and self._window_opened_at is None:
            self._window_opened_at = self._clock.now()
        if job.started_at is not None:
            self._c.last_run_ms = (self._clock.now() - job.started_at) * 1000.0
        self._count(outcome)

    def reconfigure(
        self, settings: SchedulerConfig, consumers: Mapping[str, ConsumerPolicy]
    ) -> list[tuple[int, str]]:
        """A reloaded registry (SIGHUP): the new settings and consumers apply from the next
        decision on. Waiting jobs of a consumer that is gone leave the queue (counted failed)
        and come back as (job id, consumer), in arrival order, for the caller to refuse; jobs
        that run go on. Queued jobs keep the priority they were queued with."""
        self._settings = settings
        self._consumers = dict(consumers)
        gone = [(j.id, j.consumer) for j in self._waiting.values() if j.consumer not in consumers]
        for job_id, _ in gone:
            del self._waiting[job_id]
            self._count(Outcome.FAILED)
        return gone

    def stop_accepting(self) -> list[int]:
        """Shutdown: refuse new jobs and hand back the ids of every waiting one (now removed)."""
        self._accepting = False
        ids = list(self._waiting)
        for job_id in ids:
            self.cancel(job_id)
        return ids

    # -- what to do -----------------------------------------------------------------------------

    def schedule(
        self,
        resident: Set[str] = frozenset(),
        swap_cost_s: Mapping[str, float] | None = None,
    ) -> list[Grant]:
        """Grants that may start now. Call after every change; it is cheap and idempotent.

        `resident`: consumers whose weights are in VRAM now (a grant to them saves a swap).
        `swap_cost_s`: per consumer, the measured seconds of one swap cycle (its last unload +
        its last load); consumers without a figure (or with a negative or non-finite one) are
        unknown. See the module docstring for how both steer the order."""
        costs = _known_costs(swap_cost_s)
        grants: list[Grant] = []
        while self._waiting:
            if any(not j.ready for j in self._running.values()):
                break  # a tenure is being prepared: residency is changing, nothing else runs
            job = self._pick(resident, costs)
            running = self.in_flight
            if running and job.consumer != self._holder:
                break  # drain the holder, then hand over
            if running and job.exclusive:
                break
            if running >= self._consumers[job.consumer].max_concurrency:
                break
            grants.append(self._start(job, prepare=running == 0))
        return grants

    def _start(self, job: _Job, *, prepare: bool) -> Grant:
        now = self._clock.now()
        del self._waiting[job.id]
        job.started_at = now
        job.ready = not prepare
        self._running[job.id] = job
        if job.consumer != self._holder:
            if self._holder is not None:
                self._c.handoffs += 1
            self._holder = job.consumer
            self._window_opened_at = None
            self._tenure_grants = 0
        self._tenure_grants += 1
        waited_s = now - job.enqueued_at
        self._c.last_wait_ms = waited_s * 1000.0
        return Grant(job.id, job.consumer, prepare, waited_s)

    def _pick(self, resident: Set[str], costs: Mapping[str, float]) -> _Job:
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
        mine: _Job,
        passed: list[_Job],
        contested: list[_Job],
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
        cost = _known_costs(swap_cost_s).get(consumer) if consumer is not None else None
        if cost is not None:
            window = min(window, SWAP_AMORTIZATION * cost)
        return window

    def _next_tenure(
        self, candidates: list[_Job], now: float, resident: Set[str], costs: Mapping[str, float]
    ) -> _Job:
        """The first job of a new tenure, among the best level's jobs of other consumers (all
        of them when the holder has none there), which come in level order."""
        for j in candidates:
            if now - j.enqueued_at >= self._settings.affinity_wait_s:
                return j  # its deadline has passed: no preference may pass it again
        # Preferences only among the jobs there by the highest priority of their own.
        base = max(j.priority for j in candidates)
        peers = [j for j in candidates if j.priority == base]
        for j in peers:
            if j.consumer in resident:
                return j  # resident: no swap
        # All cold: the cheapest known swap first (shortest setup first lowers the mean wait;
        # the deadline above bounds the detour). min() keeps level order among equals.
        return min(peers, key=lambda j: costs.get(j.consumer, math.inf))

    def _reached(self, job: _Job, level: int) -> float:
        """When the job reached `level`: its arrival at its own priority, later when aged."""
        return job.enqueued_at + max(0, level - job.priority) * self._settings.aging_s

    def _level(self, job: _Job, now: float) -> int:
        aged = int((now - job.enqueued_at) // self._settings.aging_s)
        return min(MAX_PRIORITY, job.priority + aged)

    # -- what it looks like -------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def holder(self) -> str | None:
        """The consumer holding the lease now (None while nothing runs)."""
        return self._holder if self._running else None

    def is_running(self, consumer: str) -> bool:
        return any(j.consumer == consumer for j in self._running.values())

    def stats(self) -> SchedulerStats:
        now = self._clock.now()
        oldest = min((j.enqueued_at for j in self._waiting.values()), default=None)
        per = {
            name: ConsumerQueueStats(
                queue_depth=sum(1 for j in self._waiting.values() if j.consumer == name),
                in_flight=sum(1 for j in self._running.values() if j.consumer == name),
            )
            for name in self._consumers
        }
        c = self._c
        return SchedulerStats(
            policy=self._settings.policy,
            queue_depth=self.queue_depth,
            in_flight=self.in_flight,
            total_jobs=c.total_jobs,
            completed=c.completed,
            failed=c.failed,
            cancelled=c.cancelled,
            timed_out=c.timed_out,
            handoffs=c.handoffs,
            last_wait_ms=c.last_wait_ms,
            last_run_ms=c.last_run_ms,
            oldest_queued=None if oldest is None else (now - oldest) * 1000.0,
            holder=self.holder,
            accepting=self._accepting,
            consumers=per,
        )

    def _count(self, outcome: Outcome) -> None:
        match outcome:
            case Outcome.COMPLETED:
                self._c.completed += 1
            case Outcome.FAILED:
                self._c.failed += 1
            case Outcome.CANCELLED:
                self._c.cancelled += 1
            case Outcome.TIMED_OUT:
                self._c.timed_out += 1

    def _retry_after_s(self) -> int:
        # A hint, not a promise: the last run time times the queue ahead, at least one second.
        run_s = (self._c.last_run_ms or 1000.0) / 1000.0
        return max(1, min(600, round(run_s * len(self._waiting) / 4)))


def _known_costs(swap_cost_s: Mapping[str, float] | None) -> dict[str, float]:
    """The usable figures only: a missing, negative or non-finite cost is unknown."""
    if not swap_cost_s:
        return {}
    return {n: s for n, s in swap_cost_s.items() if math.isfinite(s) and s >= 0}
