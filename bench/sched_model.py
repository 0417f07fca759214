"""The scheduling benchmark's traces on a model of the GPU box instead of the real broker.

The same `SchedulerCore` the broker runs decides, on a fake clock; everything around it is
modelled from the consumers' figures (sched_traces.KINDS): a job holds the lease for its run
time, plus its consumer's load when it was not resident (ComfyUI's inside the job, as it loads
lazily), plus each eviction's wait for the memory to come back (the victim's `free_s`). Evicted
are the least recently used residents until the target fits on the card. Nothing else costs
time: no HTTP, no polling, no health probe.

Three uses (bench/README.md):
- beside each measured run, the policy's own makespan on the trace: the gap between the two is
  what the broker's plumbing costs at the benchmark's scale, where a few milliseconds per job
  weigh 25 times what they do at real-world speed;
- a sweep of the caps `affinity_wait_s` x `max_batch`, in seconds instead of minutes: what each
  buys in makespan and costs in wait;
- the defaults, the tight caps and FIFO on the traces of 20 seeds: whether the benchmark's one
  seed is typical.

A closed-loop trace (the light load) sends each user's next job when its previous one was
answered (ComfyUI answers once the prompt is queued, the others when the work is done), plus
the user's think time.

    .venv/bin/python bench/sched_model.py   # the sweep and 20 seeds, to results/sched_model.json
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sched_traces import (
    DEFAULTS,
    KINDS,
    RESULTS,
    SCALE,
    TIGHT,
    TOTAL_MIB,
    Kind,
    Scenario,
    lower_bounds,
    scenarios,
    summary,
)

from mgpumanager.clock import FakeClock
from mgpumanager.registry import SchedulerConfig
from mgpumanager.scheduling.core import ConsumerPolicy, Outcome, SchedulerCore

MARGIN_MIB = 512  # the broker's default safety margin
CONSUMERS: Mapping[str, Kind] = {k.consumer: k for k in KINDS.values()}


@dataclass
class Box:
    """What is resident, least recently used first, and the last swap costs seen."""

    scale: float
    resident: list[str]  # least recently used first
    unload_s: dict[str, float]
    load_s: dict[str, float]

    def swap_costs(self) -> dict[str, float]:
        """As the broker's residency gives them: unload + load call; ComfyUI's load happens
        inside its first job, which the scheduler core adds from its run times."""
        return {n: self.unload_s[n] + self.load_s[n] for n in self.unload_s if n in self.load_s}

    def make_resident(self, name: str) -> tuple[float, float]:
        """(seconds before the job can start, seconds of lazy load inside the job)."""
        if name in self.resident:
            self.resident.remove(name)
            self.resident.append(name)
            return 0.0, 0.0
        kind = CONSUMERS[name]
        prepare = 0.0
        # Like the planner: those that may not coexist with the target first (mvoice may
        # coexist with everyone, as bench_sched's registry declares), least recently used first.
        order = sorted(self.resident, key=lambda n: n == "mvoice" or name == "mvoice")
        while sum(CONSUMERS[n].mib for n in self.resident) + kind.mib > TOTAL_MIB - MARGIN_MIB:
            victim = order.pop(0)
            self.resident.remove(victim)
            self.unload_s[victim] = CONSUMERS[victim].free_s / self.scale
            prepare += self.unload_s[victim]
        load = kind.load_s / self.scale  # vLLM: a wake-up from sleep
        self.resident.append(name)
        if name == "comfyui":  # no load call: the first prompt loads the model
            self.load_s[name] = 0.0  # as the broker: its swap cost is its unload alone (below)
            return prepare, load
        self.load_s[name] = load
        return prepare + load, 0.0


def simulate(
    scenario: Scenario, policy: str, settings: Mapping[str, float], scale: float = SCALE
) -> dict[str, Any]:
    """One run of `scenario` on the model, in benchmark seconds like the measured runs."""
    clock = FakeClock(0.0)
    config = SchedulerConfig(
        policy=policy,
        aging_s=settings["aging_s"] / scale,
        affinity_wait_s=settings["affinity_wait_s"] / scale,
        max_batch=int(settings["max_batch"]),
        max_queue=max(len(scenario.trace), 1),
        queue_timeout_s=600,
    )
    present = {KINDS[k].consumer for k in scenario.kinds}
    core = SchedulerCore(
        config, {n: ConsumerPolicy(priority=scenario.priorities[n]) for n in present}, clock
    )
    # As in the benchmark: vLLM starts up with its model loaded before the trace begins; the
    # others load on first use.
    box = Box(scale, ["vllm"] if "vllm" in present else [], {}, {})
    seq = itertools.count()
    events: list[tuple[float, int, str, int]] = []
    # Closed loop: each user's jobs in order, sent one at a time (Job.at_s: the think time).
    queued: dict[int, list[int]] = {}
    for i, job in enumerate(scenario.trace):
        if scenario.closed:
            queued.setdefault(job.user, []).append(i)
        else:
            heapq.heappush(events, (job.at_s, next(seq), "arrive", i))
    for user_jobs in queued.values():
        first = user_jobs.pop(0)
        heapq.heappush(events, (scenario.trace[first].at_s, next(seq), "arrive", first))
    trace_index: dict[int, int] = {}  # job id -> index in the trace
    waits: dict[int, list[float]] = {}
    swaps, swap_s, end, start = 0, 0.0, 0.0, math.inf
    while events:
        now, _, what, ref = heapq.heappop(events)
        clock.advance(max(0.0, now - clock.now()))
        if what == "arrive":
            start = min(start, now)
            kind = scenario.trace[ref].kind
            trace_index[core.submit(KINDS[kind].consumer)] = ref
        elif what == "ready":
            core.ready(ref)
        elif what == "answer":  # the user thinks, then sends its next job
            user_jobs = queued[scenario.trace[ref].user]
            if user_jobs:
                nxt = user_jobs.pop(0)
                at = now + scenario.trace[nxt].at_s
                heapq.heappush(events, (at, next(seq), "arrive", nxt))
        else:
            core.finish(ref, Outcome.COMPLETED)
            end = max(end, now)
        for grant in core.schedule(frozenset(box.resident), box.swap_costs()):
            waits.setdefault(scenario.priorities[grant.consumer], []).append(grant.waited_s)
            swaps += grant.consumer not in box.resident
            prepare, lazy = box.make_resident(grant.consumer)
            swap_s += prepare
            if grant.prepare:
                heapq.heappush(events, (now + prepare, next(seq), "ready", grant.job_id))
            index = trace_index[grant.job_id]
            kind = scenario.trace[index].kind
            end_at = now + prepare + lazy + KINDS[kind].run_s / scale
            heapq.heappush(events, (end_at, next(seq), "finish", grant.job_id))
            if scenario.closed:
                # ComfyUI answers once the prompt is queued; the others when the work is done.
                answer_at = now + prepare if kind == "image" else end_at
                heapq.heappush(events, (answer_at, next(seq), "answer", index))
    makespan = end - start
    return {
        "makespan_s": makespan,
        "makespan_ratio": makespan / lower_bounds(scenario, scale)["lower_bound_s"],
        "swaps": swaps,
        "swap_s_total": swap_s,
        "wait_by_priority": {str(p): summary(w) for p, w in sorted(waits.items())},
    }


AFFINITY_WAIT_S = (10.0, 30.0, 60.0, 120.0)  # real-world seconds
MAX_BATCH = (8, 16, 32, 64)


def sweep(seed: int, scale: float) -> dict[str, Any]:
    out: dict[str, Any] = {"seed": seed, "scale": scale, "aging_s": DEFAULTS["aging_s"]}
    for scenario in scenarios(seed, scale, quick=False):
        rows = [
            {
                "affinity_wait_s": wait_s,
                "max_batch": batch,
                **simulate(
                    scenario,
                    "priority",
                    {"aging_s": DEFAULTS["aging_s"], "affinity_wait_s": wait_s, "max_batch": batch},
                    scale,
                ),
            }
            for wait_s, batch in itertools.product(AFFINITY_WAIT_S, MAX_BATCH)
        ]
        fifo = simulate(scenario, "fifo", DEFAULTS, scale)
        out[scenario.key] = {"title": scenario.title, "fifo": fifo, "priority": rows}
    return out


def over_seeds(seeds: int, scale: float) -> dict[str, Any]:
    """The defaults, the tight caps and FIFO on the traces of seeds 1..`seeds`: is the seed the
    benchmark runs (5) typical? Per scenario: mean and worst makespan / lower bound, and the
    mean and worst p95 wait of each priority (benchmark seconds)."""
    out: dict[str, Any] = {}
    for label, policy, settings in (
        ("priority", "priority", DEFAULTS),
        ("priority_tight", "priority", TIGHT),
        ("fifo", "fifo", DEFAULTS),
    ):
        runs: dict[str, list[dict[str, Any]]] = {}
        for seed in range(1, seeds + 1):
            for scenario in scenarios(seed, scale, quick=False):
                runs.setdefault(scenario.key, []).append(
                    simulate(scenario, policy, settings, scale)
                )
        out[label] = {
            key: {
                "mean_ratio": statistics.fmean(r["makespan_ratio"] for r in rs),
                "max_ratio": max(r["makespan_ratio"] for r in rs),
                "mean_swaps": statistics.fmean(r["swaps"] for r in rs),
                "mean_p95_wait_s": {
                    p: statistics.fmean(r["wait_by_priority"][p]["p95_s"] for r in rs)
                    for p in rs[0]["wait_by_priority"]
                },
                "max_p95_wait_s": {
                    p: max(r["wait_by_priority"][p]["p95_s"] for r in rs)
                    for p in rs[0]["wait_by_priority"]
                },
            }
            for key, rs in runs.items()
        }
    return out


def seeds_table(result: Mapping[str, Any], seeds: int, scale: float) -> str:
    lines = [
        f"seeds 1..{seeds}: makespan / lower bound mean (worst), mean swaps, mean p95 wait by "
        "priority (real-world s); the light load: mean (worst) p95 wait",
        "",
        "| scenario | " + " | ".join(result) + " |",
        "| --- |" + " --- |" * len(result),
    ]
    for key in result["priority"]:
        cells = []
        for entry in result.values():
            e = entry[key]
            if key in ("light", "busy"):
                p95, worst = e["mean_p95_wait_s"]["2"], e["max_p95_wait_s"]["2"]
                cells.append(f"{p95 * scale:.1f} s ({worst * scale:.1f} s), {e['mean_swaps']:.1f}")
                continue
            waits = ", ".join(
                f"p{p} {w * scale:.0f}"
                for p, w in sorted(e["mean_p95_wait_s"].items(), reverse=True)
            )
            cells.append(
                f"{e['mean_ratio']:.2f}x ({e['max_ratio']:.2f}x), {e['mean_swaps']:.1f}, {waits}"
            )
        lines.append(f"| ({key}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(result: Mapping[str, Any], key: str) -> str:
    """Markdown: makespan / lower bound and the p95 wait of the lowest priority, per setting."""
    entry = result[key]
    low = min(entry["fifo"]["wait_by_priority"], key=int)
    lines = [
        f"({key}) {entry['title']}: makespan / lower bound, swaps, p95 wait of priority {low} "
        "(real-world s)",
        "",
        "| affinity_wait_s \\ max_batch | " + " | ".join(str(b) for b in MAX_BATCH) + " |",
        "| --- |" + " ---: |" * len(MAX_BATCH),
    ]
    for wait_s in AFFINITY_WAIT_S:
        cells = []
        for row in entry["priority"]:
            if row["affinity_wait_s"] == wait_s:
                p95 = row["wait_by_priority"][low]["p95_s"] * result["scale"]
                cells.append(f"{row['makespan_ratio']:.2f}x, {row['swaps']}, {p95:.0f} s")
        lines.append(f"| {wait_s:g} s | " + " | ".join(cells) + " |")
    fifo = entry["fifo"]
    p95 = fifo["wait_by_priority"][low]["p95_s"] * result["scale"]
    lines.append(f"\nfifo: {fifo['makespan_ratio']:.2f}x, {fifo['swaps']} swaps, {p95:.0f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--scale", type=float, default=SCALE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seeds", type=int, default=20, help="seeds for the robustness table")
    args = parser.parse_args(argv)
    result = sweep(args.seed, args.scale)
    result["over_seeds"] = over_seeds(args.seeds, args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sched_model.json").write_text(json.dumps(result, indent=2) + "\n")
    for key in ("a", "b", "c"):
        print(table(result, key), end="\n\n")
    print(seeds_table(result["over_seeds"], args.seeds, args.scale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
