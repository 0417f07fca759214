"""The order of the scheduler's jobs (policy.py), step by step with a fake clock: priority,
aging, swap affinity and its bounds, the choice of a new tenure, swap costs."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import core, done, grant_one
from mgpumanager.clock import FakeClock
from mgpumanager.registry import SchedulerConfig
from mgpumanager.scheduling.core import ConsumerPolicy, Outcome, SchedulerCore
from mgpumanager.scheduling.order import (
    BACKLOG_FACTOR,
    FIFO,
    PRIORITY,
    SWAP_AMORTIZATION,
    QueuedJob,
    QueueView,
    affinity_window_s,
    deadline_s_of,
    known_costs,
)

# -- the priority policy -----------------------------------------------------------------------


def test_priority_orders_waiting_jobs() -> None:
    clock = FakeClock()
    c = core(clock, policy="priority", affinity_wait_s=0)
    first = c.submit("comfyui")  # holds the lease
    [g] = c.schedule()
    c.ready(g.job_id)
    low = c.submit("comfyui")  # priority 1
    mid = c.submit("ollama")  # priority 2
    urgent = c.submit("mvoice")  # priority 3
    c.finish(first, Outcome.COMPLETED)
    order = []
    for _ in range(3):
        [g] = c.schedule()
        order.append(g.job_id)
        c.ready(g.job_id)
        c.finish(g.job_id, Outcome.COMPLETED)
    assert order == [urgent, mid, low]


def test_aging_lifts_a_waiting_job_one_level_per_aging_s() -> None:
    clock = FakeClock()
    c = core(clock, policy="priority", aging_s=10, affinity_wait_s=0)
    running = c.submit("mvoice")
    [g] = c.schedule()
    c.ready(g.job_id)
    old_low = c.submit("comfyui")  # priority 1
    clock.advance(25)  # two levels: 3
    fresh = c.submit("ollama")  # priority 2
    c.finish(running, Outcome.COMPLETED)
    [g] = c.schedule()
    assert g.job_id == old_low
    assert fresh in {j for j in c.waiting}


def test_header_priority_is_clamped() -> None:
    c = core(policy="priority", affinity_wait_s=0)
    running = c.submit("comfyui")
    [g] = c.schedule()
    c.ready(g.job_id)
    boosted = c.submit("comfyui", priority=99)  # clamps to 4
    normal = c.submit("mvoice")  # priority 3
    c.finish(running, Outcome.COMPLETED)
    assert [x.job_id for x in c.schedule()] == [boosted]
    assert normal in c.waiting


def test_affinity_prefers_the_holder_until_the_oldest_waited_long_enough() -> None:
    clock = FakeClock()
    c = core(clock, policy="priority", affinity_wait_s=5, aging_s=1000)
    c2 = SchedulerCore(
        SchedulerConfig(policy="priority", affinity_wait_s=5, aging_s=1000),
        {"a": ConsumerPolicy(2), "b": ConsumerPolicy(2)},
        clock,
    )
    del c
    first = c2.submit("a")
    [g] = c2.schedule()
    c2.ready(g.job_id)
    other = c2.submit("b")
    clock.advance(1)
    same = c2.submit("a")
    c2.finish(first, Outcome.COMPLETED)
    [g] = c2.schedule()
    assert g.job_id == same  # a swap saved: "a" is still the holder
    c2.ready(same)
    again = c2.submit("a")
    clock.advance(5)  # "b" has now waited 6 s > affinity_wait_s
    c2.finish(same, Outcome.COMPLETED)
    [g] = c2.schedule()
    assert g.job_id == other
    assert again in c2.waiting


def test_max_batch_bounds_consecutive_holder_grants_while_others_wait() -> None:
    clock = FakeClock()
    c = SchedulerCore(
        SchedulerConfig(policy="priority", affinity_wait_s=1000, aging_s=1000, max_batch=2),
        {"a": ConsumerPolicy(2), "b": ConsumerPolicy(2)},
        clock,
    )
    a1 = c.submit("a")
    [g] = c.schedule()
    c.ready(g.job_id)
    b1 = c.submit("b")
    a2 = c.submit("a")
    a3 = c.submit("a")
    c.finish(a1, Outcome.COMPLETED)
    [g] = c.schedule()
    assert g.job_id == a2  # second consecutive grant for the holder
    c.ready(a2)
    c.finish(a2, Outcome.COMPLETED)
    [g] = c.schedule()
    assert g.job_id == b1  # max_batch reached while b waits: hand over
    assert a3 in c.waiting


def test_resident_consumer_is_preferred_over_a_cold_one() -> None:
    clock = FakeClock()
    c = SchedulerCore(
        SchedulerConfig(policy="priority", affinity_wait_s=10, aging_s=1000),
        {"a": ConsumerPolicy(2), "b": ConsumerPolicy(2), "c": ConsumerPolicy(2)},
        clock,
    )
    a = c.submit("a")
    [g] = c.schedule()
    c.ready(g.job_id)
    cold = c.submit("b")
    warm = c.submit("c")
    c.finish(a, Outcome.COMPLETED)
    [g] = c.schedule(resident=frozenset({"a", "c"}))
    assert g.job_id == warm
    assert cold in c.waiting


# -- the priority policy, step by step ----------------------------------------------------------


def three(clock: FakeClock, **settings: object) -> SchedulerCore:
    """Consumers a, b, c, all priority 2, one job at a time; aging out of the way by default."""
    config: dict[str, object] = {"policy": "priority", "aging_s": 1000, **settings}
    return SchedulerCore(
        SchedulerConfig(**config),
        {"a": ConsumerPolicy(2), "b": ConsumerPolicy(2), "c": ConsumerPolicy(2)},
        clock,
    )


def test_equal_levels_go_in_arrival_order() -> None:
    clock = FakeClock()
    c = three(clock, affinity_wait_s=0)
    jobs = [c.submit(n) for n in ("b", "c", "a", "b")]
    order = []
    for _ in jobs:
        j = grant_one(c)
        order.append(j)
        done(c, j)
    assert order == jobs


def test_aging_gains_exactly_one_level_per_aging_s_and_stops_at_four() -> None:
    clock = FakeClock()
    c = SchedulerCore(
        SchedulerConfig(policy="priority", aging_s=10, affinity_wait_s=0),
        {"low": ConsumerPolicy(0), "top": ConsumerPolicy(4)},
        clock,
    )
    busy = c.submit("top")
    grant_one(c)
    low = c.submit("low")
    clock.advance(39.999)  # three levels: 3 < 4
    top = c.submit("top")
    done(c, busy)
    assert grant_one(c) == top
    assert low in c.waiting
    clock.advance(0.001)  # 40 s waited: level 4, capped there, and older than any newcomer
    newcomer = c.submit("top")
    done(c, top)
    assert grant_one(c) == low
    clock.advance(1000)
    assert PRIORITY.level(c.waiting[newcomer], clock.now(), c.settings) == 4


def test_header_priority_below_zero_clamps_to_zero() -> None:
    clock = FakeClock()
    c = core(clock, policy="priority", affinity_wait_s=0)
    busy = c.submit("comfyui")
    grant_one(c)
    lowered = c.submit("mvoice", priority=-5)  # 0, below comfyui's 1
    normal = c.submit("comfyui")
    done(c, busy)
    assert grant_one(c) == normal
    assert lowered in c.waiting


def test_a_higher_level_beats_affinity() -> None:
    clock = FakeClock()
    c = core(clock, policy="priority", affinity_wait_s=100)
    busy = c.submit("comfyui")  # priority 1, holds the lease
    grant_one(c)
    mine = c.submit("comfyui")
    urgent = c.submit("mvoice")  # priority 3
    done(c, busy)
    assert grant_one(c) == urgent
    assert mine in c.waiting


def test_affinity_bound_affinity_wait_s_hands_over_mid_batch() -> None:
    clock = FakeClock()
    c = three(clock, affinity_wait_s=5, max_batch=100)
    a = grant_one_after_submit(c, "a")
    b = c.submit("b")
    more = [c.submit("a") for _ in range(4)]
    clock.advance(3)  # a's first job (its swap, a lazy load) is not affinity holding b back
    done(c, a)  # the window opens now
    assert grant_one(c) == more[0]
    clock.advance(4.9)
    done(c, more[0])
    assert grant_one(c) == more[1]  # b held back 4.9 s < 5 s
    clock.advance(0.1)
    done(c, more[1])
    assert grant_one(c) == b  # 5 s: the first bound
    assert set(more[2:]) <= set(c.waiting)


def test_a_job_that_came_after_the_window_opened_is_held_back_from_its_arrival() -> None:
    clock = FakeClock()
    c = three(clock, affinity_wait_s=5, max_batch=100)
    a = grant_one_after_submit(c, "a")
    more = [c.submit("a") for _ in range(3)]
    done(c, a)
    assert grant_one(c) == more[0]  # nobody else waits
    clock.advance(10)
    b = c.submit("b")
    clock.advance(4)
    done(c, more[0])
    assert grant_one(c) == more[1]  # b came 4 s ago
    clock.advance(1)
    done(c, more[1])
    assert grant_one(c) == b


def grant_one_after_submit(c: SchedulerCore, consumer: str) -> int:
    job = c.submit(consumer)
    assert grant_one(c) == job
    return job


def test_affinity_bound_max_batch_counts_the_tenure_and_concurrent_grants() -> None:
    clock = FakeClock()
    c = SchedulerCore(
        SchedulerConfig(policy="priority", aging_s=1000, affinity_wait_s=1000, max_batch=3),
        {"a": ConsumerPolicy(2, max_concurrency=4), "b": ConsumerPolicy(2)},
        clock,
    )
    first = grant_one_after_submit(c, "a")
    b = c.submit("b")
    mine = [c.submit("a") for _ in range(4)]
    # Slots are free, but the tenure has room for 2 more grants while b waits.
    assert [g.job_id for g in c.schedule()] == mine[:2]
    assert c.schedule() == []  # draining: a gets nothing more
    for j in (first, *mine[:2]):
        done(c, j)
    assert grant_one(c) == b
    done(c, b)
    assert [g.job_id for g in c.schedule()] == [mine[2]]  # a's turn again: a new tenure


def test_max_batch_does_not_apply_while_others_wait_only_at_lower_levels() -> None:
    clock = FakeClock()
    c = SchedulerCore(
        SchedulerConfig(policy="priority", aging_s=1000, affinity_wait_s=0, max_batch=1),
        {"hi": ConsumerPolicy(3), "lo": ConsumerPolicy(1)},
        clock,
    )
    running = grant_one_after_submit(c, "hi")
    lo = c.submit("lo")
    jobs = [c.submit("hi") for _ in range(3)]
    for j in jobs:
        done(c, running)
        running = grant_one(c)
        assert running == j  # priority, not affinity: max_batch is about equals
    assert lo in c.waiting


def test_a_new_tenure_gets_a_fresh_affinity_window_after_a_backlog() -> None:
    """mq-deadline checks deadlines when a batch starts: an expired job gets the lease, then its
    consumer may batch again, so a backlog older than the window does not degrade to FIFO (one
    swap per job)."""
    clock = FakeClock()
    c = three(clock, affinity_wait_s=5, max_batch=8)
    x = grant_one_after_submit(c, "c")
    backlog = [c.submit(n) for n in ("a", "b", "a", "b", "a", "b")]
    clock.advance(10)  # everything has waited past affinity_wait_s
    done(c, x)
    order = []
    for _ in backlog:
        j = grant_one(c)
        order.append(j)
        done(c, j)
    a1, b1, a2, b2, a3, b3 = backlog
    assert order == [a1, a2, a3, b1, b2, b3]  # two tenures, not six


def test_an_expired_job_beats_the_resident_preference() -> None:
    clock = FakeClock()
    c = three(clock, affinity_wait_s=5, max_batch=1)
    x = grant_one_after_submit(c, "a")
    cold = c.submit("b")
    warm = c.submit("c")
    clock.advance(1)
    done(c, x)
    assert grant_one(c, resident=frozenset({"a", "c"})) == warm  # 1 s: a swap saved
    later = c.submit("c")
    clock.advance(4)
    done(c, warm)
    assert grant_one(c, resident=frozenset({"a", "c"})) == cold  # 5 s: its deadline passed
    assert later in c.waiting


def test_when_the_batch_is_spent_a_resident_consumer_goes_before_a_cold_older_one() -> None:
    clock = FakeClock()
    c = three(clock, affinity_wait_s=100, max_batch=1)
    x = grant_one_after_submit(c, "a")
    cold = c.submit("b")
    mine = c.submit("a")
    warm = c.submit("c")
    done(c, x)
    assert grant_one(c, resident=frozenset({"a", "c"})) == warm  # not a: its batch is spent
    assert {cold, mine} <= set(c.waiting)


def test_a_new_tenure_never_passes_a_higher_priority_for_a_resident_consumer() -> None:
    clock = FakeClock()
    c = two_level(clock, aging_s=1, affinity_wait_s=100)
    x = grant_one_after_submit(c, "other")
    old_bg = c.submit("bg")  # priority 2, level 4 after 2 s
    clock.advance(2)
    urgent = c.submit("tts")  # priority 4: reached level 4 after old_bg did
    clock.advance(1)
    warm_bg = c.submit("bg")
    done(c, x)
    # The tenure goes to the best level's highest priority (tts); a resident bg job may not
    # pass it, even though bg's own oldest job is ahead of it.
    assert grant_one(c, resident=frozenset({"bg"})) == urgent
    assert {old_bg, warm_bg} <= set(c.waiting)


def test_a_new_tenure_never_passes_a_higher_priority_of_the_outgoing_holder() -> None:
    """h's batch is spent, so the lease goes to another consumer; its next job has priority 3,
    below the best level but above b's, so b (resident) may not go first: a, there first."""
    clock = FakeClock()
    c = SchedulerCore(
        SchedulerConfig(policy="priority", aging_s=1, affinity_wait_s=100, max_batch=1),
        {"h": ConsumerPolicy(3), "a": ConsumerPolicy(2), "b": ConsumerPolicy(2)},
        clock,
    )
    x = grant_one_after_submit(c, "h")
    first = c.submit("a")
    clock.advance(2)  # a: level 4 by age
    mine = c.submit("h")  # priority 3, level 3
    warm = c.submit("b")  # priority 2, level 2, resident
    done(c, x)
    assert grant_one(c, resident=frozenset({"h", "b"})) == first
    assert {mine, warm} <= set(c.waiting)


