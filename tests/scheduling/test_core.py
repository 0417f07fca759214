"""The scheduler core's lease and queue, driven step by step with a fake clock: no sleeps, no
sockets. The order of the jobs (policy.py) is tested in test_policy.py."""

from __future__ import annotations

from typing import cast

import pytest

from conftest import core, done, grant_one
from mgpumanager.clock import FakeClock
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import SchedulerConfig
from mgpumanager.scheduling.core import ConsumerPolicy, Outcome, SchedulerCore
from mgpumanager.scheduling.order import FIFO, PRIORITY, Order, QueuedJob, QueueView


def test_first_job_is_granted_with_prepare_and_blocks_others_until_ready() -> None:
    c = core()
    a = c.submit("ollama")
    b = c.submit("ollama")
    [grant] = c.schedule()
    assert (grant.job_id, grant.consumer, grant.prepare) == (a, "ollama", True)
    assert c.schedule() == []  # preparing: residency is changing, nothing else starts
    c.ready(a)
    [second] = c.schedule()
    assert (second.job_id, second.prepare) == (b, False)  # max_concurrency 2: joins the holder


def test_jobs_of_different_consumers_never_overlap() -> None:
    c = core()
    a = c.submit("mvoice")
    b = c.submit("ollama")
    [g] = c.schedule()
    c.ready(g.job_id)
    assert g.job_id == a
    assert c.schedule() == []  # ollama waits for mvoice to finish
    assert c.holder == "mvoice"
    c.finish(a, Outcome.COMPLETED)
    [g2] = c.schedule()
    assert (g2.job_id, g2.prepare) == (b, True)
    assert c.stats().handoffs == 1


def test_max_concurrency_bounds_the_holder() -> None:
    c = core()
    ids = [c.submit("ollama") for _ in range(3)]
    [g] = c.schedule()
    c.ready(g.job_id)
    more = c.schedule()
    assert [x.job_id for x in more] == [ids[1]]
    assert c.in_flight == 2
    c.finish(ids[0], Outcome.COMPLETED)
    assert [x.job_id for x in c.schedule()] == [ids[2]]


def test_holder_drains_before_another_consumer_runs_in_fifo() -> None:
    c = core()
    o1 = c.submit("ollama")
    m = c.submit("mvoice")
    o2 = c.submit("ollama")
    [g] = c.schedule()
    c.ready(g.job_id)
    # FIFO: mvoice is next, so ollama's second job does not join although a slot is free.
    assert c.schedule() == []
    c.finish(o1, Outcome.COMPLETED)
    assert [x.job_id for x in c.schedule()] == [m]
    c.ready(m)
    c.finish(m, Outcome.COMPLETED)
    assert [x.job_id for x in c.schedule()] == [o2]


def test_cancel_while_waiting_leaves_at_once_and_next_job_is_not_held_up() -> None:
    c = core()
    a = c.submit("mvoice")
    b = c.submit("ollama")
    d = c.submit("comfyui")
    [g] = c.schedule()
    c.ready(g.job_id)
    assert c.queue_depth == 2
    assert c.cancel(b)
    assert c.queue_depth == 1
    assert not c.cancel(b)  # twice is a no-op
    c.finish(a, Outcome.COMPLETED)
    assert [x.job_id for x in c.schedule()] == [d]
    assert c.stats().cancelled == 1


def test_statistics_move_as_specified() -> None:
    clock = FakeClock()
    c = core(clock)
    s = c.stats()
    assert (s.queue_depth, s.in_flight, s.total_jobs, s.oldest_queued, s.holder) == (
        0,
        0,
        0,
        None,
        None,
    )
    a = c.submit("mvoice")
    clock.advance(0.5)
    b = c.submit("ollama")
    clock.advance(0.25)
    s = c.stats()
    assert (s.queue_depth, s.total_jobs) == (2, 2)
    assert s.oldest_queued == pytest.approx(750.0)
    [g] = c.schedule()
    c.ready(g.job_id)
    s = c.stats()
    assert (s.queue_depth, s.in_flight, s.holder) == (1, 1, "mvoice")
    assert s.last_wait_ms == pytest.approx(750.0)
    assert s.oldest_queued == pytest.approx(250.0)
    assert s.consumers["mvoice"].in_flight == 1
    assert s.consumers["ollama"].queue_depth == 1
    clock.advance(2.0)
    c.finish(a, Outcome.COMPLETED)
    s = c.stats()
    assert s.last_run_ms == pytest.approx(2000.0)
    assert (s.in_flight, s.completed, s.holder) == (0, 1, None)
    [g2] = c.schedule()
    assert g2.job_id == b
    assert c.stats().last_wait_ms == pytest.approx(2250.0)
    c.finish(b, Outcome.FAILED)
    s = c.stats()
    assert (s.failed, s.queue_depth, s.oldest_queued) == (1, 0, None)


