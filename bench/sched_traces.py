"""The scheduling benchmark's workload: the consumers' figures, the seeded traces, the settings
compared and the figures computed from a trace, shared by bench_sched.py (through a real
broker) and sched_model.py (on a model of the box).

Times in the traces are benchmark seconds: real-world seconds divided by the scale (SCALE).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCALE = 25.0  # real-world seconds per benchmark second
TOTAL_MIB = 24576
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Kind:
    """One facade kind and the consumer behind it, in real-world seconds."""

    consumer: str
    load_s: float  # vLLM: wake-up from sleep level 1
    run_s: float
    free_s: float  # driver lag: memory comes back this long after the unload answered
    mib: int


KINDS: Mapping[str, Kind] = {
    "tts": Kind("mvoice", load_s=2.0, run_s=0.5, free_s=0.5, mib=6000),
    "llm": Kind("ollama", load_s=5.0, run_s=2.5, free_s=1.0, mib=14000),
    "image": Kind("comfyui", load_s=8.0, run_s=3.0, free_s=1.0, mib=12300),
    "chat": Kind("vllm", load_s=1.0, run_s=1.5, free_s=0.5, mib=16000),
}


@dataclass(frozen=True)
class Job:
    # Benchmark seconds after the trace starts; in a closed-loop trace, the think time after the
    # same user's previous answer (or after the start, for the user's first job).
    at_s: float
    kind: str
    user: int = 0  # closed-loop traces: who sends it, one job at a time


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    priorities: Mapping[str, int]  # per consumer
    trace: tuple[Job, ...]
    # Closed loop: each user sends its next job when its previous one was answered, plus a think
    # time (Job.at_s); open loop (the overloaded traces): every job at its timestamp.
    closed: bool = False

    @property
    def kinds(self) -> list[str]:
        return sorted({j.kind for j in self.trace})

    def priority(self, kind: str) -> int:
        return self.priorities[KINDS[kind].consumer]


def scaled(seconds: float, scale: float) -> float:
    return seconds / scale


# -- traces (seeded) ---------------------------------------------------------------------------


def interleaved(rng: random.Random, scale: float, n: int) -> tuple[Job, ...]:
    """n jobs of four consumers in random order, Poisson arrivals at 1.5x what the GPU can run."""
    kinds = rng.choices(["tts", "llm", "image", "chat"], weights=[3, 3, 2, 3], k=n)
    mean_run = sum(KINDS[k].run_s for k in kinds) / n
    at, jobs = 0.0, []
    for kind in kinds:
        jobs.append(Job(scaled(at, scale), kind))
        at += rng.expovariate(1.5 / mean_run)
    return tuple(jobs)


def bursty(rng: random.Random, scale: float, bursts: int) -> tuple[Job, ...]:
    """Bursts of 10-24 jobs within 1 s, each led by one consumer (60 %) with the others mixed
    in; the next burst comes when 60 % of this one's run time has passed."""
    names = ["tts", "llm", "image", "chat"]
    at, jobs = 0.0, []
    for _ in range(bursts):
        lead = rng.choice(names)
        weights = [6 if k == lead else 4 / 3 for k in names]
        kinds = rng.choices(names, weights=weights, k=rng.randint(10, 24))
        for kind in kinds:
            jobs.append(Job(scaled(at + rng.uniform(0, 1.0), scale), kind))
        at += 0.6 * sum(KINDS[k].run_s for k in kinds)
    return tuple(sorted(jobs, key=lambda j: j.at_s))


def urgent(rng: random.Random, scale: float, window_s: float) -> tuple[Job, ...]:
    """Over `window_s`: TTS every ~4 s (Poisson); image and LLM jobs at 1.2x the GPU's rate."""
    jobs = []
    at = rng.uniform(0, 2)
    while at < window_s:
        jobs.append(Job(scaled(at, scale), "tts"))
        at += rng.expovariate(1 / 4.0)
    bg_mean_run = 0.4 * KINDS["image"].run_s + 0.6 * KINDS["llm"].run_s
    at = 0.0
    while at < window_s:
        kind = rng.choices(["image", "llm"], weights=[4, 6])[0]
        jobs.append(Job(scaled(at, scale), kind))
        at += rng.expovariate(1.2 / bg_mean_run)
    return tuple(sorted(jobs, key=lambda j: j.at_s))


