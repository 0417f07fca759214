"""The lease's fast paths: a job granted at once, and `answer_first` (a relayed job that ends
well with nobody waiting is finished right after its handler's answer goes out)."""

from __future__ import annotations

import asyncio

import pytest

from conftest import wait_for
from mgpumanager.clock import FakeClock
from mgpumanager.registry import SchedulerConfig
from mgpumanager.scheduling.core import ConsumerPolicy, Outcome, SchedulerCore
from mgpumanager.scheduling.lease import Lease


def make_lease() -> tuple[Lease, list[tuple[int, Outcome]]]:
    core = SchedulerCore(
        SchedulerConfig(), {"a": ConsumerPolicy(), "b": ConsumerPolicy()}, FakeClock()
    )
    finished: list[tuple[int, Outcome]] = []
    core.on_finish.append(lambda job_id, outcome: finished.append((job_id, outcome)))

    return Lease(core, AlwaysResident()), finished


class AlwaysResident:
    """A tenure with nothing to prepare: every consumer is resident already."""

    async def ensure_resident(self, consumer: str, model: str | None = None) -> None:
        raise AssertionError("nothing to prepare")

    def ready(self, consumer: str, model: str | None = None) -> bool:
        return True

    def resident_set(self) -> frozenset[str]:
        return frozenset({"a", "b"})

    def swap_costs(self) -> dict[str, float]:
        return {}


async def test_a_job_granted_at_once_leaves_no_waiter_behind() -> None:
    lease, finished = make_lease()
    async with lease.job("a", queue_timeout_s=5) as job:
        assert lease.core.in_flight == 1 and lease.core.holder == "a"
        assert not lease._waiters
    assert finished == [(job.id, Outcome.COMPLETED)]  # finished on the way out


async def test_answer_first_finishes_after_the_handler_has_returned() -> None:
    lease, finished = make_lease()
    async with lease.job("a", queue_timeout_s=5, answer_first=True) as job:
        pass
    # Still held on the way out: what the handler returns is written first.
    assert lease.core.in_flight == 1 and finished == []
    await wait_for(lambda: lease.core.in_flight == 0, what="the deferred finish")
    assert finished == [(job.id, Outcome.COMPLETED)]
    assert await lease.drain(5)


async def test_answer_first_hands_over_at_once_when_a_job_waits() -> None:
    lease, finished = make_lease()
    granted = asyncio.Event()

    async def waiter() -> None:
        async with lease.job("b", queue_timeout_s=5):
            granted.set()

    async with lease.job("a", queue_timeout_s=5, answer_first=True) as first:
        task = asyncio.create_task(waiter())
        await wait_for(lambda: lease.core.queue_depth == 1, what="b queued")
    # Somebody waited: no deferral, the handoff happened on the way out.
    assert finished == [(first.id, Outcome.COMPLETED)]
    assert lease.core.holder == "b"
    await asyncio.wait_for(granted.wait(), 5)
    await task


@pytest.mark.parametrize("error", [RuntimeError("upstream broke"), asyncio.CancelledError()])
async def test_answer_first_finishes_a_failed_job_at_once(error: BaseException) -> None:
    lease, finished = make_lease()
    with pytest.raises(type(error)):
        async with lease.job("a", queue_timeout_s=5, answer_first=True) as job:
            raise error
    outcome = Outcome.CANCELLED if isinstance(error, asyncio.CancelledError) else Outcome.FAILED
    assert finished == [(job.id, outcome)] and lease.core.in_flight == 0