def test_queue_full_carries_retry_after() -> None:
    c = core(max_queue=2)
    c.submit("mvoice")
    c.submit("mvoice")
    with pytest.raises(BrokerError) as info:
        c.submit("ollama")
    assert info.value.code is ErrorCode.QUEUE_FULL
    assert info.value.status == 503
    assert int(info.value.headers["Retry-After"]) >= 1


def test_stop_accepting_hands_back_waiting_jobs_and_refuses_new_ones() -> None:
    c = core()
    a = c.submit("mvoice")
    b = c.submit("ollama")
    [g] = c.schedule()
    assert g.job_id == a
    assert c.stop_accepting() == [b]
    with pytest.raises(BrokerError) as info:
        c.submit("mvoice")
    assert info.value.code is ErrorCode.SHUTTING_DOWN
    assert c.in_flight == 1  # the running job is left to finish


def test_exclusive_job_runs_alone() -> None:
    c = core()
    a = c.submit("ollama")
    x = c.submit("ollama", exclusive=True)
    [g] = c.schedule()
    c.ready(g.job_id)
    assert c.schedule() == []  # although ollama has a free slot
    c.finish(a, Outcome.COMPLETED)
    [gx] = c.schedule()
    assert gx.job_id == x
    c.submit("ollama")
    assert c.schedule() == []  # nothing joins an exclusive job


def test_reconfigure_applies_new_settings_and_hands_back_jobs_of_removed_consumers() -> None:
    clock = FakeClock()
    c = core(clock)
    running = c.submit("comfyui")
    grant_one(c)
    gone = [c.submit("ollama"), c.submit("ollama")]
    kept = c.submit("mvoice")
    dropped = c.reconfigure(
        SchedulerConfig(policy="priority", max_queue=1),
        {"mvoice": ConsumerPolicy(4), "comfyui": ConsumerPolicy(1)},
    )
    assert dropped == [(gone[0], "ollama"), (gone[1], "ollama")]
    assert c.queue_depth == 1 and c.stats().failed == 2
    assert set(c.stats().consumers) == {"mvoice", "comfyui"}
    with pytest.raises(BrokerError) as info:
        c.submit("mvoice")  # the new max_queue
    assert info.value.code is ErrorCode.QUEUE_FULL
    with pytest.raises(BrokerError):
        c.submit("ollama")  # gone
    done(c, running)
    assert grant_one(c) == kept


def test_observers_see_every_grant_and_every_finished_job_in_order() -> None:
    clock = FakeClock()
    c = core(clock)
    seen: list[tuple[str, int, object]] = []
    c.on_grant.append(lambda g: seen.append(("grant", g.job_id, (g.consumer, g.waited_s))))
    c.on_finish.append(lambda job, outcome: seen.append(("finish", job, outcome)))
    a = c.submit("ollama")
    b = c.submit("mvoice")
    clock.advance(2)
    assert grant_one(c) == a
    assert c.cancel(b)  # a job that never ran is no grant and no finish
    c.finish(a, Outcome.FAILED)
    assert seen == [("grant", a, ("ollama", 2.0)), ("finish", a, Outcome.FAILED)]


