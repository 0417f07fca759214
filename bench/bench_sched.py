"""Scheduling policy benchmark: policy `priority` against `fifo`, through a real broker.

Each scenario is a seeded trace of timestamped jobs, replayed open-loop: every job is a real HTTP
request to the broker, sent at its timestamp whatever happened to the others (the light load is
a closed loop instead: each user sends its next job when its last one was answered, plus a
think time). The broker runs in
front of the simulated GPU and the fake consumers (mgpumanager.sim), as in tests/test_e2e.py, and
each (scenario, policy) pair gets a fresh cluster and broker. Times are real-world proportions
divided by SCALE (loads 1-8 s, runs 0.5-3 s; scheduler settings scaled the same way). The
traces, the consumers' figures and the settings compared are in sched_traces.py:

  (a) interleaved: four consumers in random order that cannot all be resident;
  (b) bursty: bursts of jobs, each burst led by one consumer, arriving faster than they can run;
  (c) urgent: TTS for a voice assistant (priority 4) under a background of image and LLM jobs;
  (light) six users in closed loop, two on the LLM, two on the chat model, one TTS, one image.

Measured per run: makespan (first arrival to the end of the last job's GPU work), swaps (loads of
a consumer that was not resident), evictions, and the wait in the queue (arrival to lease grant,
as the scheduler records it) per priority at p50/p95/p99. The lower bound is the sum of the jobs'
run times plus one load per consumer that appears. Results: bench/results/sched.json and
sched.png; see bench/README.md. Run with `make bench-sched` (about two minutes on two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sched_model import simulate
from sched_traces import (
    DEFAULTS,
    KINDS,
    RESULTS,
    SCALE,
    TIGHT,
    TOTAL_MIB,
    Job,
    Kind,
    Scenario,
    lower_bounds,
    scenarios,
    summary,
)

from mgpumanager.broker import Broker
from mgpumanager.daemon import Server, start_server
from mgpumanager.registry import Config, GpuConfig
from mgpumanager.scheduling.core import Grant, Outcome, SchedulerCore
from mgpumanager.sim.cluster import FakeSpec, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.sim.server import wait_until
from mgpumanager.sim.vllm import VLLMSettings

MODEL = "qwen2.5:14b"
GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}
_SEEDS = itertools.count(8)


# -- the cluster and the broker ------------------------------------------------------------------


def fake_spec(kinds: Sequence[str], scale: float) -> FakeSpec:
    def k(name: str) -> Kind:
        return KINDS[name]

    s = scale
    return FakeSpec(
        mvoice=MVoiceSettings(
            vram_mib=k("tts").mib,
            load_s=k("tts").load_s / s,
            run_s=k("tts").run_s / s,
            free_delay_s=k("tts").free_s / s,
        )
        if "tts" in kinds
        else None,
        ollama=OllamaSettings(
            models={MODEL: k("llm").mib},
            load_s=k("llm").load_s / s,
            run_s=k("llm").run_s / s,
            free_delay_s=k("llm").free_s / s,
            chunks=4,
        )
        if "llm" in kinds
        else None,
        comfyui=ComfyUISettings(
            model_mib=k("image").mib - 300,
            ctx_mib=300,
            load_s=k("image").load_s / s,
            run_s=k("image").run_s / s,
            free_delay_s=k("image").free_s / s,
        )
        if "image" in kinds
        else None,
        vllm=VLLMSettings(
            vram_mib=k("chat").mib,
            load_s=5.0 / s,  # start-up; later loads are wake-ups
            wake_s=k("chat").load_s / s,
            run_s=k("chat").run_s / s,
            free_delay_s=k("chat").free_s / s,
            chunks=4,
        )
        if "chat" in kinds
        else None,
        whisper=None,
    )


def registry(
    cluster: ClusterInfo,
    scenario: Scenario,
    policy: str,
    scale: float,
    settings: Mapping[str, float] = DEFAULTS,
) -> Config:
    health = {"interval_s": 0.2, "timeout_s": 2}
    present = {KINDS[k].consumer for k in scenario.kinds}
    consumers: dict[str, dict[str, Any]] = {
        "mvoice": {
            "url": cluster.urls.get("mvoice", ""),
            "health": {"path": "/health", **health},
            "vram_resident_mib": KINDS["tts"].mib,
            "unload": {"path": "/api/admin/unload"},
            "load": {"path": "/api/admin/load"},
            # Small enough to stay beside any one of the others: TTS never waits for a load.
            "can_coexist_with": sorted(present - {"mvoice"}),
        },
        "ollama": {
            "type": "ollama",
            "url": cluster.urls.get("ollama", ""),
            "health": {"path": "/api/version", **health},
            "vram_resident_mib": KINDS["llm"].mib,
            "models": [MODEL],
        },
        "comfyui": {  # no load call: the first prompt loads the model (lazily)
            "type": "comfyui",
            "url": cluster.urls.get("comfyui", ""),
            "health": {"path": "/system_stats", **health},
            "vram_resident_mib": KINDS["image"].mib,
        },
        "vllm": {
            "type": "vllm",
            "url": cluster.urls.get("vllm", ""),
            "health": {"path": "/health", **health},
            "paths": {"chat": {"path": "/v1/completions"}},
            "vram_resident_mib": KINDS["chat"].mib,
        },
    }
    chosen = {}
    for name in sorted(present):
        chosen[name] = {
            **consumers[name],
            "priority": scenario.priorities[name],
            "gpu_processes": [name],
        }
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {
                "backend": "sim",
                "sim_url": cluster.gpu_url,
                "total_mib": TOTAL_MIB,
                # The shipped defaults, scaled like the rest: how often an unload is checked
                # against the GPU reading (a slower one delays every swap's confirmation), and
                # the slowest pace of a swap's other waits.
                "confirm_poll_s": GpuConfig.model_fields["confirm_poll_s"].default / scale,
                "poll_interval_s": GpuConfig.model_fields["poll_interval_s"].default / scale,
            },
            # Scaled like the workload.
            "scheduler": {
                "policy": policy,
                "aging_s": settings["aging_s"] / scale,
                "affinity_wait_s": settings["affinity_wait_s"] / scale,
                "max_batch": int(settings["max_batch"]),
                "queue_timeout_s": 600,
            },
            "routing": {k: KINDS[k].consumer for k in scenario.kinds},
            "consumers": chosen,
        }
    )


@dataclass
class GrantLog:
    """Every grant (with the wait the core measured) and every finish, when it happened: an
    observer of the scheduler core (`GrantLog.attach(core)`)."""

    grants: list[tuple[float, Grant]] = field(default_factory=list)
    finished: dict[int, float] = field(default_factory=dict)  # job id -> when

    @classmethod
    def attach(cls, core: SchedulerCore) -> GrantLog:
        log = cls()
        core.on_grant.append(log.granted)
        core.on_finish.append(log.finish)
        return log

    def granted(self, grant: Grant) -> None:
        self.grants.append((time.monotonic(), grant))

    def finish(self, job_id: int, outcome: Outcome) -> None:
        self.finished[job_id] = time.monotonic()

    def holds_by_consumer(self) -> dict[str, list[float]]:
        """How long each job held the lease: grant to finish, its swap (prepare) included."""
        out: dict[str, list[float]] = {}
        for at, g in self.grants:
            if g.job_id in self.finished:
                out.setdefault(g.consumer, []).append(self.finished[g.job_id] - at)
        return out


def request_for(kind: str, base: str) -> tuple[str, dict[str, Any]]:
    bodies: dict[str, dict[str, Any]] = {
        "tts": {"text": "the kettle is on"},
        "llm": {"model": MODEL, "prompt": "hi"},
        # A new seed per image: ComfyUI answers an unchanged graph from its cache, running nothing.
        "image": {"prompt": {"3": {**GRAPH["3"], "inputs": {"seed": next(_SEEDS)}}}},
        "chat": {"model": "Qwen/Qwen2.5-7B-Instruct", "prompt": "hi", "max_tokens": 8},
    }
    return f"{base}/v1/{kind}", {"json": bodies[kind]}


@dataclass(frozen=True)
class Sent:
    job: Job
    late_s: float  # how late the request left, against its timestamp
    status: int
    sent_at: float
    answered_at: float


async def replay(server: Server, scenario: Scenario) -> tuple[float, list[Sent]]:
    """Open loop: each job leaves at its timestamp, whatever happened to the others. Closed
    loop: each user's next job leaves its think time after the previous one was answered."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.monotonic() + 0.05

        async def one(job: Job, after: float) -> Sent:
            await asyncio.sleep(max(0.0, after + job.at_s - time.monotonic()))
            sent_at = time.monotonic()
            url, kwargs = request_for(job.kind, server.url)
            async with session.post(url, **kwargs) as resp:
                await resp.read()
                late = sent_at - (after + job.at_s)
                return Sent(job, late, resp.status, sent_at, time.monotonic())

        async def user(jobs: Sequence[Job]) -> list[Sent]:
            sent, after = [], t0
            for job in jobs:
                sent.append(await one(job, after))
                after = sent[-1].answered_at
            return sent

        if not scenario.closed:
            return t0, await asyncio.gather(*(one(j, t0) for j in scenario.trace))
        users: dict[int, list[Job]] = {}
        for job in scenario.trace:
            users.setdefault(job.user, []).append(job)
        done = await asyncio.gather(*(user(jobs) for jobs in users.values()))
        return t0, [s for sent in done for s in sent]