def two_level(clock: FakeClock, **settings: object) -> SchedulerCore:
    """bg (priority 2, two at once) and tts (priority 4)."""
    config: dict[str, object] = {"policy": "priority", **settings}
    return SchedulerCore(
        SchedulerConfig(**config),
        {"bg": ConsumerPolicy(2), "tts": ConsumerPolicy(4), "other": ConsumerPolicy(2)},
        clock,
    )


def test_an_aged_job_joins_its_new_level_behind_those_that_were_there_first() -> None:
    clock = FakeClock()
    c = two_level(clock, aging_s=10, affinity_wait_s=0)
    x = grant_one_after_submit(c, "other")
    old = c.submit("bg")  # reaches level 4 at +20 s
    clock.advance(15)
    urgent = c.submit("tts")  # level 4 from +15 s: there first
    clock.advance(10)
    late = c.submit("tts")  # level 4 from +25 s
    done(c, x)
    order = []
    for _ in range(3):
        j = grant_one(c)
        order.append(j)
        done(c, j)
    assert order == [urgent, old, late]  # arrival order would have put `old` first


def test_affinity_never_passes_a_job_of_higher_priority() -> None:
    clock = FakeClock()
    c = two_level(clock, aging_s=10, affinity_wait_s=100, max_batch=100)
    x = grant_one_after_submit(c, "bg")
    aged = [c.submit("bg") for _ in range(2)]
    clock.advance(20)  # both at level 4 by age, from +20 s
    urgent = c.submit("tts")  # at level 4 by priority, from +20 s: behind them
    done(c, x)
    assert grant_one(c) == aged[0]
    done(c, aged[0])
    assert grant_one(c) == aged[1]  # first in line: no affinity needed
    mine = c.submit("bg")
    clock.advance(5)
    done(c, aged[1])
    assert grant_one(c) == urgent  # `mine` would pass it: not for a lower priority
    assert mine in c.waiting


