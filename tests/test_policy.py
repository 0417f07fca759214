"""The order of the scheduler's jobs (policy.py), step by step with a fake clock: priority,
aging, swap affinity and its bounds, the choice of a new tenure, swap costs."""

from __future__ import annotations

import functools

import pytest

from conftest import core, done, grant_one
from mgpumanager.clock import FakeClock
from mgpumanager.config import SchedulerConfig
from mgpumanager.policy import PRIORITY, SWAP_AMORTIZATION, affinity_window_s
from mgpumanager.scheduler import ConsumerPolicy, Outcome, SchedulerCore

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
        SchedulerConfig(**config),  # type: ignore[arg-type]
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
        SchedulerConfig(**config),  # type: ignore[arg-type]
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


def test_a_cheap_swap_shortens_how_long_affinity_holds_others_back() -> None:
    c = three(FakeClock(), affinity_wait_s=10)
    window = functools.partial(affinity_window_s, c.settings)
    assert window("a", {"a": 0.25}) == pytest.approx(SWAP_AMORTIZATION * 0.25)
    assert window("a", {"a": 60.0}) == 10  # never longer than affinity_wait_s
    assert window("a", {}) == 10  # unknown: the configured window

    def third_grant(costs: dict[str, float]) -> str:
        clock = FakeClock()
        c = three(clock, affinity_wait_s=10, max_batch=100)
        x = grant_one_after_submit(c, "a")
        c.submit("b")
        for _ in range(3):
            c.submit("a")
        done(c, x)
        first = grant_one(c, swap_cost_s=costs)
        clock.advance(2.0)  # b held back 2 s
        done(c, first)
        return c.running[grant_one(c, swap_cost_s=costs)].consumer

    assert third_grant({"a": 0.25}) == "b"  # 8 x 0.25 s = 2 s: not worth holding b longer
    assert third_grant({"a": 3.0}) == "a"  # an expensive swap: the full 10 s window
    assert third_grant({}) == "a"


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
    c = three(FakeClock(), affinity_wait_s=4)
    window = functools.partial(affinity_window_s, c.settings)
    assert window("a", {"a": -1.0}) == 4
    assert window("a", {"a": float("inf")}) == 4
    assert window(None, {"a": 0.0}) == 4
    assert window("a", {"a": 0.0}) == 0  # free swaps: no reason to hold anyone


def test_fifo_ignores_residency_and_costs() -> None:
    clock = FakeClock()
    c = three(clock, policy="fifo", affinity_wait_s=100)
    x = grant_one_after_submit(c, "a")
    b = c.submit("b")
    c.submit("a")
    done(c, x)
    assert grant_one(c, resident=frozenset({"a"}), swap_cost_s={"b": 9.0}) == b
