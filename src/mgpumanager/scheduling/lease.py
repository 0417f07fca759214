"""The async side of the scheduler: turns SchedulerCore's decisions into awaited grants.

`Lease.job(consumer)` is an async context manager around one job's time on the GPU:

    async with lease.job("ollama", priority=None, queue_timeout_s=600) as job:
        ...  # the consumer is resident and holds the lease; stream the request

Waiting is cancellable at any moment (client disconnect, queue timeout): the job leaves the
queue at once and the next one is not held up. A grant that starts a tenure asks its `Tenure`
(residency) to make the consumer resident before the job proceeds. All state lives in the core,
which is only touched from the event loop between awaits, so it has exactly one owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Set
from typing import Any, Protocol

from mgpumanager.errors import BrokerError, ClientDisconnected, ErrorCode
from mgpumanager.registry import SchedulerConfig
from mgpumanager.scheduling.core import ConsumerPolicy, Grant, Outcome, SchedulerCore

log = logging.getLogger(__name__)

# Told when a job must wait: (job id, "queued") when it is not granted at once, (job id,
# "loading") when its grant must make its consumer or model resident first. Synchronous, called
# before the wait begins (a streamed request's headers go out then).
OnWait = Callable[[int, str], None]


class Tenure(Protocol):
    """What the lease asks of residency when it hands the GPU to a consumer."""

    async def ensure_resident(self, consumer: str, model: str | None = None) -> None:
        """Make `consumer` (and, for a per-model consumer, `model`) resident, evicting whoever
        is in the way; a job's tenure begins once this returns."""

    def ready(self, consumer: str, model: str | None = None) -> bool:
        """Nothing to prepare: it (and its model) is resident already."""

    def resident_set(self) -> Set[str]:
        """Who is resident now (the core prefers them: no swap)."""

    def swap_costs(self) -> Mapping[str, float]:
        """What bringing each consumer in has cost, in seconds (the core weighs swaps by it)."""


class JobHandle:
    """A running job. `hold_until` keeps the lease after the handler returns (ComfyUI)."""

    def __init__(self, lease: Lease, grant: Grant) -> None:
        self._lease = lease
        self.grant = grant
        self.id = grant.job_id
        self.consumer = grant.consumer
        self.outcome = Outcome.COMPLETED
        self.status: int | None = None  # the upstream's HTTP status, when it answered 4xx/5xx
        self._held: asyncio.Task[Any] | None = None

    def hold_until(self, work: Awaitable[Any], *, timeout_s: float) -> None:
        """Keep the lease until `work` finishes (or `timeout_s` passes), even after the client
        has its answer and left. The job is finished by the background task instead."""
        self._held = asyncio.ensure_future(self._lease._hold(self, work, timeout_s))
        self._lease._held.add(self._held)
        self._held.add_done_callback(self._lease._held.discard)

    @property
    def held(self) -> bool:
        return self._held is not None