def test_affinity_passes_an_aged_job_of_the_same_priority_within_its_bounds() -> None:
    clock = FakeClock()
    c = two_level(clock, aging_s=1, affinity_wait_s=5, max_batch=100)
    x = grant_one_after_submit(c, "bg")
    other = c.submit("other")
    clock.advance(3)  # other: level 4 by age; bg's next jobs come fresh, at level 2
    mine = [c.submit("bg") for _ in range(3)]
    done(c, x)
    assert grant_one(c) == mine[0]  # a swap saved, levels apart
    clock.advance(4.9)
    done(c, mine[0])
    assert grant_one(c) == mine[1]
    clock.advance(0.1)
    done(c, mine[1])
    assert grant_one(c) == other  # held back 5 s since the window opened


# -- swap costs ----------------------------------------------------------------------------------


def view(**fields: object) -> QueueView:
    """A queue view for the window's arithmetic: holder a, nothing else unless given."""
    base: dict[str, object] = {
        "heads": [],
        "queued": {},
        "run_s": {},
        "holder": "a",
        "window_opened_at": 0.0,
        "tenure_grants": 1,
        "now": 0.0,
        "resident": frozenset(),
        "swap_cost_s": {},
        "settings": SchedulerConfig(affinity_wait_s=100),
    }
    return QueueView(**{**base, **fields})  # type: ignore[arg-type]