def test_the_order_follows_the_settings_unless_one_is_given() -> None:
    class Newest:
        """An order of its own: the newest class head (here, the job that came last)."""

        name = "newest"

        def pick(self, queue: QueueView) -> QueuedJob:
            return max(queue.heads, key=lambda j: j.id)

    c = core(policy="fifo")
    assert c.order is FIFO and c.stats().policy == "fifo"
    c.reconfigure(SchedulerConfig(policy="priority"), consumers())
    # Read afresh: mypy keeps `c.order` narrowed to FifoOrder by the assert above, though the
    # reconfigure changed it (a property).
    assert cast(Order, c.order) is PRIORITY and c.stats().policy == "priority"

    given = SchedulerCore(SchedulerConfig(policy="fifo"), consumers(), FakeClock(), order=Newest())
    jobs = [given.submit(n) for n in ("mvoice", "comfyui", "ollama")]
    assert grant_one(given) == jobs[-1]
    given.reconfigure(SchedulerConfig(policy="priority"), consumers())
    assert given.stats().policy == "newest"  # a given order stays, whatever the settings say


def consumers() -> dict[str, ConsumerPolicy]:
    return {n: ConsumerPolicy(priority=2) for n in ("mvoice", "ollama", "comfyui")}


# -- the queue by class, and the measured run times ----------------------------------------------


class Heads:
    """The priority order, recording how many jobs each pick was shown."""

    name = "priority"

    def __init__(self) -> None:
        self.shown: list[int] = []

    def pick(self, queue: QueueView) -> QueuedJob:
        self.shown.append(len(queue.heads))
        return PRIORITY.pick(queue)


def test_an_order_sees_one_head_per_consumer_and_priority_however_deep_the_queue() -> None:
    order = Heads()
    c = SchedulerCore(
        SchedulerConfig(policy="priority", max_queue=5000, affinity_wait_s=0),
        consumers(),
        FakeClock(),
        order=order,
    )
    jobs = [c.submit(n, p) for _ in range(1000) for n, p in (("mvoice", 2), ("ollama", 3))]
    urgent = c.submit("mvoice", 4)
    assert grant_one(c) == urgent
    assert order.shown == [3]  # mvoice at 2 and at 4, ollama at 3: three classes, 2001 jobs
    assert c.cancel(jobs[1])  # the head of ollama's class leaves: the next one stands for it
    done(c, urgent)
    assert grant_one(c) == jobs[3]
    stats = c.stats()
    assert stats.consumers["mvoice"].queue_depth == 1000
    assert stats.consumers["ollama"].queue_depth == 998
    assert stats.queue_depth == 1998


def test_within_a_consumer_and_priority_jobs_go_in_arrival_order() -> None:
    clock = FakeClock()
    c = SchedulerCore(SchedulerConfig(policy="priority", affinity_wait_s=0), consumers(), clock)
    jobs = []
    for _ in range(5):
        jobs.append(c.submit("ollama"))
        clock.advance(1)
    c.cancel(jobs[2])
    order = []
    for _ in range(4):
        order.append(grant_one(c))
        done(c, order[-1])
    assert order == [jobs[0], jobs[1], jobs[3], jobs[4]]


def test_run_times_are_measured_from_ready_to_finish_preferring_warm_grants() -> None:
    clock = FakeClock()
    c = SchedulerCore(SchedulerConfig(policy="priority"), consumers(), clock)
    cold = c.submit("comfyui")
    [g] = c.schedule()  # not resident: its run may carry a lazy load
    clock.advance(5)  # the swap (prepare) is not part of the run
    c.ready(g.job_id)
    clock.advance(11)
    done(c, cold)
    assert c.recent_run_s == {"comfyui": 11}
    for run_s in (3, 2, 4):
        job = c.submit("comfyui")
        [g] = c.schedule(resident=frozenset({"comfyui"}))
        c.ready(g.job_id)
        clock.advance(run_s)
        done(c, job)
    assert c.recent_run_s == {"comfyui": 3}  # the warm runs' median; the lazy load left out
    for outcome in (Outcome.FAILED, Outcome.CANCELLED, Outcome.TIMED_OUT):
        job = c.submit("comfyui")
        grant_one(c, resident=frozenset({"comfyui"}))
        clock.advance(100)
        c.finish(job, outcome)  # only completed jobs are samples
    admin = c.submit("ollama", exclusive=True)
    assert grant_one(c) == admin
    clock.advance(100)
    done(c, admin)  # an admin load is no run
    assert c.recent_run_s == {"comfyui": 3}


class Costs:
    """The priority order, recording the swap costs each pick was shown."""

    name = "priority"

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def pick(self, queue: QueueView) -> QueuedJob:
        self.seen.append(dict(queue.swap_cost_s))
        return PRIORITY.pick(queue)


