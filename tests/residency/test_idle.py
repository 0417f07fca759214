"""Idle unload and warm restore on a fake clock: the residency layer with recording fake
adapters and a fake card (tests/test_records.py), a real lease, and IdleKeeper.tick() called
by hand."""

from __future__ import annotations

import asyncio

from test_records import World

from mgpumanager.registry import IdleConfig
from mgpumanager.residency.idle import IdleKeeper
from mgpumanager.residency.records import State
from mgpumanager.scheduling.core import ConsumerPolicy, SchedulerCore
from mgpumanager.scheduling.lease import Lease


class Box(World):
    """World's two consumers (a: 14000 MiB, b: 12000 MiB on 24000) behind a lease."""

    def __init__(self, *, idle_unload_s: float | None = None, warm: list[str] | None = None):
        super().__init__()
        consumers = {
            n: c.model_copy(update={"idle_unload_s": idle_unload_s if n == "a" else None})
            for n, c in self.config.consumers.items()
        }
        idle = IdleConfig(warm=warm or [], warm_after_s=30)
        self.config = self.config.model_copy(update={"consumers": consumers, "idle": idle})
        self.residency.view.config = self.config
        core = SchedulerCore(
            self.config.scheduler, {n: ConsumerPolicy() for n in consumers}, self.clock
        )
        self.lease = Lease(core, self.residency)
        self.keeper = IdleKeeper(lambda: self.config, self.residency, self.lease, self.clock)


async def test_a_consumer_unused_for_idle_unload_s_is_unloaded_and_confirmed() -> None:
    box = Box(idle_unload_s=60)
    box.set("a", State.RESIDENT)
    box.set("b", State.UNLOADED)
    box.residency.view.records["a"].last_used = box.clock.now()
    await box.keeper.tick()
    assert box.state("a") is State.RESIDENT  # used just now
    box.clock.advance(61)
    await box.keeper.tick()
    assert box.state("a") is State.UNLOADED
    assert box.adapters["a"].calls.count("unload") == 1
    assert box.card.held == {}
    assert box.residency.view.counters.evictions == 1


async def test_no_idle_unload_while_a_job_runs() -> None:
    box = Box(idle_unload_s=60)
    box.set("a", State.RESIDENT)
    box.set("b", State.UNLOADED)
    box.clock.advance(120)
    async with box.lease.job("a", queue_timeout_s=5):
        await box.keeper.tick()
        assert box.state("a") is State.RESIDENT
    assert "unload" not in box.adapters["a"].calls


async def test_warm_restore_waits_for_warm_after_s_of_idle_gpu() -> None:
    box = Box(warm=["a"])
    box.set("a", State.UNLOADED)
    box.set("b", State.UNLOADED)
    async with box.lease.job("b", queue_timeout_s=5):
        pass  # a job just ended: the GPU is idle from now
    await box.keeper.tick()
    assert box.keeper.warming is None  # idle 0 s
    box.clock.advance(29)
    await box.keeper.tick()
    assert box.keeper.warming is None
    box.clock.advance(1)
    await box.keeper.tick()
    assert box.keeper.warming is not None
    await box.keeper.warming
    assert box.state("a") is State.RESIDENT
    assert box.adapters["a"].calls[-1] == "load"
    await box.keeper.tick()  # nothing left to warm
    assert box.keeper.next_warm() is None


async def test_a_job_that_arrives_during_a_warm_load_cancels_it_and_runs_first() -> None:
    box = Box(warm=["a"])
    box.set("a", State.UNLOADED)
    box.set("b", State.UNLOADED)
    gate = box.adapters["a"].load_gate = asyncio.Event()
    box.clock.advance(30)
    await box.keeper.tick()
    warming = box.keeper.warming
    assert warming is not None
    await box.adapters["a"].load_started.wait()
    assert box.state("a") is State.LOADING

    ran: list[str] = []

    async def job() -> None:
        box.keeper.interrupt()  # what Broker.run_job does first
        async with box.lease.job("b", queue_timeout_s=5):
            ran.append("b")

    await asyncio.wait_for(job(), 5)
    assert ran == ["b"]
    assert warming.cancelled()
    # The cut-off load left `a` unknown (it may hold part of its memory), so b's room was made
    # by unloading it first: the card never held both.
    assert box.adapters["a"].calls.count("unload") == 1
    assert box.state("b") is State.RESIDENT and box.state("a") is State.UNLOADED
    assert box.card.held == {"b": 12000}
    gate.set()