def test_the_window_is_twice_the_work_queued_for_the_others_at_most_affinity_wait_s() -> None:
    runs = {"a": 1.0, "b": 2.0, "c": 0.5}
    assert affinity_window_s(view(queued={"a": 9, "b": 1}, run_s=runs), "b") == 4.0
    assert affinity_window_s(view(queued={"b": 3, "c": 2}, run_s=runs), "b") == 14.0
    assert affinity_window_s(view(queued={"b": 30}, run_s=runs), "b") == 100  # the cap
    # A waiting consumer never measured: its work is unknown, the cap applies.
    assert affinity_window_s(view(queued={"b": 1, "d": 1}, run_s=runs), "b") == 100
    assert BACKLOG_FACTOR == 2.0


def test_the_window_is_at_most_eight_times_the_swap_it_saves() -> None:
    costs = {"a": 0.25, "b": 0.5}
    many = view(queued={"b": 100}, run_s={"b": 1.0}, swap_cost_s=costs)
    assert affinity_window_s(many, "b") == pytest.approx(SWAP_AMORTIZATION * 0.75)
    resident = view(queued={"b": 100}, run_s={"b": 1.0}, swap_cost_s=costs, resident={"b"})
    assert affinity_window_s(resident, "b") == pytest.approx(SWAP_AMORTIZATION * 0.25)
    # Either cost unknown: no such bound (the next consumer may be expensive to come back from).
    assert affinity_window_s(view(queued={"b": 100}, swap_cost_s={"a": 0.25}), "b") == 100
    free = view(queued={"b": 1}, run_s={"b": 1.0}, swap_cost_s={"a": 0.0}, resident={"b"})
    assert affinity_window_s(free, "b") == 0  # free swaps: no reason to hold anyone