def test_a_load_inside_the_first_job_after_a_swap_counts_in_its_swap_cost() -> None:
    clock = FakeClock()
    order = Costs()
    c = SchedulerCore(SchedulerConfig(policy="priority"), consumers(), clock, order=order)
    measured = {"comfyui": 0.5, "ollama": 2.0}  # comfyui: its unload alone (no load call)

    def run(consumer: str, run_s: float, resident: frozenset[str]) -> None:
        job = c.submit(consumer)
        [g] = c.schedule(resident, measured)
        c.ready(g.job_id)
        clock.advance(run_s)
        done(c, job)

    def costs_shown() -> dict[str, float]:
        """The costs the order is shown: two jobs wait (with one, no order is asked); the
        one granted ends cancelled, which is no run sample."""
        jobs = {c.submit("mvoice"), c.submit("mvoice")}
        [g] = c.schedule(frozenset(), measured)
        [other] = jobs - {g.job_id}
        assert c.cancel(other)
        c.ready(g.job_id)
        c.finish(g.job_id, Outcome.CANCELLED)
        return order.seen[-1]

    run("comfyui", 9.0, frozenset())  # after a swap: an 8 s lazy load inside the job
    run("comfyui", 1.0, frozenset())
    assert costs_shown() == measured  # no job while resident yet: nothing to compare with
    run("comfyui", 1.0, frozenset({"comfyui"}))
    run("ollama", 3.0, frozenset())  # cold and warm runs alike: nothing to add
    run("ollama", 3.0, frozenset({"ollama"}))
    # The cold runs' median (9 and 1: 5 s) less the warm one's (1 s); ollama's runs are equal.
    shown = costs_shown()
    assert shown == {"comfyui": 0.5 + 4.0, "ollama": 2.0}
    assert measured == {"comfyui": 0.5, "ollama": 2.0}  # the caller's figures, unchanged
    assert "mvoice" not in shown  # no figure from the residency: still unknown


def test_a_run_time_is_the_median_of_the_last_samples() -> None:
    clock = FakeClock()
    c = SchedulerCore(SchedulerConfig(policy="priority"), consumers(), clock)
    for run_s in (100, 100, 100, 1, 1, 1, 1, 1, 1):  # nine: the first falls out of eight
        job = c.submit("ollama")
        grant_one(c, resident=frozenset({"ollama"}))
        clock.advance(run_s)
        done(c, job)
    assert c.recent_run_s["ollama"] == 1
    c.reconfigure(SchedulerConfig(policy="priority"), {"mvoice": ConsumerPolicy()})
    assert c.recent_run_s == {}  # a consumer that is gone leaves no figure behind


def test_startable_says_whether_schedule_could_grant() -> None:
    c = core()  # ollama: two at once
    assert not c.startable  # nothing waits
    a = c.submit("ollama")
    assert c.startable
    [g] = c.schedule()
    c.submit("ollama")
    assert not c.startable  # a tenure is being prepared
    c.ready(g.job_id)
    assert c.startable  # a second slot
    assert len(c.schedule()) == 1
    c.submit("ollama")
    assert not c.startable  # both slots taken
    c.finish(a, Outcome.COMPLETED)
    assert c.startable


def test_next_tenure_is_the_orders_pick_among_the_other_consumers() -> None:
    c = core(policy="priority")
    running = c.submit("comfyui")
    grant_one(c)
    assert c.next_tenure() is None and not c.others_waiting
    c.submit("comfyui")  # the holder's own: no next tenure in view
    assert c.next_tenure() is None and not c.others_waiting
    ollama = c.submit("ollama", model="llm:8b")
    assert c.others_waiting
    forecast = c.next_tenure()
    assert forecast is not None and (forecast.id, forecast.model) == (ollama, "llm:8b")
    urgent = c.submit("mvoice", priority=4, weights=("voice.bin",))
    forecast = c.next_tenure()
    assert forecast is not None and (forecast.id, forecast.weights) == (urgent, ("voice.bin",))
    assert c.waiting[urgent].weights == ("voice.bin",)
    done(c, running)
    assert c.preparing is False
    [grant] = c.schedule()  # the lease passes as forecast
    assert grant.job_id == urgent and c.preparing
