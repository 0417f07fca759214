"""Swap overhead: what the broker adds to a swap, beyond the upstreams' own unload + load.

For 50 swaps between two consumers that cannot be resident together (Ollama 14000 MiB and
mVoice 6000 MiB on a 20 GiB simulated GPU), measured in this one process:

    overhead = (job reaches its upstream) - (lease granted) - (victim's free delay + eager load)

The fakes' own delays are their settings (the unload's free_delay_s, drawn per swap from a
seeded range, and mVoice's admin load_s);
Ollama loads lazily after the job reached it, so its load is outside the window. What is
left is the broker's work: planning, the unload call, polling the GPU reading and the upstream
until the memory is confirmed back, the load call and readiness probe, and the proxy hop.
Run first on the shipped defaults (the row with "defaults": true: confirmation polled every
gpu.confirm_poll_s), then with the confirmation fixed at three intervals (gpu.confirm_poll_s
and gpu.poll_interval_s both set to it), the knob that dominates the overhead; each row also
gives the median ratio of the whole swap through the broker to the upstreams' own part of it
(the baseline, measured in the same run). Results go to bench/results/swap.json.

    make bench            # or: .venv/bin/python bench/bench_swap.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from mgpumanager.broker import Broker
from mgpumanager.daemon import start_server
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings

SWAPS = 50
LOAD_S = 0.05
# Driver lag differs from one unload to the next (Ollama reports 0.5-1.5 s on real cards):
# drawn per swap, scaled down ~10x, so polling is measured against a lag it cannot predict.
FREE_DELAY_RANGE_S = (0.05, 0.15)
MODEL = "llm:14b"
RESULTS = Path(__file__).parent / "results" / "swap.json"


def registry(cluster: SimCluster, poll_interval_s: float | None) -> Config:
    """`poll_interval_s`: every GPU wait at that fixed interval; None: the shipped defaults."""
    gpu: dict[str, Any] = {"backend": "sim", "sim_url": cluster.gpu_url}
    if poll_interval_s is not None:
        gpu |= {"poll_interval_s": poll_interval_s, "confirm_poll_s": poll_interval_s}
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": gpu,
            "routing": {"tts": "mvoice", "llm": "ollama"},
            "consumers": {
                "mvoice": {
                    "url": cluster.urls["mvoice"],
                    "health": {"path": "/health", "interval_s": 5},
                    "vram_resident_mib": 6000,
                    "unload": {"path": "/api/admin/unload"},
                    "load": {"path": "/api/admin/load"},
                    "gpu_processes": ["mvoice"],
                },
                "ollama": {
                    "type": "ollama",
                    "url": cluster.urls["ollama"],
                    "health": {"path": "/api/version", "interval_s": 5},
                    "vram_resident_mib": 14000,
                    "gpu_processes": ["ollama"],
                },
            },
        }
    )


async def run(poll_interval_s: float | None) -> dict[str, Any]:
    spec = FakeSpec(
        mvoice=MVoiceSettings(vram_mib=6000, load_s=LOAD_S, run_s=0.0),
        ollama=OllamaSettings(models={MODEL: 14000}, load_s=LOAD_S, run_s=0.0, chunks=1),
        comfyui=None,
        whisper=None,
    )
    async with await start_cluster(total_mib=20480, spec=spec) as cluster:
        config = registry(cluster, poll_interval_s)
        broker = Broker(config)
        server = await start_server(broker, port=0)
        grants: list[float] = []  # when each tenure began (its prepare step starts at once)
        broker.lease.core.on_grant.append(
            lambda grant: grants.append(time.monotonic()) if grant.prepare else None
        )
        overheads: list[float] = []
        ratios: list[float] = []  # whole swap through the broker / the upstreams' own part
        rng = random.Random(7)
        try:
            async with aiohttp.ClientSession() as session:
                for i in range(SWAPS + 1):
                    target = "mvoice" if i % 2 == 0 else "ollama"
                    fake: Any = cluster.fakes[target]
                    victim: Any = cluster.fakes["ollama" if target == "mvoice" else "mvoice"]
                    free_delay_s = rng.uniform(*FREE_DELAY_RANGE_S)
                    victim.settings = dataclasses.replace(
                        victim.settings, free_delay_s=free_delay_s
                    )
                    before = len(fake.received)
                    if target == "mvoice":
                        url, body = f"{server.url}/v1/tts", {"text": "hi"}
                    else:
                        url, body = f"{server.url}/v1/llm", {"model": MODEL, "prompt": "hi"}
                    async with session.post(url, json=body) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"{target}: {resp.status}")
                    if i == 0:
                        continue  # the first load evicts nobody: not a swap
                    job = [
                        r
                        for r in list(fake.received)[before:]
                        if r.path in ("/api/synthesize", "/api/generate")
                    ]
                    reached = job[0].at
                    upstream_s = free_delay_s + (LOAD_S if target == "mvoice" else 0.0)
                    overheads.append(reached - grants[-1] - upstream_s)
                    ratios.append((reached - grants[-1]) / upstream_s)
            counters = broker.residency.view.counters
            assert counters.evictions == SWAPS, counters
            assert cluster.gpu.oom_count == 0
        finally:
            await server.stop()
    ms = sorted(o * 1000 for o in overheads)
    return {
        "defaults": poll_interval_s is None,
        "poll_interval_s": config.gpu.poll_interval_s,
        "confirm_poll_s": config.gpu.confirm_poll_s,
        "swaps": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1),
        "max_ms": round(ms[-1], 1),
        "median_ratio_to_upstream": round(statistics.median(ratios), 2),
        "goal_median_ms": 100,
        "goal_median_ratio": 1.10,
    }


async def main() -> None:
    rows = [await run(poll) for poll in (None, 0.25, 0.1, 0.05)]
    result = {
        "benchmark": "swap overhead (lease grant -> job reaches upstream, minus upstream delays)",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown cpu'}",
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    head = ("confirm_poll_s", "swaps", "median ms", "p95 ms", "max ms", "x upstream")
    print(" ".join(f"{h:>15}" for h in head))
    for r in rows:
        cells = ("swaps", "median_ms", "p95_ms", "max_ms", "median_ratio_to_upstream")
        poll = f"{r['confirm_poll_s']:g}" + (" (defaults)" if r["defaults"] else "")
        print(" ".join(f"{v:>15}" for v in (poll, *(r[c] for c in cells))))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