def test_the_deadline_is_twice_all_the_queued_work_at_most_affinity_wait_s() -> None:
    runs = {"a": 1.0, "b": 2.0}
    assert deadline_s_of(view(queued={"a": 2, "b": 1}, run_s=runs)) == 8.0
    assert deadline_s_of(view(queued={"a": 2, "b": 100}, run_s=runs)) == 100
    assert deadline_s_of(view(queued={"a": 2, "c": 1}, run_s=runs)) == 100  # c: unknown


def measured(c: SchedulerCore, clock: FakeClock, runs: dict[str, float]) -> None:
    """Run one job of each consumer for the given time, so that the core knows its run time."""
    for name, run_s in runs.items():
        job = c.submit(name)
        assert grant_one(c, resident=frozenset(runs)) == job
        clock.advance(run_s)
        done(c, job)


def held_back(waiting_b: int) -> int:
    """How many of a's jobs (1 s each) go before b's first, with `waiting_b` jobs of b (2 s
    each) waiting from when a's window opened."""
    clock = FakeClock()
    c = three(clock, affinity_wait_s=100, max_batch=1000, max_queue=1000)
    measured(c, clock, {"b": 2.0, "a": 1.0})  # a holds the lease; its window opens now
    bs = {c.submit("b") for _ in range(waiting_b)}
    mine = [c.submit("a") for _ in range(200)]
    count = 0
    while True:
        job = grant_one(c, resident=frozenset({"a", "b"}))
        if job in bs:
            return count
        assert job == mine[count]
        count += 1
        clock.advance(1.0)
        done(c, job)


