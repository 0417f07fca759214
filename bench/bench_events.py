"""Does a /v1/events client that stops reading slow the broker's jobs?

One run, one broker in front of the simulated GPU (mVoice only, no delays: the job's latency is
the broker's own path: queue, lease, relay, events). Jobs are sent one after another, in rounds
of three blocks each, in turn:

- `none`: no events client;
- `reading`: one client reading the stream as it comes (`curl -N`, a process of its own, so
  that its reading costs the broker's process nothing);
- `stalled`: one client that connected, sent its request and reads nothing, with a 4 KiB
  receive buffer: once the socket buffers are full, its events pile up in its buffer in the
  broker (CLIENT_BUFFER events) until it is dropped. A new one connects for every block.

Reported: the latency of a job (request sent to answer read) per condition, the ratio of the
medians (and p95s) to `none`; for `stalled`, the jobs while the stalled client was connected
and those after it was dropped, apart, and after how many jobs it was dropped. Results go to
bench/results/events.json.

    make bench-events       # or: .venv/bin/python bench/bench_events.py
"""

from __future__ import annotations

import asyncio
import json
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from mgpumanager.broker import Broker
from mgpumanager.daemon import Server, start_server
from mgpumanager.events import CLIENT_BUFFER
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.server import wait_until

ROUNDS = 4
JOBS_PER_BLOCK = 1000
RESULTS = Path(__file__).parent / "results" / "events.json"


def registry(cluster: SimCluster) -> Config:
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "sim", "sim_url": cluster.gpu_url},
            "routing": {"tts": "mvoice"},
            "consumers": {
                "mvoice": {
                    "url": cluster.urls["mvoice"],
                    "health": {"path": "/health", "interval_s": 5},
                    "vram_resident_mib": 6000,
                    "unload": {"path": "/api/admin/unload"},
                    "load": {"path": "/api/admin/load"},
                    "gpu_processes": ["mvoice"],
                }
            },
        }
    )


def stalled_client(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /v1/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


async def reading_client(url: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "curl", "-sN", "-o", "/dev/null", url + "/v1/events"
    )


async def jobs(session: aiohttp.ClientSession, url: str, n: int, on_job: Any = None) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        async with session.post(url + "/v1/tts", json={"text": "hi"}) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"job failed: {resp.status}")
        out.append((time.perf_counter() - started) * 1000.0)
        if on_job is not None:
            on_job(i)
    return out


async def subscribed(server: Server) -> None:
    """Until the client's request has reached the broker."""
    bus = server.broker.events
    await wait_until(lambda: bus.subscribers > 0, interval_s=0.001, what="the events client")


async def block(
    condition: str, server: Server, session: aiohttp.ClientSession, stalls: list[dict[str, Any]]
) -> dict[str, list[float]]:
    """One block of jobs under `condition`: latencies by what was connected meanwhile."""
    url, bus = server.url, server.broker.events
    if condition == "none":
        return {"none": await jobs(session, url, JOBS_PER_BLOCK)}
    if condition == "reading":
        reader = await reading_client(url)
        try:
            await subscribed(server)
            return {"reading": await jobs(session, url, JOBS_PER_BLOCK)}
        finally:
            reader.terminate()
            await reader.wait()
    sock = stalled_client(url)
    dropped_before = bus.dropped
    await subscribed(server)
    stall: dict[str, Any] = {"dropped_after_job": None}

    def watch(i: int) -> None:
        if stall["dropped_after_job"] is None and bus.dropped > dropped_before:
            stall["dropped_after_job"] = i + 1

    try:
        ms = await jobs(session, url, JOBS_PER_BLOCK, watch)
    finally:
        stalls.append(stall)
        sock.close()
    cut = stall["dropped_after_job"] or len(ms)
    return {"stalled": ms[:cut], "after the drop": ms[cut:]}


def summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {
        "jobs": len(ms),
        "median_ms": round(statistics.median(ordered), 3),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
        "max_ms": round(ordered[-1], 3),
    }


async def main() -> None:
    spec = FakeSpec(
        mvoice=MVoiceSettings(load_s=0, run_s=0, free_delay_s=0),
        ollama=None,
        comfyui=None,
        whisper=None,
    )
    conditions = ("none", "reading", "stalled")
    latencies: dict[str, list[float]] = {
        "none": [],
        "reading": [],
        "stalled": [],
        "after the drop": [],
    }
    stalls: list[dict[str, Any]] = []
    async with await start_cluster(spec=spec) as cluster:
        server = await start_server(Broker(registry(cluster)), port=0)
        try:
            async with aiohttp.ClientSession() as session:
                await jobs(session, server.url, 50)  # warm-up: mVoice loaded, connections open
                for _ in range(ROUNDS):
                    for condition in conditions:
                        got = await block(condition, server, session, stalls)
                        for name, ms in got.items():
                            latencies[name] += ms
            events = server.broker.events.emitted
        finally:
            await server.stop()
    rows = {c: summary(ms) for c, ms in latencies.items() if ms}
    base = rows["none"]
    for row in rows.values():
        row["median_ratio"] = round(row["median_ms"] / base["median_ms"], 3)
        row["p95_ratio"] = round(row["p95_ms"] / base["p95_ms"], 3)
    result = {
        "benchmark": "job latency with and without a /v1/events client that stops reading",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown cpu'}",
        "client_buffer_events": CLIENT_BUFFER,
        "rounds": ROUNDS,
        "jobs_per_block": JOBS_PER_BLOCK,
        "events_emitted": events,
        "conditions": rows,
        "stalled_clients": stalls,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    head = ("condition", "jobs", "median ms", "p95 ms", "max ms", "x median", "x p95")
    print(" ".join(f"{h:>14}" for h in head))
    for name, r in rows.items():
        cells = (name, r["jobs"], r["median_ms"], r["p95_ms"], r["max_ms"])
        print(" ".join(f"{v:>14}" for v in (*cells, r["median_ratio"], r["p95_ratio"])))
    dropped = [s["dropped_after_job"] for s in stalls]
    print(f"stalled clients dropped after job: {dropped} (of {JOBS_PER_BLOCK} per block)")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
