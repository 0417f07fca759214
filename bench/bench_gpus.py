"""Two GPUs in one box: one scheduler over device sets against one lease for the whole box.

The trace: three services over two simulated cards, through a real broker (the simulated box
and the fake consumers of mgpumanager.sim): Ollama bound to GPU 0, ComfyUI to GPU 1, mVoice to
both (a job of it runs alone). A seeded burst of jobs arrives within the first seconds, more work
than the cards can run meanwhile, so the makespan measures how well the cards are kept busy.

Two runs of the same trace, each with a fresh box and broker:
- `two cards`: each consumer bound to its card(s), jobs on disjoint cards run at once;
- `one lease`: no binding (every consumer on every card, the default), so one lease for the box,
  as a broker without device sets would run it.

The lower bound for two cards: the busier card's work, the run times of the jobs that use it plus
one load of each consumer on it. Goals: two cards within 1.15x of that bound, and at least 1.6x
faster than one lease. Results: bench/results/gpus.json; `make bench-sched` runs it.

    .venv/bin/python bench/bench_gpus.py [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from mgpumanager.broker import Broker
from mgpumanager.daemon import start_server
from mgpumanager.registry import Config
from mgpumanager.scheduling.core import Grant, Outcome
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "qwen2.5:14b"
CARD_MIB = 24_576


@dataclass(frozen=True)
class Service:
    consumer: str
    kind: str
    cards: tuple[int, ...]  # where it is bound in the two-card run
    mib: int
    load_s: float
    run_s: float
    jobs: int


# Real-world proportions, scaled down: a chat answer, an image, a short sentence of speech.
SERVICES = (
    Service("ollama", "llm", (0,), 14_000, 0.3, 0.50, 16),
    Service("comfyui", "image", (1,), 12_300, 0.3, 0.60, 13),
    Service("mvoice", "tts", (0, 1), 3_000, 0.1, 0.10, 4),
)
ARRIVALS_S = 2.0  # every job arrives within this
MAX_WAIT_S = 1.5  # the starvation guard, scaled like the runs


def trace(seed: int) -> list[tuple[float, Service]]:
    rng = random.Random(seed)
    jobs = [(rng.uniform(0, ARRIVALS_S), s) for s in SERVICES for _ in range(s.jobs)]
    return sorted(jobs, key=lambda j: j[0])


def lower_bound_s() -> float:
    """The busier card's work: every run on it, one load of each consumer bound to it."""
    per_card = [
        sum(s.jobs * s.run_s + s.load_s for s in SERVICES if card in s.cards) for card in (0, 1)
    ]
    return max(per_card)


def spec() -> FakeSpec:
    by = {s.consumer: s for s in SERVICES}
    return FakeSpec(
        mvoice=MVoiceSettings(
            vram_mib=by["mvoice"].mib,
            load_s=by["mvoice"].load_s,
            run_s=by["mvoice"].run_s,
            free_delay_s=0.05,
        ),
        ollama=OllamaSettings(
            models={MODEL: by["ollama"].mib},
            load_s=by["ollama"].load_s,
            run_s=by["ollama"].run_s,
            free_delay_s=0.05,
            chunks=2,
        ),
        comfyui=ComfyUISettings(
            model_mib=by["comfyui"].mib - 300,
            ctx_mib=300,
            load_s=by["comfyui"].load_s,
            run_s=by["comfyui"].run_s,
            free_delay_s=0.05,
        ),
        whisper=None,
    )


def registry(cluster: SimCluster, bound: bool) -> Config:
    health = {"interval_s": 0.2, "timeout_s": 2}
    paths = {"mvoice": "/health", "ollama": "/api/version", "comfyui": "/system_stats"}
    consumers: dict[str, dict[str, Any]] = {}
    for s in SERVICES:
        c: dict[str, Any] = {
            "type": {"mvoice": "generic"}.get(s.consumer, s.consumer),
            "url": cluster.urls[s.consumer],
            "health": {"path": paths[s.consumer], **health},
            "vram_resident_mib": s.mib,
            "gpu_processes": [s.consumer],
            "priority": 2,
        }
        if s.consumer == "mvoice":
            c["unload"] = {"path": "/api/admin/unload"}
            c["load"] = {"path": "/api/admin/load"}
        if bound:
            c["devices"] = list(s.cards)
        consumers[s.consumer] = c
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
            "scheduler": {"max_wait_s": MAX_WAIT_S, "queue_timeout_s": 600},
            "routing": {s.kind: s.consumer for s in SERVICES},
            "consumers": consumers,
        }
    )


