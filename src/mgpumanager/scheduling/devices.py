"""Several GPUs in one box: one scheduler over device sets, grants all-or-nothing, no I/O.

Each consumer is bound to a set of devices (UUIDs; upstreams/devices.py resolves the registry's
`devices:`). Consumers with the same set share one `SchedulerCore`, which keeps every meaning it
has on a one-card box within that set: one holder, its `max_concurrency`, priorities with aging,
swap affinity, `max_batch`. `DeviceSets` arbitrates between those cores:

- A core whose set is disjoint from every device held by another core may grant; cores on
  disjoint sets therefore run at the same time, and never two holders on one device.
- A grant is all-or-nothing: a job starts only when every device of its set is free of other
  holders. Nothing is held while waiting, so there is no deadlock.
- Among idle cores that compete for a device, the best waiting job goes first: the highest aged
  priority, then the oldest.
- Starvation guard: once the oldest blocked multi-device job has waited `max_wait_s`, its
  devices are reserved for it: no other core starts on them, those that hold them get no more
  grants and drain; cores on the other devices still run.

To the lease it is a `SchedulerCore` (the same calls, observers and statistics); on a box with
one device there is one core and the broker uses that core itself.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Set

from mgpumanager.clock import Clock
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import SchedulerConfig
from mgpumanager.scheduling.core import (
    ConsumerPolicy,
    ConsumerQueueStats,
    Grant,
    Outcome,
    SchedulerCore,
    SchedulerStats,
)
from mgpumanager.scheduling.order import MAX_PRIORITY, QueuedJob

DeviceSet = frozenset[str]


class DeviceSets(SchedulerCore):
    def __init__(
        self,
        settings: SchedulerConfig,
        consumers: Mapping[str, ConsumerPolicy],
        devices: Mapping[str, DeviceSet],
        clock: Clock,
        *,
        rebinding: Callable[[], Mapping[str, DeviceSet]] | None = None,
    ) -> None:
        """`devices`: each consumer's device set (every consumer must have one). `rebinding`:
        where `reconfigure` reads the sets of a reloaded registry from."""
        super().__init__(settings, {}, clock)
        self._rebinding = rebinding
        self._cores: dict[DeviceSet, SchedulerCore] = {}
        self._devices: dict[str, DeviceSet] = {}
        self._where: dict[int, SchedulerCore] = {}  # job id -> its core, while queued or running
        self._last: SchedulerCore | None = None
        self._bind(settings, consumers, devices)

    def _bind(
        self,
        settings: SchedulerConfig,
        consumers: Mapping[str, ConsumerPolicy],
        devices: Mapping[str, DeviceSet],
    ) -> None:
        self._settings = settings
        self._consumers = dict(consumers)
        self._devices = {name: devices[name] for name in consumers}
        new = [d for d in dict.fromkeys(self._devices.values()) if d not in self._cores]
        for dset in new:
            core = SchedulerCore(settings, self._members(dset), self._clock, ids=self._ids)
            # The same lists for every core: observers see every job, whichever core has it.
            core.on_submit = self.on_submit
            core.on_grant = self.on_grant
            core.on_finish = self.on_finish
            core.on_leave = self.on_leave
            self._cores[dset] = core

    def _members(self, dset: DeviceSet) -> dict[str, ConsumerPolicy]:
        return {n: self._consumers[n] for n, d in self._devices.items() if d == dset}

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
        dset = self._devices.get(consumer)
        if dset is None:
            raise BrokerError(ErrorCode.SCHEDULER_ERROR, f"unknown consumer {consumer!r}")
        if self._accepting and self.queue_depth >= self._settings.max_queue:
            raise BrokerError(
                ErrorCode.QUEUE_FULL,
                f"{self.queue_depth} jobs are waiting (max_queue {self._settings.max_queue})",
                consumer=consumer,
                headers={"Retry-After": "1"},
            )
        core = self._cores[dset]
        job_id = core.submit(
            consumer, priority, exclusive=exclusive, label=label, model=model, weights=weights
        )
        self._where[job_id] = core
        return job_id

    def cancel(self, job_id: int, outcome: Outcome = Outcome.CANCELLED) -> bool:
        core = self._where.get(job_id)
        if core is None or not core.cancel(job_id, outcome):
            return False
        del self._where[job_id]
        return True

    def ready(self, job_id: int) -> None:
        core = self._where.get(job_id)
        if core is None:
            raise KeyError(job_id)
        core.ready(job_id)

    def finish(self, job_id: int, outcome: Outcome, status: int | None = None) -> None:
        core = self._where.pop(job_id)
        self._last = core
        self.finished_status = status  # the observers read it from the lease's core: this one
        try:
            core.finish(job_id, outcome, status)
        finally:
            self.finished_status = None

    def reconfigure(
        self, settings: SchedulerConfig, consumers: Mapping[str, ConsumerPolicy]
    ) -> list[tuple[int, str]]:
        """New settings and consumers, on the device sets last given to `rebind` (a consumer
        without one keeps its old set, a new one gets every device known)."""
        every: DeviceSet = frozenset().union(*self._cores)
        bound = self._rebinding() if self._rebinding is not None else {}
        devices = {n: bound.get(n) or self._devices.get(n, every) for n in consumers}
        return self.rebind(settings, consumers, devices)

    def rebind(
        self,
        settings: SchedulerConfig,
        consumers: Mapping[str, ConsumerPolicy],
        devices: Mapping[str, DeviceSet],
    ) -> list[tuple[int, str]]:
        """A reloaded registry with its device sets. Waiting jobs of a consumer that is gone,
        or now bound elsewhere, leave the queue and come back for the caller to refuse."""
        self._bind(settings, consumers, devices)
        dropped: list[tuple[int, str]] = []
        for dset, core in self._cores.items():
            dropped += core.reconfigure(settings, self._members(dset))
        for job_id, _ in dropped:
            self._where.pop(job_id, None)
        return sorted(dropped)

    def stop_accepting(self) -> list[int]:
        self._accepting = False
        ids: list[int] = []
        for core in self._cores.values():
            ids += core.stop_accepting()
        for job_id in ids:
            self._where.pop(job_id, None)
        return sorted(ids)

    # -- what to do -----------------------------------------------------------------------------

    def schedule(
        self,
        resident: Set[str] = frozenset(),
        swap_cost_s: Mapping[str, float] | None = None,
    ) -> list[Grant]:
        grants: list[Grant] = []
        held = self.held_devices()
        reserved = self._reserved()
        waiting = [(s, c) for s, c in self._cores.items() if c.queue_depth]
        waiting.sort(key=lambda sc: self._rank(sc[0], sc[1], reserved))
        for dset, core in waiting:
            mine = core.in_flight > 0
            if reserved is not None and dset != reserved and dset & reserved:
                continue  # the reserved devices are the starved job's: drain, start nothing
            if not mine and dset & held:
                continue  # all-or-nothing: one of its devices is another's
            new = core.schedule(resident, swap_cost_s)
            if new:
                held |= dset
                grants += new
        return grants

    def held_devices(self) -> set[str]:
        """The devices some core holds now (jobs running or a tenure being prepared)."""
        return {d for dset, core in self._cores.items() if core.in_flight for d in dset}

    def _reserved(self) -> DeviceSet | None:
        """The set of the oldest blocked multi-device job once it waited `max_wait_s`."""
        now = self._clock.now()
        oldest: tuple[float, DeviceSet] | None = None
        for dset, core in self._cores.items():
            if len(dset) < 2 or not core.queue_depth or core.in_flight:
                continue
            head = next(iter(core.waiting.values()))
            if oldest is None or head.enqueued_at < oldest[0]:
                oldest = (head.enqueued_at, dset)
        if oldest is None or now - oldest[0] < self._settings.max_wait_s:
            return None
        return oldest[1]

    def _rank(
        self, dset: DeviceSet, core: SchedulerCore, reserved: DeviceSet | None
    ) -> tuple[bool, bool, int, float, int]:
        """Sort key: the reserved set, then holders (they only grant on their own devices),
        then the best waiting job: its aged priority, then its age, then arrival order."""
        now = self._clock.now()
        best = max(
            core.waiting.values(), key=lambda j: (self._level(j, now), -j.enqueued_at, -j.id)
        )
        level = self._level(best, now)
        return (dset != reserved, core.in_flight == 0, -level, best.enqueued_at, best.id)

    def _level(self, job: QueuedJob, now: float) -> int:
        aged = int((now - job.enqueued_at) // self._settings.aging_s)
        return min(MAX_PRIORITY, job.priority + aged)

    def jobs_on(self, consumer: str) -> int:
        dset = self._devices.get(consumer)
        return 0 if dset is None else self._cores[dset].jobs_on(consumer)

    @property
    def startable(self) -> bool:
        return any(core.startable for core in self._cores.values())

    # -- what the prefetch asks (residency/prefetch.py) ------------------------------------------

    def next_tenure(
        self,
        resident: Set[str] = frozenset(),
        swap_cost_s: Mapping[str, float] | None = None,
    ) -> QueuedJob | None:
        """The forecast of the set whose next tenure comes first: among each set's own
        forecast, the highest aged priority, then the oldest."""
        now = self._clock.now()
        forecasts = [
            job
            for core in self._cores.values()
            if (job := core.next_tenure(resident, swap_cost_s)) is not None
        ]
        if not forecasts:
            return None
        return max(forecasts, key=lambda j: (self._level(j, now), -j.enqueued_at, -j.id))

    def waiting_estimates(
        self, swap_cost_s: Mapping[str, float] | None = None
    ) -> list[tuple[QueuedJob, float | None]]:
        """Every set's own estimates, merged in order of expected start (unknown last): the
        sets run side by side, so each job's start is its own set's figure."""
        merged = [
            entry for core in self._cores.values() for entry in core.waiting_estimates(swap_cost_s)
        ]
        merged.sort(key=lambda e: (e[1] is None, e[1] or 0.0, e[0].enqueued_at, e[0].id))
        return merged

    @property
    def others_waiting(self) -> bool:
        return any(core.others_waiting for core in self._cores.values())

    @property
    def preparing(self) -> bool:
        return any(core.preparing for core in self._cores.values())

    # -- what it looks like -------------------------------------------------------------------

    @property
    def device_sets(self) -> Mapping[str, DeviceSet]:
        """Each consumer's device set (read-only)."""
        return types.MappingProxyType(self._devices)

    @property
    def cores(self) -> Mapping[DeviceSet, SchedulerCore]:
        return types.MappingProxyType(self._cores)

    @property
    def waiting(self) -> Mapping[int, QueuedJob]:
        merged = {i: j for c in self._cores.values() for i, j in c.waiting.items()}
        return types.MappingProxyType(dict(sorted(merged.items())))

    @property
    def running(self) -> Mapping[int, QueuedJob]:
        merged = {i: j for c in self._cores.values() for i, j in c.running.items()}
        return types.MappingProxyType(dict(sorted(merged.items())))

    @property
    def recent_run_s(self) -> Mapping[str, float]:
        merged = {n: s for c in self._cores.values() for n, s in c.recent_run_s.items()}
        return types.MappingProxyType(merged)

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self._cores.values())

    @property
    def queue_depth(self) -> int:
        return sum(c.queue_depth for c in self._cores.values())

    @property
    def holders(self) -> list[str]:
        """Every consumer holding a lease now, one per busy device set."""
        return sorted(h for c in self._cores.values() if (h := c.holder) is not None)

    @property
    def holder(self) -> str | None:
        return ", ".join(self.holders) or None

    def stats(self) -> SchedulerStats:
        parts = [c.stats() for c in self._cores.values()]
        oldest = [p.oldest_queued for p in parts if p.oldest_queued is not None]
        per: dict[str, ConsumerQueueStats] = {}
        for p in parts:
            per.update(p.consumers)
        for name in self._consumers:
            per.setdefault(name, ConsumerQueueStats(0, 0))

        def total(field: str) -> int:
            return sum(int(getattr(p, field)) for p in parts)

        last = None if self._last is None else self._last.stats()
        return SchedulerStats(
            policy=self.order.name,
            queue_depth=self.queue_depth,
            in_flight=self.in_flight,
            total_jobs=total("total_jobs"),
            completed=total("completed"),
            failed=total("failed"),
            cancelled=total("cancelled"),
            timed_out=total("timed_out"),
            upstream_error=total("upstream_error"),
            handoffs=total("handoffs"),
            last_wait_ms=max((p.last_wait_ms for p in parts if p.last_wait_ms), default=None),
            last_run_ms=None if last is None else last.last_run_ms,
            oldest_queued=max(oldest, default=None),
            holder=self.holder,
            accepting=self._accepting,
            consumers=per,
        )


def make_core(
    settings: SchedulerConfig,
    consumers: Mapping[str, ConsumerPolicy],
    devices: Mapping[str, DeviceSet],
    clock: Clock,
    *,
    rebinding: Callable[[], Mapping[str, DeviceSet]] | None = None,
) -> SchedulerCore:
    """The scheduler for a box: one core where every consumer shares one device set (a box
    with one GPU: the core exactly as it always was), else one over the device sets."""
    if len(frozenset[str]().union(*devices.values())) <= 1:
        return SchedulerCore(settings, consumers, clock)
    return DeviceSets(settings, consumers, devices, clock, rebinding=rebinding)
