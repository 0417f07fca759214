"""One scheduler over device sets (scheduling/devices.py), driven step by step with a fake clock,
then a discrete simulation over 2-4 devices checked by hypothesis."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgpumanager.clock import FakeClock
from mgpumanager.registry import SchedulerConfig
from mgpumanager.scheduling.core import ConsumerPolicy, Grant, Outcome
from mgpumanager.scheduling.devices import DeviceSets

G0, G1 = frozenset({"GPU-a"}), frozenset({"GPU-b"})
BOTH = G0 | G1


def box(clock: FakeClock | None = None, **settings: object) -> DeviceSets:
    """ollama on GPU 0, comfyui on GPU 1, speech on both."""
    return DeviceSets(
        SchedulerConfig.model_validate({"policy": "fifo", **settings}),
        {n: ConsumerPolicy() for n in ("ollama", "comfyui", "speech")},
        {"ollama": G0, "comfyui": G1, "speech": BOTH},
        clock or FakeClock(),
    )


def start(c: DeviceSets) -> list[Grant]:
    grants = c.schedule()
    for g in grants:
        if g.prepare:
            c.ready(g.job_id)
    return grants


def test_jobs_on_disjoint_devices_run_at_the_same_time() -> None:
    c = box()
    a, b = c.submit("ollama"), c.submit("comfyui")
    assert {g.job_id for g in start(c)} == {a, b}
    assert c.holders == ["comfyui", "ollama"]
    assert c.in_flight == 2


def test_a_job_on_both_devices_waits_for_both_and_holds_neither_meanwhile() -> None:
    c = box()
    a = c.submit("ollama")
    [g] = start(c)
    s = c.submit("speech")
    b = c.submit("comfyui")
    # speech is older, but GPU 0 is held: it takes nothing; comfyui's GPU 1 is free.
    assert [x.job_id for x in start(c)] == [b]
    c.finish(a, Outcome.COMPLETED)
    assert start(c) == []  # GPU 1 still held by comfyui
    c.finish(b, Outcome.COMPLETED)
    [gs] = start(c)
    assert gs.job_id == s and c.holders == ["speech"]
    x = c.submit("ollama")
    assert start(c) == []  # speech holds both
    c.finish(s, Outcome.COMPLETED)
    assert [g.job_id for g in start(c)] == [x]
    del g


def waited_for_both_cards(max_wait_s: float, steps: int = 40) -> float | None:
    """Both cards stay busy (each finished job is followed at once by another on its card)
    while a job for both waits: how long until it is granted, None if never within `steps`."""
    clock = FakeClock()
    c = box(clock, max_wait_s=max_wait_s)
    running = {c.submit("ollama"): "ollama", c.submit("comfyui"): "comfyui"}
    start(c)
    s, t0 = c.submit("speech"), clock.now()
    for _ in range(steps):
        clock.advance(1.0)
        job, name = next(iter(running.items()))
        del running[job]
        c.finish(job, Outcome.COMPLETED)
        running[c.submit(name)] = name
        for g in start(c):
            if g.job_id == s:
                return clock.now() - t0
            running[g.job_id] = g.consumer
    return None


def test_the_starvation_guard_reserves_the_devices_of_a_blocked_multi_device_job() -> None:
    waited = waited_for_both_cards(max_wait_s=10.0)
    assert waited is not None and waited <= 10.0 + 2.0  # the guard, then one drain per card
    assert waited_for_both_cards(max_wait_s=1e9) is None  # without it: starved


def test_status_figures_add_up_over_the_device_sets() -> None:
    c = box()
    c.submit("ollama")
    c.submit("comfyui")
    c.submit("speech")
    start(c)
    st_ = c.stats()
    assert (st_.queue_depth, st_.in_flight, st_.total_jobs) == (1, 2, 3)
    assert st_.holder == "comfyui, ollama"
    assert list(c.waiting) == [3] and sorted(c.running) == [1, 2]
    assert c.jobs_on("ollama") == 1 and c.jobs_on("speech") == 0


# -- the simulation -------------------------------------------------------------------------


def test_the_prefetch_forecast_reads_every_device_set() -> None:
    """What the prefetch asks of the core is merged over the sets: a job waiting on another
    card is in view, the forecast is the best of each set's own, and a job's model and weight
    files travel with it."""
    clock = FakeClock()
    c = box(clock, aging_s=30)
    assert c.next_tenure() is None and not c.others_waiting
    c.submit("ollama", 1, model="qwen2.5:14b")
    clock.advance(1)
    c.submit("comfyui", 3, weights=("flux.safetensors",))
    assert c.others_waiting
    job = c.next_tenure(frozenset(), {})
    assert job is not None and job.consumer == "comfyui" and job.weights == ("flux.safetensors",)
    ollama = c.cores[G0].next_tenure(frozenset(), {})
    assert ollama is not None and ollama.model == "qwen2.5:14b"


def test_every_waiting_job_has_a_place_and_an_expected_start_on_any_card() -> None:
    """Where each waiting job stands is read over every device set, in order of expected
    start: a job behind a short one on its own card starts before one behind a long one."""
    clock = FakeClock()
    c = box(clock)
    for name, run_s in (("ollama", 1.0), ("comfyui", 10.0)):
        job = c.submit(name)
        start(c)
        clock.advance(run_s)
        c.finish(job, Outcome.COMPLETED)
    c.submit("ollama"), c.submit("comfyui")
    assert len(start(c)) == 2  # one running on each card, with a run time known for each
    waiting_comfyui, waiting_ollama = c.submit("comfyui"), c.submit("ollama")
    estimates = c.waiting_estimates({})
    assert [(job.id, s) for job, s in estimates] == [(waiting_ollama, 1.0), (waiting_comfyui, 10.0)]


R = 1.0
CAPACITY_MIB = 16_000


@dataclass(frozen=True)
class Spec:
    devices: frozenset[int]
    cost_mib: int
    priority: int
    max_concurrency: int


@st.composite
def boxes(draw: st.DrawFn) -> tuple[int, dict[str, Spec], list[tuple[float, str, float]]]:
    n = draw(st.integers(2, 4))
    names = [f"c{i}" for i in range(draw(st.integers(2, 5)))]
    specs = {
        name: Spec(
            frozenset(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))),
            draw(st.integers(500, CAPACITY_MIB)),
            draw(st.integers(0, 4)),
            draw(st.integers(1, 3)),
        )
        for name in names
    }
    jobs = draw(
        st.lists(
            st.tuples(
                st.floats(0, 30, allow_nan=False),
                st.sampled_from(names),
                st.floats(0.05, R, allow_nan=False),
            ),
            min_size=1,
            max_size=40,
        )
    )
    return n, specs, sorted(jobs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(boxes())
def test_never_two_holders_on_a_device_no_oom_every_job_finishes_waits_bounded(
    case: tuple[int, dict[str, Spec], list[tuple[float, str, float]]],
) -> None:
    n, specs, arrivals = case
    max_wait_s, aging_s = 5.0, 3.0
    clock = FakeClock()
    uuid = [f"GPU-{i}" for i in range(n)]
    c = DeviceSets(
        SchedulerConfig(max_wait_s=max_wait_s, aging_s=aging_s, affinity_wait_s=2.0),
        {k: ConsumerPolicy(s.priority, s.max_concurrency) for k, s in specs.items()},
        {k: frozenset(uuid[d] for d in s.devices) for k, s in specs.items()},
        clock,
    )
    resident: dict[int, dict[str, float]] = {d: {} for d in range(n)}  # device -> name -> used
    oom = 0
    events: list[tuple[float, int, str, int]] = []  # (time, seq, what, job)
    seq = itertools.count()
    arrived: dict[int, float] = {}
    waits: dict[int, tuple[str, float]] = {}
    duration: dict[int, float] = {}
    for at, name, d in arrivals:
        heapq.heappush(events, (at, next(seq), f"arrive:{name}:{d}", 0))

    def running_names() -> set[str]:
        return {j.consumer for j in c.running.values()}

    def prepare(name: str) -> None:
        nonlocal oom
        busy = running_names() - {name}
        for dev in specs[name].devices:
            here = resident[dev]
            if name in here:
                continue
            used = sum(specs[r].cost_mib for r in here)
            for victim in sorted(here, key=lambda r: here[r]):
                if used + specs[name].cost_mib <= CAPACITY_MIB:
                    break
                if victim in busy:
                    continue
                for dv in specs[victim].devices:  # unloading frees it everywhere
                    resident[dv].pop(victim, None)
                used -= specs[victim].cost_mib
            if used + specs[name].cost_mib > CAPACITY_MIB:
                oom += 1
        for dev in specs[name].devices:
            resident[dev][name] = clock.now()

    def step() -> None:
        for g in c.schedule():
            held: dict[str, str] = {}
            for j in c.running.values():
                for d in specs[j.consumer].devices:
                    assert held.setdefault(uuid[d], j.consumer) == j.consumer, "two holders"
            if g.prepare:
                prepare(g.consumer)
                c.ready(g.job_id)
            waits[g.job_id] = (g.consumer, g.waited_s)
            heapq.heappush(events, (clock.now() + duration[g.job_id], next(seq), "done", g.job_id))

    while events:
        at, _, what, job = heapq.heappop(events)
        clock.advance(max(0.0, at - clock.now()))
        if what == "done":
            c.finish(job, Outcome.COMPLETED)
        else:
            _, name, run_s = what.split(":")
            job_id = c.submit(name)
            arrived[job_id] = at
            duration[job_id] = float(run_s)
        step()

    assert oom == 0
    assert c.queue_depth == 0 and c.in_flight == 0
    assert set(waits) == set(arrived)  # every job ran
    # A multi-device job waits at most: the guard's max_wait_s, then the reserved devices drain
    # (R), then its own set's core serves it as a one-card core would, within the bound of
    # test_core_properties; every other multi-device set may be reserved before it once.
    sets = {s.devices for s in specs.values() if len(s.devices) > 1}
    per_core = 4 * aging_s + R * (3 + 2 * len(arrivals))
    bound = (len(sets) + 1) * (max_wait_s + R + per_core)
    for name, waited in waits.values():
        if len(specs[name].devices) > 1:
            assert waited <= bound