class JobContext:
    """`async with lease.job(...) as job`: waits for the grant and prepares the consumer on
    entry; on exit the job's outcome (from the exception that ended it, if any) finishes it,
    unless `hold_until` keeps the lease past the handler. (A class rather than a generator:
    this runs for every job.)"""

    __slots__ = ("_answer_first", "_args", "_handle", "_lease", "_on_wait", "_weights")

    def __init__(
        self,
        lease: Lease,
        consumer: str,
        priority: int | None,
        queue_timeout_s: float,
        exclusive: bool,
        model: str | None,
        label: str,
        answer_first: bool,
        weights: tuple[str, ...] = (),
        on_wait: OnWait | None = None,
    ) -> None:
        self._lease = lease
        self._on_wait = on_wait
        self._args = (consumer, priority, queue_timeout_s, exclusive, model, label)
        self._answer_first = answer_first
        self._weights = weights
        self._handle: JobHandle | None = None

    async def __aenter__(self) -> JobHandle:
        lease = self._lease
        consumer, priority, queue_timeout_s, exclusive, model, label = self._args
        grant = await lease._acquire(
            consumer,
            priority,
            queue_timeout_s,
            exclusive,
            label,
            model,
            self._weights,
            self._on_wait,
        )
        handle = self._handle = JobHandle(lease, grant)
        if exclusive or not (grant.prepare or model is not None):
            return handle
        try:
            if not lease.tenure.ready(consumer, model):
                if self._on_wait is not None:
                    self._on_wait(grant.job_id, "loading")
                # A residency change is never cut in half by a client that leaves: it runs to
                # its end (each step bounded by its own timeout), then the job is cancelled.
                await _run_to_end(lease.tenure.ensure_resident(consumer, model))
            if grant.prepare:
                lease.core.ready(grant.job_id)
                if lease.core.queue_depth:  # others may join the tenure now
                    lease.dispatch()
        except BaseException as exc:
            handle.outcome = _outcome_of(exc)
            lease._finish(handle)
            raise
        return handle

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        handle = self._handle
        assert handle is not None
        if exc is not None:
            handle.outcome = _outcome_of(exc)
        if handle.held:
            return
        lease = self._lease
        if self._answer_first and exc is None and not lease.core.queue_depth:
            # Nobody waits for the lease: finishing (the counts, the events) runs once the
            # handler's task yields, after it has written a small answer, so that client does
            # not wait for the bookkeeping. With jobs waiting the handoff comes first.
            asyncio.get_running_loop().call_soon(lease._finish, handle)
        else:
            lease._finish(handle)


def _outcome_of(exc: BaseException) -> Outcome:
    """How a job that ended with `exc` is counted."""
    if isinstance(exc, asyncio.CancelledError | ClientDisconnected):
        return Outcome.CANCELLED
    if isinstance(exc, BrokerError):
        return Outcome.TIMED_OUT if exc.code is ErrorCode.UPSTREAM_TIMEOUT else Outcome.FAILED
    return Outcome.FAILED