def test_affinity_holds_others_back_longer_as_their_queue_grows() -> None:
    assert held_back(1) == 4  # 2 x 2 s of b's work: a's jobs for 4 s, then b
    assert held_back(3) == 12
    assert held_back(60) == 100  # 240 s of work: the cap, affinity_wait_s


def new_tenure(waited_s: float, warm_jobs: int = 1) -> str:
    """Whose is the next tenure: b's job (cold), waiting for `waited_s`, or c's (resident),
    with `warm_jobs` of c queued; every run measured at 1 s."""
    clock = FakeClock()
    c = three(clock, affinity_wait_s=100)
    measured(c, clock, {"b": 1.0, "c": 1.0, "a": 1.0})
    c.submit("b")
    for _ in range(warm_jobs):
        c.submit("c")
    clock.advance(waited_s)
    return c.running[grant_one(c, resident=frozenset({"c"}))].consumer


def test_the_resident_consumer_goes_first_until_the_deadline_twice_the_queued_work() -> None:
    assert new_tenure(3.9) == "c"  # 2 s of work queued: a swap saved
    assert new_tenure(4.0) == "b"  # 4 s = 2 x 2 s: b's deadline has passed
    assert new_tenure(4.0, warm_jobs=3) == "c"  # 4 s of work queued: 8 s


def test_among_cold_consumers_the_cheapest_known_swap_goes_first() -> None:
    clock = FakeClock()
    c = three(clock, affinity_wait_s=10)
    x = grant_one_after_submit(c, "a")
    unknown = c.submit("b")
    pricey = c.submit("c")
    clock.advance(1)
    done(c, x)
    order_costs = {"b": float("nan"), "c": 3.0, "a": 0.1}  # b's figure is unusable: unknown
    assert grant_one(c, swap_cost_s=order_costs) == pricey  # known beats unknown
    done(c, pricey)
    assert grant_one(c, swap_cost_s=order_costs) == unknown


def test_cheapest_swap_yields_to_the_oldest_once_its_deadline_passed() -> None:
    clock = FakeClock()
    c = three(clock, affinity_wait_s=3)
    x = grant_one_after_submit(c, "a")
    pricey = c.submit("b")
    cheap = c.submit("c")
    clock.advance(3)
    done(c, x)
    assert grant_one(c, swap_cost_s={"b": 5.0, "c": 0.1}) == pricey
    assert cheap in c.waiting