# -- one run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterInfo:
    gpu_url: str
    urls: dict[str, str]


@dataclass(frozen=True)
class ClusterReport:
    intervals: list[tuple[str, float, float]]  # (consumer, start, end) on time.monotonic
    ooms: int
    overlaps: int  # pairs of different consumers' work that overlapped


async def serve_cluster(kinds: Sequence[str], scale: float) -> None:
    """The child's side (--serve-cluster): start the simulated GPU and the fakes, print where
    they listen, wait for a line (or end of input) on stdin, print what happened, stop."""
    async with await start_cluster(total_mib=TOTAL_MIB, spec=fake_spec(kinds, scale)) as cluster:
        print(json.dumps({"gpu_url": cluster.gpu_url, "urls": cluster.urls}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        report = ClusterReport(
            [(i.consumer, i.start, i.end) for i in cluster.activity.intervals(include_open=True)],
            cluster.gpu.oom_count,
            len(cluster.activity.overlapping_pairs()),
        )
        print(json.dumps(report.__dict__), flush=True)


@asynccontextmanager
async def cluster_process(kinds: Sequence[str], scale: float) -> AsyncIterator[RemoteCluster]:
    """The simulated GPU and the fakes in a process of their own, as the real services are:
    their work does not compete with the broker's event loop (time.monotonic is the same clock
    in both processes)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve-cluster",
        ",".join(kinds),
        "--scale",
        str(scale),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        info = ClusterInfo(**json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)))
        yield RemoteCluster(info, proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@dataclass
class RemoteCluster:
    info: ClusterInfo
    proc: asyncio.subprocess.Process

    async def report(self) -> ClusterReport:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"report\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        await asyncio.wait_for(self.proc.wait(), 30)
        return ClusterReport(**json.loads(line))


async def run_one(
    scenario: Scenario, policy: str, scale: float, settings: Mapping[str, float]
) -> dict[str, Any]:
    async with cluster_process(scenario.kinds, scale) as cluster:
        config = registry(cluster.info, scenario, policy, scale, settings)
        server = await start_server(Broker(config), port=0)
        try:
            broker = server.broker
            await wait_until(
                lambda: all(h.ok for h in broker.health.states.values()), what="healthy"
            )
            grants = GrantLog.attach(broker.lease.core)
            counters = broker.residency.view.counters
            swaps0, evictions0 = counters.swaps, counters.evictions
            swap_s0 = counters.swap_seconds
            t0, sent = await replay(server, scenario)
            await wait_until(lambda: broker.lease.core.in_flight == 0, timeout_s=60.0, what="idle")
            stats = broker.lease.core.stats()
            swaps, evictions = counters.swaps - swaps0, counters.evictions - evictions0
            swap_s = counters.swap_seconds - swap_s0
            costs = broker.residency.swap_costs()
        finally:
            await server.stop()
        report = await cluster.report()
        holds = grants.holds_by_consumer()
        work_end = max((end for _, _, end in report.intervals), default=t0)
        end = max(work_end, *(s.answered_at for s in sent))
        first = min(s.sent_at for s in sent)
        waits: dict[int, list[float]] = {}
        for _, g in grants.grants:
            prio = scenario.priorities[g.consumer]
            waits.setdefault(prio, []).append(g.waited_s)
        by_consumer: dict[str, list[float]] = {}
        for _, g in grants.grants:
            by_consumer.setdefault(g.consumer, []).append(g.waited_s)
        return {
            "policy": policy,
            "makespan_s": end - first,
            "swaps": swaps,
            "evictions": evictions,
            "handoffs": stats.handoffs,
            "completed": stats.completed,
            "statuses": sorted({s.status for s in sent}),
            "ooms": report.ooms,
            "cross_consumer_overlaps": report.overlaps,
            "wait_by_priority": {str(p): summary(w) for p, w in sorted(waits.items())},
            "wait_by_consumer": {c: summary(w) for c, w in sorted(by_consumer.items())},
            "max_send_lateness_s": max(s.late_s for s in sent),
            "swap_cost_s": costs,
            "swap_s_total": swap_s,
            "longest_hold_s": max((max(h) for h in holds.values()), default=0.0),
            # grant to finish per consumer, median: its run time plus the broker's plumbing
            "median_hold_s": {c: statistics.median(h) for c, h in sorted(holds.items())},
            "tenures": tenures(grants),
        }


def tenures(log: GrantLog) -> list[tuple[str, int]]:
    """The lease's holders in order, with the number of jobs each tenure ran."""
    out: list[tuple[str, int]] = []
    for _, g in log.grants:
        if out and out[-1][0] == g.consumer:
            out[-1] = (g.consumer, out[-1][1] + 1)
        else:
            out.append((g.consumer, 1))
    return out


RUNS = ("priority", "fifo", "priority_tight")


async def run_all(
    seed: int,
    scale: float,
    quick: bool,
    settings: Mapping[str, float],
    only: Sequence[str] = ("a", "b", "c", "light"),
    labels: Sequence[str] = RUNS,
    before: Mapping[str, Any] | None = None,
    code: str = "",
) -> dict[str, Any]:
    every = {  # label -> (policy, scheduler settings in real-world seconds)
        "priority": ("priority", settings),
        "fifo": ("fifo", settings),
        "priority_tight": ("priority", TIGHT),
    }
    runs = {label: every[label] for label in labels}
    results: dict[str, Any] = {
        "meta": {
            "seed": seed,
            "scale": scale,
            "quick": quick,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "consumers": {k.consumer: {"kind": name, **k.__dict__} for name, k in KINDS.items()},
            "scheduler": {label: {"policy": p, **s} for label, (p, s) in runs.items()},
            "note": "times in benchmark seconds = real-world seconds / scale",
            "code": code,
            "before": None if before is None else before["meta"].get("code"),
        },
        "scenarios": {},
    }
    for scenario in scenarios(seed, scale, quick):
        if scenario.key not in only:
            continue
        entry: dict[str, Any] = {
            "title": scenario.title,
            "jobs": len(scenario.trace),
            "jobs_by_kind": {k: sum(j.kind == k for j in scenario.trace) for k in scenario.kinds},
            "priorities": dict(scenario.priorities),
            "longest_job_s": max(KINDS[j.kind].run_s for j in scenario.trace) / scale,
            **lower_bounds(scenario, scale),
            "policies": {},
        }
        for label, (policy, run_settings) in runs.items():
            started = time.monotonic()
            run = await run_one(scenario, policy, scale, run_settings)
            run["label"] = label
            run["makespan_ratio"] = run["makespan_s"] / entry["lower_bound_s"]
            run["bench_wall_s"] = time.monotonic() - started
            run["model"] = simulate(scenario, policy, run_settings, scale)
            entry["policies"][label] = run
            print(
                f"  ({scenario.key}) {label:14} makespan {run['makespan_s']:6.2f} s "
                f"({run['makespan_ratio']:.2f}x bound), swaps {run['swaps']:3}, "
                f"swapping {run['swap_s_total']:5.2f} s, "
                f"model {run['model']['makespan_ratio']:.2f}x, {run['model']['swaps']} swaps, "
                f"wall {run['bench_wall_s']:.1f} s",
                flush=True,
            )
        if "priority" in entry["policies"] and "fifo" in entry["policies"]:
            was = None if before is None else before["scenarios"].get(scenario.key)
            entry["goals"] = goals(scenario, entry, was)
        results["scenarios"][scenario.key] = entry
    return results


def goals(
    scenario: Scenario, entry: dict[str, Any], before: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The benchmark's goals, for the default settings. `before`: the same scenario measured
    with the scheduler as it was before its window followed the load (results/before/), whose
    urgent and light-load waits the defaults must not make worse; without it those goals
    are not judged."""
    runs = entry["policies"]
    pri, fifo = runs["priority"], runs["fifo"]
    was = None if before is None else before["policies"]["priority"]
    out: dict[str, Any] = {}
    if not scenario.closed:
        out["makespan_within_1.15x_bound"] = {
            "target": 1.15,
            "measured": pri["makespan_ratio"],
            "met": pri["makespan_ratio"] <= 1.15,
            "before": None if was is None else was["makespan_ratio"],
        }
    if scenario.key == "a":
        out["2x_fewer_swaps_than_fifo"] = {
            "target": 2.0,
            "measured": fifo["swaps"] / max(1, pri["swaps"]),
            "met": fifo["swaps"] >= 2 * pri["swaps"],
        }
    if scenario.key == "c":
        p95 = pri["wait_by_priority"]["4"]["p95_s"]
        out["urgent_p95_wait_no_worse_than_before"] = {
            "target_s": None if was is None else was["wait_by_priority"]["4"]["p95_s"],
            "measured_s": p95,
            "met": None if was is None else p95 <= was["wait_by_priority"]["4"]["p95_s"],
            # The lease is not preemptible: the longest one job held it, its swap included,
            # and the longest run alone.
            "longest_hold_s": pri["longest_hold_s"],
            "longest_run_s": entry["longest_job_s"],
        }
    if scenario.key == "light":
        p95 = pri["wait_by_priority"]["2"]["p95_s"]
        out["p95_wait_no_worse_than_before"] = {
            "target_s": None if was is None else was["wait_by_priority"]["2"]["p95_s"],
            "measured_s": p95,
            "met": None if was is None else p95 <= was["wait_by_priority"]["2"]["p95_s"],
        }
    return out


# -- output ----------------------------------------------------------------------------------


LABELS = {
    "priority": "priority",
    "fifo": "fifo",
    "priority_tight": "priority, tight caps (10 s, 8)",
}


def table(results: dict[str, Any]) -> str:
    lines = [
        "| scenario | policy | makespan s | / lower bound | model | swaps (model) | "
        "wait p50 / p95 / p99 s (by priority) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for key, entry in results["scenarios"].items():
        for policy, run in entry["policies"].items():
            waits = "; ".join(
                f"p{p}: {w['p50_s']:.3f} / {w['p95_s']:.3f} / {w['p99_s']:.3f}"
                for p, w in sorted(run["wait_by_priority"].items(), reverse=True)
            )
            if "open_loop_bound_s" in entry:
                ratio = f"{run['makespan_ratio']:.2f}x ({entry['lower_bound_s']:.2f} s)"
                model = f"{run['model']['makespan_ratio']:.2f}x"
            else:  # a closed loop ends when its users do: the bound means nothing there
                ratio, model = "closed loop", "-"
            lines.append(
                f"| ({key}) {entry['title']} | {LABELS[policy]} | {run['makespan_s']:.2f} | "
                f"{ratio} | {model} | {run['swaps']} ({run['model']['swaps']}) | {waits} |"
            )
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> bool:
    """The PNG; False (and no chart) without matplotlib (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    scen = results["scenarios"]
    keys = [k for k in scen if "open_loop_bound_s" in scen[k]]  # the overloaded traces
    policies = ["priority", "priority_tight", "fifo"]
    colors = {"priority": "#2b6cb0", "priority_tight": "#90cdf4", "fifo": "#c05621"}
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    width = 0.27
    for i, policy in enumerate(policies):
        xs = [k + (i - 1) * width for k in range(len(keys))]
        ratio = [scen[k]["policies"][policy]["makespan_ratio"] for k in keys]
        swaps = [scen[k]["policies"][policy]["swaps"] for k in keys]
        model = [scen[k]["policies"][policy]["model"]["makespan_ratio"] for k in keys]
        axes[0].bar(xs, ratio, width, label=LABELS[policy], color=colors[policy])
        axes[0].scatter(xs, model, marker="_", s=200, color="black", zorder=3)
        axes[1].bar(xs, swaps, width, label=LABELS[policy], color=colors[policy])
    axes[0].axhline(1.15, color="black", linestyle="--", linewidth=1, label="goal 1.15x")
    axes[0].set_title("makespan / lower bound (black: the model)")
    axes[0].set_ylim(
        0, 1.35 * max(scen[k]["policies"][p]["makespan_ratio"] for k in keys for p in policies)
    )
    axes[1].set_title("swaps (loads)")
    for ax in axes[:2]:
        ax.set_xticks(range(len(keys)), [f"({k})" for k in keys])
        ax.legend(fontsize=8)
    c = scen["c"]
    prios = sorted(c["policies"]["priority"]["wait_by_priority"], reverse=True)
    for i, policy in enumerate(policies):
        xs = [n + (i - 1) * width for n in range(len(prios))]
        p95 = [c["policies"][policy]["wait_by_priority"][p]["p95_s"] for p in prios]
        axes[2].bar(xs, p95, width, label=LABELS[policy], color=colors[policy])
    axes[2].axhline(
        c["longest_job_s"], color="black", linestyle="--", linewidth=1, label="longest run"
    )
    axes[2].axhline(
        c["policies"]["priority"]["longest_hold_s"],
        color="grey",
        linestyle=":",
        linewidth=1,
        label="longest job incl. its swap",
    )
    axes[2].set_yscale("log")
    axes[2].set_ylim(bottom=c["longest_job_s"] / 3)
    axes[2].set_xticks(range(len(prios)), [f"priority {p}" for p in prios])
    axes[2].set_title("(c) p95 wait in the queue, s (log)")
    axes[2].legend(fontsize=7, loc="lower right")
    if "light" in scen:
        light = scen["light"]["policies"]
        for i, policy in enumerate(policies):
            waits = light[policy]["wait_by_priority"]["2"]
            axes[3].bar(
                [n + (i - 1) * width for n in range(2)],
                [waits["p50_s"], waits["p95_s"]],
                width,
                label=LABELS[policy],
                color=colors[policy],
            )
        axes[3].set_xticks(range(2), ["p50", "p95"])
        axes[3].set_title("(light) wait in the queue, s")
        axes[3].legend(fontsize=7)
    fig.suptitle(
        f"mgpumanager scheduler through a real broker on the simulated GPU "
        f"(seed {results['meta']['seed']}, "
        f"times / {results['meta']['scale']:g})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def git_commit() -> str:
    """The checkout's commit, '+' when it has changes; '' outside git."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "../src"], cwd=root, capture_output=True
        ).stdout.strip()
    except OSError:
        return ""
    return head + ("+" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--scale", type=float, default=SCALE)
    parser.add_argument("--quick", action="store_true", help="short traces (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-chart", action="store_true")
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=float, default=value)
    parser.add_argument(
        "--only", default="a,b,c,light", help="scenarios to run, e.g. 'a,c' (also: busy)"
    )
    parser.add_argument("--runs", default=",".join(RUNS), help="which runs, e.g. 'priority'")
    parser.add_argument(
        "--before",
        type=Path,
        default=RESULTS / "before" / "sched.json",
        help="the run of the scheduler before, whose waits the goals compare with",
    )
    parser.add_argument("--code", default="", help="what code ran (default: the git commit)")
    parser.add_argument("--serve-cluster", metavar="KINDS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_cluster:  # the child process of cluster_process()
        asyncio.run(serve_cluster(args.serve_cluster.split(","), args.scale))
        return 0
    settings = {k: getattr(args, k) for k in DEFAULTS}
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    print(f"bench_sched: seed {args.seed}, times / {args.scale:g}", flush=True)
    before = json.loads(args.before.read_text()) if args.before.is_file() else None
    results = asyncio.run(
        run_all(
            args.seed,
            args.scale,
            args.quick,
            settings,
            args.only.split(","),
            args.runs.split(","),
            before,
            args.code or git_commit(),
        )
    )
    results["meta"]["wall_s"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sched.json").write_text(json.dumps(results, indent=2) + "\n")
    runs, only = set(args.runs.split(",")), set(args.only.split(","))
    complete = set(RUNS) <= runs and {"a", "b", "c"} <= only
    if complete and not args.no_chart and not chart(results, args.out / "sched.png"):
        print("no chart: matplotlib is missing (pip install -e '.[bench]')")
    print(table(results))
    for key, entry in results["scenarios"].items():
        for goal, verdict in entry.get("goals", {}).items():
            met = {True: "met", False: "NOT met", None: "not judged"}[verdict["met"]]
            print(f"({key}) {goal}: {met} {verdict}")
    print(f"wall {results['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