class Lease:
    def __init__(self, core: SchedulerCore, tenure: Tenure) -> None:
        self.core = core
        self.tenure = tenure
        self._waiters: dict[int, asyncio.Future[Grant]] = {}
        self._held: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def job(
        self,
        consumer: str,
        *,
        priority: int | None = None,
        queue_timeout_s: float,
        exclusive: bool = False,
        model: str | None = None,
        label: str = "",
        answer_first: bool = False,
        weights: tuple[str, ...] = (),
        on_wait: OnWait | None = None,
    ) -> JobContext:
        """`exclusive=True` for jobs that change residency themselves (admin load/unload): they
        run alone, with no prepare step, and nothing else is granted until they finish.
        `model`: the model the job needs; a job joining a tenure still prepares it.
        `label`: what the job is (its route), shown in the queue and the events.
        `answer_first`: a relayed job whose handler sends its answer on return: when it ends
        well and nobody waits, it is finished right after (the next loop callbacks), not before
        the answer leaves. `weights`: file names its body says it loads (read ahead).
        `on_wait`: told when the job must wait (OnWait)."""
        return JobContext(
            self,
            consumer,
            priority,
            queue_timeout_s,
            exclusive,
            model,
            label,
            answer_first,
            weights,
            on_wait,
        )

    async def _acquire(
        self,
        consumer: str,
        priority: int | None,
        timeout_s: float,
        exclusive: bool,
        label: str,
        model: str | None = None,
        weights: tuple[str, ...] = (),
        on_wait: OnWait | None = None,
    ) -> Grant:
        job_id = self.core.submit(
            consumer, priority, exclusive=exclusive, label=label, model=model, weights=weights
        )
        mine = self._dispatch(job_id)
        if mine is not None:  # granted at once (the lease was free): nothing to wait for
            return mine
        if on_wait is not None:
            on_wait(job_id, "queued")
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._waiters[job_id] = future
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            if self._withdraw(job_id, Outcome.TIMED_OUT):
                raise BrokerError(
                    ErrorCode.QUEUE_TIMEOUT,
                    f"waited {timeout_s:g} s for the GPU (queue_timeout_s)",
                    consumer=consumer,
                ) from None
            return future.result()  # granted in the same instant: the job goes ahead
        except asyncio.CancelledError:
            if not self._withdraw(job_id, Outcome.CANCELLED) and _granted(future):
                # Granted in the same instant as the cancel: give the grant straight back.
                self.core.finish(job_id, Outcome.CANCELLED)
                self.dispatch()
            raise
        finally:
            self._waiters.pop(job_id, None)

    def _withdraw(self, job_id: int, outcome: Outcome) -> bool:
        """Leave the queue at once. False if the job was no longer waiting."""
        if self.core.cancel(job_id, outcome):
            self.dispatch()
            return True
        return False

    def _finish(self, handle: JobHandle) -> None:
        self.core.finish(handle.id, handle.outcome, handle.status)
        self.dispatch()

    async def _hold(self, handle: JobHandle, work: Awaitable[Any], timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await work
        except TimeoutError:
            handle.outcome = Outcome.TIMED_OUT
            log.warning(
                "%s: held job %d still running after %g s", handle.consumer, handle.id, timeout_s
            )
        except asyncio.CancelledError:
            handle.outcome = Outcome.CANCELLED
            raise
        except Exception:
            handle.outcome = Outcome.FAILED
            log.exception("%s: held job %d failed", handle.consumer, handle.id)
        finally:
            self._finish(handle)

    def dispatch(self) -> None:
        """Ask the core what may start now and wake those waiters."""
        self._dispatch(None)

    def _dispatch(self, arriving: int | None) -> Grant | None:
        """`dispatch`; the grant of job `arriving` (just submitted, no waiter yet) is returned
        rather than woken, None if it must wait."""
        # `startable` first: most calls (a job of the holder at its max) can grant nothing, and
        # the figures schedule() takes cost more than that answer.
        grants = (
            self.core.schedule(self.tenure.resident_set(), self.tenure.swap_costs())
            if self.core.startable
            else []
        )
        mine = None
        for grant in grants:
            if grant.job_id == arriving:
                mine = grant
                continue
            future = self._waiters.get(grant.job_id)
            if future is None or future.done():
                # Nobody is waiting any more (cannot normally happen: cancel removes the job
                # from the core first). Give the grant back rather than leak the lease.
                log.error("grant for job %d without a waiter; releasing it", grant.job_id)
                self.core.finish(grant.job_id, Outcome.CANCELLED)
                continue
            future.set_result(grant)
        if self.core.in_flight == 0:
            self._idle.set()
        else:
            self._idle.clear()
        return mine

    def reconfigure(
        self, settings: SchedulerConfig, consumers: Mapping[str, ConsumerPolicy]
    ) -> int:
        """A reloaded registry: new settings and consumers; jobs queued for a consumer that is
        gone fail with no_consumer. Answers how many."""
        dropped = self.core.reconfigure(settings, consumers)
        for job_id, consumer in dropped:
            self._fail_waiter(
                job_id,
                BrokerError(
                    ErrorCode.NO_CONSUMER,
                    f"{consumer} was removed from the registry while this job waited",
                    consumer=consumer,
                ),
            )
        self.dispatch()
        return len(dropped)

    def shutdown(self) -> None:
        """Refuse new jobs; every queued job fails with shutting_down."""
        for job_id in self.core.stop_accepting():
            self._fail_waiter(
                job_id, BrokerError(ErrorCode.SHUTTING_DOWN, "the broker is shutting down")
            )

    def _fail_waiter(self, job_id: int, error: BrokerError) -> None:
        """A job the core has already dropped from its queue: its waiter gets `error`."""
        future = self._waiters.get(job_id)
        if future is not None and not future.done():
            future.set_exception(error)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing runs (in-flight jobs and held ComfyUI prompts). False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def cancel_held(self) -> None:
        for task in list(self._held):
            task.cancel()
        await asyncio.gather(*self._held, return_exceptions=True)


def _granted(future: asyncio.Future[Grant]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


async def _run_to_end(work: Awaitable[None]) -> None:
    """Await `work` to its end even if the caller is cancelled meanwhile; then re-raise the
    cancellation. (asyncio.shield alone would let the caller go on while `work` still runs.)"""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise  # the work itself was cancelled
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