def test_negative_or_infinite_costs_are_ignored() -> None:
    assert known_costs({"a": -1.0, "b": float("inf"), "c": float("nan"), "d": 0.0}) == {"d": 0.0}
    assert known_costs(None) == {}

    clock = FakeClock()
    c = three(clock, affinity_wait_s=10, max_batch=100)
    x = grant_one_after_submit(c, "a")
    b = c.submit("b")
    mine = [c.submit("a") for _ in range(2)]
    done(c, x)
    broken = {"a": -1.0, "b": float("inf")}
    assert grant_one(c, swap_cost_s=broken) == mine[0]
    clock.advance(9)
    done(c, mine[0])
    assert grant_one(c, swap_cost_s=broken) == mine[1]  # unknown costs: the full 10 s
    clock.advance(1)
    done(c, mine[1])
    assert grant_one(c, swap_cost_s=broken) == b


def test_fifo_ignores_residency_and_costs() -> None:
    clock = FakeClock()
    c = three(clock, policy="fifo", affinity_wait_s=100)
    x = grant_one_after_submit(c, "a")
    b = c.submit("b")
    c.submit("a")
    done(c, x)
    assert grant_one(c, resident=frozenset({"a"}), swap_cost_s={"b": 9.0}) == b


# -- the heads stand for their classes -----------------------------------------------------------


@st.composite
def queues(draw: st.DrawFn) -> tuple[QueueView, QueueView]:
    """A random queue, seen as the core shows it (one head per consumer and priority) and as
    every job it holds. Few consumers and priorities, so that classes hold several jobs."""
    names = ["a", "b", "c"]
    priorities = draw(st.sampled_from([[2], [1, 2], [0, 2, 4], [0, 1, 2, 3, 4]]))
    now = 0.0
    jobs = []
    for i in range(draw(st.integers(1, 30))):
        now += draw(st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 10))
        name, priority = draw(st.sampled_from(names)), draw(st.sampled_from(priorities))
        jobs.append(QueuedJob(i + 1, name, priority, now))
    heads: dict[tuple[str, int], QueuedJob] = {}
    queued: dict[str, int] = {}
    for j in jobs:
        heads.setdefault((j.consumer, j.priority), j)
        queued[j.consumer] = queued.get(j.consumer, 0) + 1
    config = SchedulerConfig(
        aging_s=draw(st.sampled_from([1.0, 5.0, 30.0])),
        affinity_wait_s=draw(st.sampled_from([0.0, 2.0, 10.0, 120.0])),
        max_batch=draw(st.integers(1, 4)),
    )
    known = st.none() | st.sampled_from([0.0, 0.5, 3.0])
    shown = QueueView(
        heads=list(heads.values()),
        queued=queued,
        run_s={n: s for n in names if (s := draw(known)) is not None},
        holder=draw(st.none() | st.sampled_from(names)),
        window_opened_at=draw(st.none() | st.sampled_from([j.enqueued_at for j in jobs])),
        tenure_grants=draw(st.integers(0, 4)),
        now=now + draw(st.sampled_from([0.0, 1.0, 5.0]) | st.floats(0, 100)),
        resident=frozenset(draw(st.sets(st.sampled_from(names)))),
        swap_cost_s={n: s for n in names if (s := draw(known)) is not None},
        settings=config,
    )
    return shown, dataclasses.replace(shown, heads=jobs)


@settings(max_examples=1000, deadline=None)
@given(queues())
def test_a_pick_among_the_heads_is_the_pick_among_all_jobs(
    pair: tuple[QueueView, QueueView],
) -> None:
    shown, every = pair
    assert PRIORITY.pick(shown) == PRIORITY.pick(every)
    assert FIFO.pick(shown) == FIFO.pick(every) == min(every.heads, key=lambda j: j.id)
