"""Where a waiting job stands: the core's waiting_estimates (its expected order and start, from
the run times it has measured and the swap costs) and QueueWaits (one reading for many)."""

from __future__ import annotations

from conftest import core
from mgpumanager.clock import FakeClock
from mgpumanager.scheduling.core import Outcome
from mgpumanager.scheduling.waits import QueueWaits, WaitEstimate


def test_order_and_start_follow_priority_run_times_and_swaps() -> None:
    clock = FakeClock()
    c = core(clock, policy="priority")
    for name, run_s in (("ollama", 4.0), ("comfyui", 20.0), ("mvoice", 1.0)):
        job = c.submit(name)
        [grant] = c.schedule(frozenset({name}))
        if grant.prepare:
            c.ready(grant.job_id)
        clock.advance(run_s)
        c.finish(job, Outcome.COMPLETED)
    running = c.submit("comfyui")
    [grant] = c.schedule(frozenset({"comfyui"}))
    c.ready(grant.job_id)
    clock.advance(5.0)  # 15 s of its 20 s left
    low = c.submit("ollama")  # priority 2
    high = c.submit("mvoice")  # priority 3: goes first
    later = c.submit("ollama")
    estimates = c.waiting_estimates({"mvoice": 2.0, "ollama": 3.0})
    assert [(j.id, start) for j, start in estimates] == [
        (high, 15.0 + 2.0),  # after the running job, with its swap
        (low, 17.0 + 1.0 + 3.0),
        (later, 21.0 + 4.0),  # same consumer as the one before: no swap
    ]
    assert running not in [j.id for j, _ in estimates]


def test_an_unknown_run_time_leaves_the_start_unknown() -> None:
    clock = FakeClock()
    c = core(clock)
    first = c.submit("comfyui")
    c.schedule()
    waiting = c.submit("ollama")
    assert [(j.id, s) for j, s in c.waiting_estimates()] == [(waiting, None)]
    assert first in c.running


def test_queue_waits_reads_once_for_many_and_places_late_arrivals() -> None:
    clock = FakeClock()
    c = core(clock)
    c.submit("comfyui")
    c.schedule()
    ids = [c.submit("ollama") for _ in range(12)]
    waits = QueueWaits(c, clock)
    assert waits.of(ids[0]) == WaitEstimate(0, None)
    assert [waits.all()[i].position for i in ids] == list(range(12))
    assert waits.of(10**6) is None  # not waiting
