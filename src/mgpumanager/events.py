"""The broker's event stream: what happens on the box, as it happens, for `GET /v1/events`, the
dashboard and anyone else following along.

The broker owns one `EventBus`; the parts that see things happen (the scheduler core, residency,
health) get its `emit` and call it synchronously at the moment they happen. An event is a type
and its figures, stamped with a sequence number and the wall-clock time::

    job.queued  job.granted  job.finished
    eviction.planned  eviction.confirmed  eviction.failed
    load.started  load.ready  load.failed
    prefetch.started  prefetch.done  prefetch.cancelled  prefetch.used
    residency.changed  health.changed

`emit` never waits and never fails the caller: each subscriber (one per `/v1/events` client) has
a bounded buffer, and a subscriber whose buffer is full is dropped (its connection closed), so a
client that stops reading costs the broker one buffer and never slows a job. `History` is an
in-process tap keeping the recent jobs and evictions that `/v1/status` shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mgpumanager.clock import Clock
from mgpumanager.scheduling.core import Grant, Outcome, SchedulerCore
from mgpumanager.scheduling.order import QueuedJob
from mgpumanager.scheduling.waits import QueueWaits

log = logging.getLogger(__name__)

# Events a client may have pending before it counts as stalled and is dropped. A job makes
# three to eight events (queued, granted, finished, plus any eviction and load around it), a few
# hundred bytes each: this is hundreds of jobs of slack, well under a megabyte per client.
CLIENT_BUFFER = 1000
RECENT = 50  # jobs and evictions kept for /v1/status


class Emit(Protocol):
    def __call__(self, kind: str, /, **figures: Any) -> None: ...


def no_emit(kind: str, /, **figures: Any) -> None:
    """The default `emit` of the parts when nobody listens (tests, benchmarks)."""


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    time: float  # Unix seconds
    figures: dict[str, Any]

    def document(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, "time": self.time, **self.figures}

    def sse(self) -> bytes:
        """The event in server-sent-events framing: id, event name, one line of JSON."""
        data = json.dumps(self.document(), default=str, separators=(",", ":"))
        return f"id: {self.seq}\nevent: {self.type}\ndata: {data}\n\n".encode()


class Subscription:
    """One follower's buffer of encoded events. `get` answers None once the subscription is
    over: dropped for falling behind, unsubscribed, or the bus closed."""

    def __init__(self, buffer: int) -> None:
        self.buffer = buffer
        # Called once when the bus drops this subscriber (the web handler closes its
        # connection: a handler stuck writing to a client that reads nothing would otherwise
        # never notice).
        self.on_drop: Callable[[], None] | None = None
        self.dropped = False
        self._items: deque[bytes] = deque()
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None  # while `get` waits

    def put(self, item: bytes) -> bool:
        """False if the buffer is full (the caller drops the subscriber)."""
        if len(self._items) >= self.buffer:
            return False
        self._items.append(item)
        self._wake()
        return True

    def close(self) -> None:
        self._closed = True
        self._items.clear()
        self._wake()

    async def get(self) -> bytes | None:
        """Everything pending, as one piece (one write for a burst of events); None once the
        subscription is over."""
        while not self._items:
            if self._closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, deque()
        return b"".join(items)

    def pending(self) -> int:
        return len(self._items)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class EventBus:
    def __init__(
        self, *, buffer: int = CLIENT_BUFFER, wall: Callable[[], float] = time.time
    ) -> None:
        self.buffer = buffer
        self._wall = wall
        self.seq = 0  # the last event's
        self._subscribers: list[Subscription] = []
        # Synchronous in-process listeners (History): they see every event first.
        self.taps: list[Callable[[Event], None]] = []
        self.emitted = 0
        self.dropped = 0  # subscribers dropped for falling behind
        self.closed = False

    def emit(self, kind: str, /, **figures: Any) -> None:
        self.seq += 1
        event = Event(self.seq, kind, self._wall(), figures)
        self.emitted += 1
        for tap in self.taps:
            try:
                tap(event)
            except Exception:  # a listener's bug must not fail the job that emitted
                log.exception("event listener failed on %s", kind)
        if not self._subscribers:
            return
        frame = event.sse()  # encoded once, shared by every subscriber
        for sub in list(self._subscribers):
            if not sub.put(frame):
                self._drop(sub)

    def subscribe(self) -> Subscription:
        sub = Subscription(self.buffer)
        if self.closed:
            sub.close()
        else:
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
        sub.close()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """The broker stops: every follower's stream ends."""
        self.closed = True
        for sub in self._subscribers:
            sub.close()
        self._subscribers.clear()

    def _drop(self, sub: Subscription) -> None:
        self._subscribers.remove(sub)
        sub.dropped = True
        sub.close()
        self.dropped += 1
        log.warning("events: dropped a client %d events behind", self.buffer)
        if sub.on_drop is not None:
            sub.on_drop()