# The light-load trace's users: (kind, mean think time in real-world seconds). Two users share
# the LLM and two the chat model, so the lease holder sometimes has a second job queued while
# another consumer's job waits: what swap affinity decides under light load.
LIGHT_USERS = (
    ("llm", 30.0),
    ("llm", 30.0),
    ("chat", 30.0),
    ("chat", 30.0),
    ("tts", 15.0),
    ("image", 45.0),
)
# The same users thinking 5-20 s: about half the GPU's time is work and a third swaps, so the
# lease holder often has a job queued. Where a window held for a fixed two minutes hurts.
BUSY_USERS = (
    ("llm", 5.0),
    ("llm", 5.0),
    ("chat", 5.0),
    ("chat", 5.0),
    ("tts", 10.0),
    ("image", 20.0),
)


def closed_loop(
    rng: random.Random, scale: float, window_s: float, users: Sequence[tuple[str, float]]
) -> tuple[Job, ...]:
    """Each user (kind, mean think time) sends a job, waits for the answer, thinks for an
    exponential time, sends the next; its think times add up to at most `window_s`."""
    jobs = []
    for user, (kind, think_s) in enumerate(users):
        at = rng.uniform(0, think_s)
        total = at
        while total < window_s:
            jobs.append(Job(scaled(at, scale), kind, user))
            at = rng.expovariate(1 / think_s)
            total += at
    return tuple(jobs)


def scenarios(seed: int, scale: float, quick: bool) -> list[Scenario]:
    rng = random.Random(seed)
    same = {"mvoice": 2, "ollama": 2, "comfyui": 2, "vllm": 2}
    return [
        Scenario(
            "a",
            "interleaved, 4 consumers",
            same,
            interleaved(rng, scale, 40 if quick else 120),
        ),
        Scenario("b", "bursty arrivals", same, bursty(rng, scale, 2 if quick else 6)),
        Scenario(
            "c",
            "urgent TTS (priority 4) under image + LLM load",
            {"mvoice": 4, "ollama": 2, "comfyui": 1},
            urgent(rng, scale, 40.0 if quick else 120.0),
        ),
        Scenario(
            "light",
            "light load, 6 users in closed loop",
            same,
            closed_loop(rng, scale, 100.0 if quick else 300.0, LIGHT_USERS),
            closed=True,
        ),
        Scenario(
            "busy",
            "busy closed loop, 6 users thinking 5-20 s",
            same,
            closed_loop(rng, scale, 100.0 if quick else 300.0, BUSY_USERS),
            closed=True,
        ),
    ]


# The shipped defaults, in real-world seconds: caps of the load-aware affinity window.
DEFAULTS = {"aging_s": 30.0, "affinity_wait_s": 120.0, "max_batch": 32}
# Tight caps, the fixed window that was the default before the window followed the load: what a
# box gets that wants nobody held back more than 10 s, whatever the load.
TIGHT = {"aging_s": 30.0, "affinity_wait_s": 10.0, "max_batch": 8}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_s": percentile(values, 50),
        "p95_s": percentile(values, 95),
        "p99_s": percentile(values, 99),
        "max_s": max(values, default=None),
    }


def lower_bounds(scenario: Scenario, scale: float) -> dict[str, float]:
    runs = sum(KINDS[j.kind].run_s for j in scenario.trace) / scale
    loads = sum(KINDS[k].load_s for k in scenario.kinds) / scale
    if scenario.closed:  # arrivals depend on the answers: only the work itself bounds it
        return {"lower_bound_s": runs + loads, "sum_run_s": runs}
    # Open-loop bound: no schedule ends before any arrival plus all the work from there on.
    first = min(j.at_s for j in scenario.trace)
    ordered = sorted(scenario.trace, key=lambda j: j.at_s)
    suffix, open_bound = 0.0, 0.0
    for job in reversed(ordered):
        suffix += KINDS[job.kind].run_s / scale
        open_bound = max(open_bound, job.at_s - first + suffix)
    return {"lower_bound_s": runs + loads, "sum_run_s": runs, "open_loop_bound_s": open_bound}
