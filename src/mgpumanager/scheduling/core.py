"""The scheduler core: one lease for the whole GPU, decided without any I/O.

It owns the queue, the lease holder and the statistics. Callers tell it what happened
(`submit`, `cancel`, `ready`, `finish`) and ask it what to start (`schedule`); it never awaits
and reads no clock but the injected one, so every decision is tested step by step with a fake
clock (tests/scheduling/test_core.py).

Lease: one consumer holds it at a time, with up to its `max_concurrency` jobs. A grant that
starts a tenure (nothing in flight) has `prepare=True`: the caller makes the consumer resident,
then calls `ready()`; nothing else is granted meanwhile (residency is changing). When the next
pick belongs to another consumer, the holder gets no more grants and the lease passes once its
jobs finished, so two consumers never run on the GPU at once.

Which waiting job is picked next is the core's `order` (order.py): `priority` or `fifo`, from
the settings, or one passed in. The queue is kept per (consumer, priority) class, in arrival
order, and an order sees each class's oldest job only: submitting, cancelling and granting cost
the same whatever the queue's depth. The core also measures each consumer's recent run times
(ready to finish, completed jobs), which the order weighs the queued work with. Observers see
every job queued (`on_submit`), granted (`on_grant`), finished after its grant (`on_finish`) or
gone from the queue without one (`on_leave`), for benchmarks, logs and the event stream.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import types
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, field

from mgpumanager.clock import Clock
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import SchedulerConfig
from mgpumanager.scheduling.order import (
    MAX_PRIORITY,
    ORDERS,
    Order,
    QueuedJob,
    QueueView,
    known_costs,
)

# Run times kept per consumer; the estimate is their median, so that one job cut short does not
# swing it. Jobs granted while their consumer was resident are preferred: the first job after a
# swap may carry a lazy load (ComfyUI loads its model inside the first prompt).
RUN_SAMPLES = 8


def _median(values: Iterable[float]) -> float:
    xs = sorted(values)
    mid = len(xs) // 2  # statistics.median costs ~5x more per finish
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


class Outcome(enum.StrEnum):
    COMPLETED = "completed"  # the upstream answered 2xx or 3xx
    UPSTREAM_ERROR = "upstream_error"  # it answered 4xx or 5xx: relayed, but not done
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class ConsumerPolicy:
    priority: int = 2
    max_concurrency: int = 1


_ANY = ConsumerPolicy()  # for a holder no longer in the registry


@dataclass(frozen=True)
class Grant:
    job_id: int
    consumer: str
    prepare: bool
    waited_s: float


@dataclass
class _Counters:
    total_jobs: int = 0
    completed: int = 0
    upstream_error: int = 0
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
    upstream_error: int = 0


class SchedulerCore:
    def __init__(
        self,
        settings: SchedulerConfig,
        consumers: Mapping[str, ConsumerPolicy],
        clock: Clock,
        *,
        order: Order | None = None,
        ids: Iterator[int] | None = None,
    ) -> None:
        """`order`: the rule that picks the next job; by default the one `settings.policy`
        names (and, after `reconfigure`, the one the new settings name). `ids`: where job ids
        come from, shared by the cores of several device sets (scheduling/devices.py)."""
        self._settings = settings
        self._consumers = dict(consumers)
        self._clock = clock
        self._fixed_order = order
        self._ids = ids if ids is not None else itertools.count(1)
        self._waiting: dict[int, QueuedJob] = {}  # insertion order == arrival order
        # The same jobs by (consumer, priority), each class in arrival order: its first is the
        # head the order sees. (OrderedDict: the first entry stays O(1) after many removals.)
        self._classes: dict[tuple[str, int], OrderedDict[int, QueuedJob]] = {}
        self._queued: dict[str, int] = {}  # waiting jobs per consumer, those with any
        self._running: dict[int, QueuedJob] = {}
        self._started_at: dict[int, float] = {}  # per running job
        self._ready_at: dict[int, float] = {}  # per running job: when its run began
        self._warm: set[int] = set()  # running jobs granted while their consumer was resident
        # Recent run times per (consumer, granted while resident), and the estimates.
        self._runs: dict[tuple[str, bool], deque[float]] = {}
        self._run_s: dict[str, float] = {}
        self._stale: set[str] = set()  # consumers with samples newer than their estimates
        # Per consumer, how much longer its first job after a swap runs than its jobs while
        # resident (a lazy load, as ComfyUI's): part of a swap's cost that no load call shows.
        self._load_in_job_s: dict[str, float] = {}
        self._preparing: set[int] = set()  # granted with prepare, not ready yet
        self._holder: str | None = None  # the last consumer granted the lease (kept while idle)
        # When the holder's first job of this tenure finished: from then on, every further grant
        # to the holder is affinity holding the others back (before, the lease was not free).
        self._window_opened_at: float | None = None
        self._tenure_grants = 0  # grants since the holder's tenure began
        self._accepting = True
        self._c = _Counters()
        self.finished_status: int | None = None  # see `finish`
        # Called synchronously, in order, for every grant and every finished job. They must not
        # raise or call back into the core.
        self.on_submit: list[Callable[[QueuedJob], None]] = []
        self.on_grant: list[Callable[[Grant], None]] = []
        self.on_finish: list[Callable[[int, Outcome], None]] = []
        self.on_leave: list[Callable[[QueuedJob, Outcome], None]] = []
        self.on_ready: list[Callable[[int], None]] = []  # a tenure's prepared job is ready

    # -- what happened ------------------------------------------------------------------------

    def submit(
        self,
        consumer: str,
        priority: int | None = None,
        *,
        exclusive: bool = False,
        label: str = "",
        model: str | None = None,
        weights: tuple[str, ...] = (),
    ) -> int:
        """Queue a job; returns its id. Raises BrokerError(queue_full | shutting_down).
        `label` says what the job is (its route), for whoever watches the queue; `model` and
        `weights` what it needs loaded, for whoever reads its weights ahead.

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
        job = QueuedJob(
            id=next(self._ids),
            consumer=consumer,
            priority=max(0, min(MAX_PRIORITY, level)),
            enqueued_at=self._clock.now(),
            exclusive=exclusive,
            label=label,
            model=model,
            weights=weights,
        )
        self._waiting[job.id] = job
        self._classes.setdefault((job.consumer, job.priority), OrderedDict())[job.id] = job
        self._queued[job.consumer] = self._queued.get(job.consumer, 0) + 1
        self._c.total_jobs += 1
        for observer in self.on_submit:
            observer(job)
        return job.id

    def cancel(self, job_id: int, outcome: Outcome = Outcome.CANCELLED) -> bool:
        """Remove a waiting job (client gone, queue timeout). False if it was not waiting."""
        job = self._waiting.get(job_id)
        if job is None:
            return False
        self._unqueue(job)
        self._count(outcome)
        for observer in self.on_leave:
            observer(job, outcome)
        return True

    def _unqueue(self, job: QueuedJob) -> None:
        del self._waiting[job.id]
        key = (job.consumer, job.priority)
        cls = self._classes[key]
        del cls[job.id]
        if not cls:
            del self._classes[key]
        left = self._queued[job.consumer] - 1
        if left:
            self._queued[job.consumer] = left
        else:
            del self._queued[job.consumer]

    def ready(self, job_id: int) -> None:
        """The prepared job's consumer is resident: further grants may follow."""
        if job_id not in self._running:
            raise KeyError(job_id)
        self._preparing.discard(job_id)
        self._ready_at[job_id] = self._clock.now()
        for observer in self.on_ready:
            observer(job_id)

    def finish(self, job_id: int, outcome: Outcome, status: int | None = None) -> None:
        """`status`: the upstream's HTTP status of an UPSTREAM_ERROR, read by the finish
        observers as `finished_status` while they run."""
        job = self._running.pop(job_id)
        self._preparing.discard(job_id)
        now = self._clock.now()
        started_at = self._started_at.pop(job_id)
        ready_at = self._ready_at.pop(job_id, None)
        warm = job_id in self._warm
        self._warm.discard(job_id)
        if outcome is Outcome.COMPLETED and ready_at is not None and not job.exclusive:
            self._sample_run(job.consumer, warm, now - ready_at)
        if job.consumer == self._holder and self._window_opened_at is None:
            self._window_opened_at = now
        self._c.last_run_ms = (now - started_at) * 1000.0
        self._count(outcome)
        self.finished_status = status
        for observer in self.on_finish:
            observer(job_id, outcome)
        self.finished_status = None

    def _sample_run(self, consumer: str, warm: bool, run_s: float) -> None:
        """A completed job's run time, from ready (its swap done) to finish; `warm`: granted
        while its consumer was resident. The estimates follow when next read (`_estimate`):
        most finishes are never followed by a choice that needs them."""
        runs = self._runs.get((consumer, warm))
        if runs is None:
            runs = self._runs[consumer, warm] = deque(maxlen=RUN_SAMPLES)
        runs.append(max(0.0, run_s))
        self._stale.add(consumer)

    def _estimate(self) -> None:
        """Bring the run-time estimates (and the loads inside first jobs) up to the samples."""
        for consumer in self._stale:
            warm_runs = self._runs.get((consumer, True))
            cold_runs = self._runs.get((consumer, False))
            self._run_s[consumer] = _median(warm_runs or cold_runs or ())
            if warm_runs and cold_runs:
                self._load_in_job_s[consumer] = max(0.0, _median(cold_runs) - _median(warm_runs))
        self._stale.clear()

    def reconfigure(
        self, settings: SchedulerConfig, consumers: Mapping[str, ConsumerPolicy]
    ) -> list[tuple[int, str]]:
        """A reloaded registry (SIGHUP): the new settings and consumers apply from the next
        decision on. Waiting jobs of a consumer that is gone leave the queue (counted failed)
        and come back as (job id, consumer), in arrival order, for the caller to refuse; jobs
        that run go on. Queued jobs keep the priority they were queued with."""
        self._settings = settings
        self._consumers = dict(consumers)
        gone = [j for j in self._waiting.values() if j.consumer not in consumers]
        for job in gone:
            self._unqueue(job)
            self._count(Outcome.FAILED)
            for observer in self.on_leave:
                observer(job, Outcome.FAILED)
        for name, warm in [k for k in self._runs if k[0] not in consumers]:
            del self._runs[name, warm]
            self._run_s.pop(name, None)
            self._load_in_job_s.pop(name, None)
            self._stale.discard(name)
        return [(j.id, j.consumer) for j in gone]

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
        its last load call; for a consumer without one, its unload alone); consumers without a
        figure (or with a negative or non-finite one) are unknown. To each figure the core adds
        what the consumer's first job after a swap runs longer than its jobs while resident (a
        load inside the job). order.py's docstring says how both steer the order."""
        costs: Mapping[str, float] | None = None
        grants: list[Grant] = []
        while self._waiting:
            if self._preparing:
                break  # a tenure is being prepared: residency is changing, nothing else runs
            running = len(self._running)
            holder = self._consumers.get(self._holder or "", _ANY)
            if running >= holder.max_concurrency:
                break  # the holder is full: no pick could start now (the common case, cheap)
            if len(self._waiting) == 1:
                # The only job: any order's pick is one of the waiting (a light load's every
                # grant), so no view is built.
                job = next(iter(self._waiting.values()))
            else:
                if costs is None:
                    costs = self._with_loads_in_jobs(known_costs(swap_cost_s))
                job = self.order.pick(self._view(resident, costs))
            if running and job.consumer != self._holder:
                break  # drain the holder, then hand over
            if running and job.exclusive:
                break
            # Here the job is the holder's, below its max_concurrency, or nothing runs.
            grants.append(self._start(job, prepare=running == 0, warm=job.consumer in resident))
        return grants

    def next_tenure(
        self,
        resident: Set[str] = frozenset(),
        swap_cost_s: Mapping[str, float] | None = None,
    ) -> QueuedJob | None:
        """The waiting job that would begin the next tenure once the holder's jobs are done:
        the order's pick among the other consumers' jobs (None when none waits). A forecast
        for reading its weights ahead; changes nothing."""
        heads = [
            next(iter(cls.values()))
            for (consumer, _), cls in self._classes.items()
            if consumer != self._holder
        ]
        if not heads:
            return None
        view = self._view(resident, self._with_loads_in_jobs(known_costs(swap_cost_s)))
        return self.order.pick(dataclasses.replace(view, heads=heads))

    def _with_loads_in_jobs(self, costs: dict[str, float]) -> dict[str, float]:
        """The measured swap costs plus, for each, what its first job after a swap runs longer
        than the others: for ComfyUI (no load call) the whole load, else about nothing. Without
        it the order saw ComfyUI's swap as its unload alone or unknown, the cheapest or the last
        of all, when it is the dearest (bench/README.md, "lazy loads")."""
        self._estimate()
        for name, extra in self._load_in_job_s.items():
            if name in costs:
                costs[name] += extra
        return costs

    def jobs_on(self, consumer: str) -> int:
        """The jobs running on `consumer` now (only the lease holder has any)."""
        return self.in_flight if self.holder == consumer else 0

    @property
    def others_waiting(self) -> bool:
        """Jobs of a consumer other than the holder wait (a next tenure is in view)."""
        return any(consumer != self._holder for consumer, _ in self._classes)

    @property
    def preparing(self) -> bool:
        """A tenure is being prepared: residency is changing for it."""
        return bool(self._preparing)

    @property
    def startable(self) -> bool:
        """Whether `schedule` could grant anything now: jobs wait, no tenure is being prepared
        and the holder has a free slot. False spares a caller the figures `schedule` takes."""
        if not self._waiting or self._preparing:
            return False
        holder = self._consumers.get(self._holder or "", _ANY)
        return len(self._running) < holder.max_concurrency

    def _view(self, resident: Set[str], costs: Mapping[str, float]) -> QueueView:
        self._estimate()
        return QueueView(
            heads=[next(iter(cls.values())) for cls in self._classes.values()],
            queued=types.MappingProxyType(self._queued),
            run_s=types.MappingProxyType(self._run_s),
            holder=self._holder,
            window_opened_at=self._window_opened_at,
            tenure_grants=self._tenure_grants,
            now=self._clock.now(),
            resident=resident,
            swap_cost_s=costs,
            settings=self._settings,
        )

    def _start(self, job: QueuedJob, *, prepare: bool, warm: bool) -> Grant:
        now = self._clock.now()
        self._unqueue(job)
        self._running[job.id] = job
        self._started_at[job.id] = now
        if prepare:
            self._preparing.add(job.id)  # its run begins when it is ready
        else:
            self._ready_at[job.id] = now
        if warm:
            self._warm.add(job.id)
        if job.consumer != self._holder:
            if self._holder is not None:
                self._c.handoffs += 1
            self._holder = job.consumer
            self._window_opened_at = None
            self._tenure_grants = 0
        self._tenure_grants += 1
        waited_s = now - job.enqueued_at
        self._c.last_wait_ms = waited_s * 1000.0
        grant = Grant(job.id, job.consumer, prepare, waited_s)
        for observer in self.on_grant:
            observer(grant)
        return grant

    # -- what it looks like -------------------------------------------------------------------

    @property
    def order(self) -> Order:
        """The rule that picks the next job."""
        if self._fixed_order is not None:
            return self._fixed_order
        return ORDERS[self._settings.policy]

    @property
    def settings(self) -> SchedulerConfig:
        return self._settings

    @property
    def waiting(self) -> Mapping[int, QueuedJob]:
        """The queue, by job id, in arrival order (read-only)."""
        return types.MappingProxyType(self._waiting)

    @property
    def running(self) -> Mapping[int, QueuedJob]:
        """The jobs in flight, by job id (read-only)."""
        return types.MappingProxyType(self._running)

    @property
    def recent_run_s(self) -> Mapping[str, float]:
        """Per consumer, its recent run time (read-only): the median of its last RUN_SAMPLES
        completed jobs granted while it was resident, or of those after a swap if none was."""
        self._estimate()
        return types.MappingProxyType(self._run_s)

    def waiting_estimates(
        self, swap_cost_s: Mapping[str, float] | None = None
    ) -> list[tuple[QueuedJob, float | None]]:
        """Read only: the waiting jobs in the order they are expected to start, each with the
        seconds until its expected start, from the recent run times and `swap_cost_s` (as
        `schedule` takes them); None once a run time it depends on is not known yet. An
        estimate: swap affinity and jobs yet to come may change the order."""
        now = self._clock.now()
        costs = self._with_loads_in_jobs(known_costs(swap_cost_s))
        run_s = self._run_s
        aging_s = self._settings.aging_s
        jobs = list(self._waiting.values())  # arrival order: fifo's, and each level's ties
        if self.order.name != "fifo":

            def key(job: QueuedJob) -> tuple[int, float]:
                level = min(MAX_PRIORITY, job.priority + int((now - job.enqueued_at) / aging_s))
                return -level, job.enqueued_at + (level - job.priority) * aging_s

            jobs.sort(key=key)
        start: float | None = 0.0
        for job_id, job in self._running.items():  # they run side by side: the longest counts
            run = run_s.get(job.consumer)
            if run is None or start is None:
                start = None
                continue
            began = self._ready_at.get(job_id)
            left = run if began is None else max(0.0, run - (now - began))
            if job_id in self._preparing:
                left += costs.get(job.consumer, 0.0)
            start = max(start, left)
        out: list[tuple[QueuedJob, float | None]] = []
        previous = self.holder
        for job in jobs:
            if start is not None and job.consumer != previous:
                start += costs.get(job.consumer, 0.0)
            out.append((job, start))
            run = run_s.get(job.consumer)
            start = None if run is None or start is None else start + run
            previous = job.consumer
        return out

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

    def stats(self) -> SchedulerStats:
        now = self._clock.now()
        oldest = min(
            (next(iter(cls.values())).enqueued_at for cls in self._classes.values()), default=None
        )
        per = {
            name: ConsumerQueueStats(
                queue_depth=self._queued.get(name, 0),
                in_flight=sum(1 for j in self._running.values() if j.consumer == name),
            )
            for name in self._consumers
        }
        c = self._c
        return SchedulerStats(
            policy=self.order.name,
            queue_depth=self.queue_depth,
            in_flight=self.in_flight,
            total_jobs=c.total_jobs,
            completed=c.completed,
            failed=c.failed,
            cancelled=c.cancelled,
            timed_out=c.timed_out,
            upstream_error=c.upstream_error,
            handoffs=c.handoffs,
            last_wait_ms=c.last_wait_ms,
            last_run_ms=c.last_run_ms,
            oldest_queued=None if oldest is None else (now - oldest) * 1000.0,
            holder=self.holder,
            accepting=self._accepting,
            consumers=per,
        )

    def _count(self, outcome: Outcome) -> None:
        setattr(self._c, outcome.value, getattr(self._c, outcome.value) + 1)

    def _retry_after_s(self) -> int:
        # A hint, not a promise: the last run time times the queue ahead, at least one second.
        run_s = (self._c.last_run_ms or 1000.0) / 1000.0
        return max(1, min(600, round(run_s * len(self._waiting) / 4)))
