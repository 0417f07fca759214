"""What the cluster's front costs: a request through a host's front against the same request
straight to that host's broker, in one script, on one simulated host.

A local Ray cluster of two simulated hosts (`mgpumanager cluster --local 2`, instant fakes: the
latency is the path, not the work). The client sends, one after another in alternating blocks,

- `GET /api/version` (passed through, no lease),
- `POST /api/generate` of a resident model, not streamed (scheduled: queue, lease, relay),
- the same streamed, timed to its first NDJSON line,

to h1's broker directly and to h1's front (which forwards to its own broker over loopback, the
usual case once a model lives there). Reported per request kind: the medians and p95s, and the
ratio front / direct. The front runs in a Ray worker process; the broker, its fakes and the
client share this process's event loop in both conditions.

With `--serve`, the same forwarding as a Ray Serve deployment behind Serve's HTTP proxy is
measured too (the choice docs/cluster.md explains). Results: bench/results/cluster.json.

    make bench-cluster      # or: .venv/bin/python bench/bench_cluster.py [--serve]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from mgpumanager.cluster.local import SMALL_MODEL
from mgpumanager.cluster.ray_app import local_cluster

ROUNDS = 5
BLOCK = 40  # requests per block; ROUNDS blocks per condition and kind
OUT = Path(__file__).resolve().parent / "results" / "cluster.json"

Kind = Callable[[aiohttp.ClientSession, str], Awaitable[float]]


async def version(session: aiohttp.ClientSession, base: str) -> float:
    start = time.perf_counter()
    async with session.get(f"{base}/api/version") as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{base}: {resp.status} {await resp.text()}")
    return time.perf_counter() - start


async def generate(session: aiohttp.ClientSession, base: str) -> float:
    start = time.perf_counter()
    body = {"model": SMALL_MODEL, "prompt": "hi", "stream": False}
    async with session.post(f"{base}/api/generate", json=body) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{base}: {resp.status}")
    return time.perf_counter() - start


async def first_line(session: aiohttp.ClientSession, base: str) -> float:
    start = time.perf_counter()
    body = {"model": SMALL_MODEL, "prompt": "hi", "stream": True}
    async with session.post(f"{base}/api/generate", json=body) as resp:
        await resp.content.readline()
        elapsed = time.perf_counter() - start
        await resp.read()
    return elapsed


KINDS: dict[str, Kind] = {
    "GET /api/version": version,
    "POST /api/generate": generate,
    "first streamed line": first_line,
}


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 3),
    }


async def measure(targets: dict[str, str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        for kind, call in KINDS.items():
            samples: dict[str, list[float]] = {name: [] for name in targets}
            for base in targets.values():  # warm up: connections, the model loaded
                for _ in range(5):
                    await call(session, base)
            for _ in range(ROUNDS):
                for name, base in targets.items():
                    for _ in range(BLOCK):
                        samples[name].append(await call(session, base))
            row: dict[str, Any] = {name: summary(s) for name, s in samples.items()}
            direct = row["direct"]["p50_ms"]
            for name in targets:
                if name != "direct":
                    row[f"{name}_ratio_p50"] = round(row[name]["p50_ms"] / direct, 2)
                    row[f"{name}_extra_p50_ms"] = round(row[name]["p50_ms"] - direct, 3)
            results[kind] = row
            print(kind, json.dumps(row), flush=True)
    return results


def serve_front(broker_url: str) -> str:
    """The same hop as a Ray Serve deployment: Serve's proxy, then a replica forwarding to
    the broker with aiohttp (responses streamed back). Answers the proxy's URL."""
    import_serve = __import__("ray.serve", fromlist=["serve"])
    serve: Any = import_serve
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    class Forward:
        def __init__(self, broker: str) -> None:
            self.broker = broker
            self.session: aiohttp.ClientSession | None = None

        async def __call__(self, request: Request) -> StreamingResponse:
            if self.session is None:
                self.session = aiohttp.ClientSession()
            body = await request.body()
            upstream = await self.session.request(
                request.method,
                self.broker + request.url.path,
                data=body or None,
                headers={"Content-Type": request.headers.get("content-type", "")},
            )

            async def chunks() -> Any:
                async with upstream:
                    async for chunk in upstream.content.iter_any():
                        yield chunk

            return StreamingResponse(
                chunks(),
                status_code=upstream.status,
                media_type=upstream.headers.get("Content-Type"),
            )

    with socket.socket() as sock:  # a free port for Serve's proxy
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployment = serve.deployment(ray_actor_options={"num_cpus": 0, "num_gpus": 0})(Forward)
    serve.run(deployment.bind(broker_url), route_prefix="/", name="mgpu-bench")
    return f"http://127.0.0.1:{port}"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true", help="also measure Ray Serve's proxy")
    args = parser.parse_args()
    started = time.perf_counter()
    async with local_cluster(2, period_s=0.5) as lc:
        startup_s = time.perf_counter() - started
        targets = {"direct": lc.hosts["h1"].url, "front": lc.urls["h1"]}
        async with aiohttp.ClientSession() as session:  # the model resident on h1
            await generate(session, targets["direct"])
        await asyncio.sleep(2.0)  # a few status periods: the fronts see it there
        if args.serve:
            # Serve starts from the main thread (signal handlers); the brokers wait meanwhile.
            targets["serve"] = serve_front(targets["direct"])
            await asyncio.sleep(2.0)  # the fronts read their brokers again
        results = await measure(targets)
    report = {
        "what": "one request through a host's front (Ray actor) vs straight to its broker",
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "local_cluster_start_s": round(startup_s, 1),
        "rounds": ROUNDS,
        "block": BLOCK,
        "results": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written {OUT}")


if __name__ == "__main__":
    asyncio.run(main())