def body(kind: str, n: int) -> dict[str, Any]:
    bodies: dict[str, dict[str, Any]] = {
        "tts": {"text": "the kettle is on"},
        "llm": {"model": MODEL, "prompt": "hi", "stream": False},
        "image": {"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": n}}}},
    }
    return bodies[kind]


async def run(seed: int, bound: bool) -> dict[str, Any]:
    where = {s.consumer: s.cards[0] for s in SERVICES}
    async with await start_cluster(spec=spec(), total_mib=CARD_MIB, gpus=2, devices=where) as box:
        server = await start_server(Broker(registry(box, bound)), port=0)
        try:
            core = server.broker.lease.core
            finished: list[float] = []
            all_done = asyncio.Event()
            grants: list[tuple[float, Grant]] = []
            jobs = trace(seed)

            def done(job: int, outcome: Outcome) -> None:
                finished.append(time.monotonic())
                if len(finished) == len(jobs):
                    all_done.set()

            core.on_finish.append(done)
            core.on_grant.append(lambda g: grants.append((time.monotonic(), g)))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                t0 = time.monotonic() + 0.05

                async def one(n: int, at_s: float, s: Service) -> int:
                    await asyncio.sleep(max(0.0, t0 + at_s - time.monotonic()))
                    url = f"{server.url}/v1/{s.kind}"
                    async with session.post(url, json=body(s.kind, n)) as resp:
                        await resp.read()
                        return resp.status

                statuses = await asyncio.gather(*(one(n, at, s) for n, (at, s) in enumerate(jobs)))
                # ComfyUI's jobs end with their prompts, after /v1/image answered.
                await asyncio.wait_for(all_done.wait(), timeout=120)
            stats = core.stats()
            tts_waits = [g.waited_s for _, g in grants if g.consumer == "mvoice"]
            return {
                "makespan_s": max(finished) - t0,
                "jobs": len(jobs),
                "ok": sum(1 for s in statuses if s == 200),
                "completed": stats.completed,
                "oom": [card.oom_count for card in box.cards],
                "tts_max_wait_s": max(tts_waits, default=0.0),
            }
        finally:
            await server.stop()


def report(results: Mapping[str, Any]) -> str:
    two, one, bound = results["two_cards"], results["one_lease"], results["lower_bound_s"]
    lines = [
        f"two GPUs, {two['jobs']} jobs (seed {results['seed']}):",
        f"  lower bound (busier card)  {bound:6.2f} s",
        f"  two cards                  {two['makespan_s']:6.2f} s  "
        f"({results['vs_bound']:.2f}x the bound; goal <= 1.15)",
        f"  one lease                  {one['makespan_s']:6.2f} s  "
        f"(two cards {results['speedup']:.2f}x faster; goal >= 1.6)",
        f"  out-of-memory per card     {two['oom']} / {one['oom']}",
        f"  longest wait of a job on both cards {two['tts_max_wait_s']:.2f} s "
        f"(max_wait_s {MAX_WAIT_S})",
    ]
    return "\n".join(lines)


async def main_async(seed: int) -> dict[str, Any]:
    two = await run(seed, bound=True)
    one = await run(seed, bound=False)
    bound = lower_bound_s()
    return {
        "seed": seed,
        "lower_bound_s": bound,
        "two_cards": two,
        "one_lease": one,
        "vs_bound": two["makespan_s"] / bound,
        "speedup": one["makespan_s"] / two["makespan_s"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args.seed))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpus.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    two, one = results["two_cards"], results["one_lease"]
    broken = two["oom"] != [0, 0] or one["oom"] != [0, 0] or two["ok"] != two["jobs"]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