# -- jobs: the scheduler core's observers, as events --------------------------------------------


@dataclass
class _Job:
    queued: QueuedJob
    granted_at: float | None = None
    wait_s: float | None = None


class JobEvents:
    """Turns the scheduler core's observations into job.queued / granted / finished events, and
    knows since when each running job runs (for /v1/status)."""

    def __init__(self, core: SchedulerCore, clock: Clock, emit: Emit) -> None:
        self._clock = clock
        self._emit = emit
        self._jobs: dict[int, _Job] = {}
        core.on_submit.append(self._submitted)
        core.on_grant.append(self._granted)
        core.on_finish.append(self._finished)
        self._core = core
        core.on_leave.append(self._left)
        # Where a queued job stands (position, expected start), once the broker has one.
        self.waits: QueueWaits | None = None

    def running_s(self, job_id: int) -> float | None:
        job = self._jobs.get(job_id)
        if job is None or job.granted_at is None:
            return None
        return self._clock.now() - job.granted_at

    def _submitted(self, job: QueuedJob) -> None:
        self._jobs[job.id] = _Job(job)
        where = None if self.waits is None else self.waits.of(job.id)
        self._emit(
            "job.queued",
            job=job.id,
            consumer=job.consumer,
            label=job.label,
            priority=job.priority,
            exclusive=job.exclusive,
            position=None if where is None else where.position,
            expected_start_s=None if where is None else where.expected_start_s,
        )

    def _granted(self, grant: Grant) -> None:
        job = self._jobs.get(grant.job_id)
        if job is None:
            return
        job.granted_at, job.wait_s = self._clock.now(), grant.waited_s
        self._emit(
            "job.granted",
            job=grant.job_id,
            consumer=grant.consumer,
            label=job.queued.label,
            wait_s=grant.waited_s,
            swap=grant.prepare,  # this grant starts a tenure: residency may change first
        )

    def _finished(self, job_id: int, outcome: Outcome) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        run_s = None if job.granted_at is None else self._clock.now() - job.granted_at
        self._finish_event(job, outcome, run_s, self._core.finished_status)

    def _left(self, queued: QueuedJob, outcome: Outcome) -> None:
        job = self._jobs.pop(queued.id, None)
        if job is not None:
            job.wait_s = self._clock.now() - queued.enqueued_at
            self._finish_event(job, outcome, None)

    def _finish_event(
        self, job: _Job, outcome: Outcome, run_s: float | None, status: int | None = None
    ) -> None:
        self._emit(
            "job.finished",
            job=job.queued.id,
            consumer=job.queued.consumer,
            label=job.queued.label,
            outcome=str(outcome),
            wait_s=job.wait_s,
            run_s=run_s,  # None: it left the queue without running
            status=status,  # the upstream's 4xx/5xx of an upstream_error, else None
        )


# -- history: what /v1/status shows of the recent past ------------------------------------------


@dataclass
class EvictionRow:
    time: float
    target: str | None  # None: an unload asked for (admin, idle), nobody evicted for
    victims: list[str]
    need_mib: int | None
    headroom_mib: int | None
    outcome: str = "planned"  # planned, confirmed, failed
    detail: str = ""
    pending: set[str] = field(default_factory=set)  # victims' consumers not confirmed yet


class History:
    """The last jobs and evictions (newest last), kept from the events themselves."""

    def __init__(self, keep: int = RECENT) -> None:
        self.jobs: deque[dict[str, Any]] = deque(maxlen=keep)
        self.evictions: deque[EvictionRow] = deque(maxlen=keep)

    def __call__(self, event: Event) -> None:
        f = event.figures
        if event.type == "job.finished":
            self.jobs.append({"time": event.time, **f})
        elif event.type == "eviction.planned":
            victims = list(f["victims"])
            self.evictions.append(
                EvictionRow(
                    event.time,
                    f["target"],
                    victims,
                    f["need_mib"],
                    f["headroom_mib"],
                    pending={v.partition("/")[0] for v in victims},
                )
            )
        elif event.type in ("eviction.confirmed", "eviction.failed"):
            self._outcome(event)

    def _outcome(self, event: Event) -> None:
        f = event.figures
        name, failed = f["consumer"], event.type == "eviction.failed"
        for row in reversed(self.evictions):
            # A failure does not say for whom: the newest row still waiting for this victim.
            if name in row.pending and ("for_consumer" not in f or row.target == f["for_consumer"]):
                break
        else:  # an unload asked for: a row of its own
            unit = name if f.get("model") is None else f"{name}/{f['model']}"
            row = EvictionRow(event.time, None, [unit], None, None, pending={name})
            self.evictions.append(row)
        row.pending.discard(name)
        if failed:
            row.outcome, row.detail = "failed", f.get("reason", "")
        elif row.outcome != "failed" and not row.pending:
            row.outcome = "confirmed"
