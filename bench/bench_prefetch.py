"""Weight prefetch: a swap's load time with its weights cold on disk, and read ahead while the
job before it ran.

One broker in front of two fake upstreams that cannot be resident together. `big`'s load really
reads its weights, a generated file (1 GiB by default, in a temporary folder removed after),
the way a model server reads a checkpoint; `other` runs one job of a few seconds. A round:

    drop the file from the page cache (POSIX_FADV_DONTNEED: no root needed)
    job for `other` (its tenure) -> while it runs, a job for `big` queues
    `other`'s job ends -> `other` evicted -> `big` loads (timed by the upstream itself)

`cold`: the registry says `prefetch: false`; `prefetched`: the shipped default, where the broker
reads `big`'s `weights` while `other`'s job runs. Rounds alternate (cold, prefetched) so that
both see the same disk. The bare read of the file, cold and from the page cache, is measured
too (after the rounds): what the disk and the cache give without any broker. Results go to
bench/results/prefetch.json.

    make bench-prefetch        # or: .venv/bin/python bench/bench_prefetch.py [--gib 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from mgpumanager.broker import Broker
from mgpumanager.daemon import start_server
from mgpumanager.registry import Config
from mgpumanager.sim.server import serve_app, wait_until

GIB = 1024**3
CHUNK = 16 * 1024 * 1024
RESULTS = Path(__file__).parent / "results" / "prefetch.json"


def make_weights(path: Path, size: int) -> None:
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = min(CHUNK, size - written)
            f.write(block[:n])
            written += n
        f.flush()
        os.fsync(f.fileno())  # clean pages: DONTNEED can drop them


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_whole(path: Path) -> float:
    """Read the file as a model server would (sequential, large reads); answers seconds."""
    started = time.perf_counter()
    buffer = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return time.perf_counter() - started


class Upstreams:
    """`other` and `big`: load, unload, and a job route each."""

    def __init__(self, weights: Path, run_s: float) -> None:
        self.weights = weights
        self.run_s = run_s
        self.load_s: list[float] = []
        self.app = web.Application()
        r = self.app.router
        for name in ("other", "big"):
            r.add_get(f"/{name}/health", self._ok)
            r.add_post(f"/{name}/unload", self._ok)
        r.add_post("/other/load", self._ok)
        r.add_post("/big/load", self._load_big)
        r.add_post("/other/run", self._run)
        r.add_post("/big/run", self._ok)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _run(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.run_s)  # the GPU at work (this is what the bench simulates)
        return web.json_response({"ok": True})

    async def _load_big(self, request: web.Request) -> web.Response:
        self.load_s.append(await asyncio.to_thread(read_whole, self.weights))
        return web.json_response({"ok": True})


def registry(url: str, weights: Path, prefetch: bool) -> Config:
    def consumer(name: str, kind: str) -> dict[str, Any]:
        return {
            "url": f"{url}/{name}",
            "health": {"path": "/health", "interval_s": 5},
            "paths": {kind: {"path": "/run"}},
            "vram_resident_mib": 14000,
            "unload": {"path": "/unload"},
            "load": {"path": "/load", "timeout_s": 300},
            "load_timeout_s": 300,
        }

    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "static", "total_mib": 24576, "static_settle_s": 0},
            "prefetch": prefetch,
            "routing": {"tts": "other", "stt": "big"},
            "consumers": {
                "other": consumer("other", "tts"),
                "big": {**consumer("big", "stt"), "weights": [str(weights)]},
            },
        }
    )


async def one_round(upstreams: Upstreams, url: str, prefetch: bool) -> dict[str, Any]:
    broker = Broker(registry(url, upstreams.weights, prefetch))
    server = await start_server(broker, port=0)
    try:
        async with aiohttp.ClientSession() as session:
            # `other` resident first, then the weights cold, then the round.
            async with session.post(f"{server.url}/v1/tts", json={}) as resp:
                await resp.read()
            drop_cache(upstreams.weights)
            other = asyncio.ensure_future(session.post(f"{server.url}/v1/tts", json={}))
            await wait_until(lambda: broker.lease.core.holder == "other", what="other's job")
            big = asyncio.ensure_future(session.post(f"{server.url}/v1/stt", json={}))
            for task in (other, big):
                resp = await task
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        status = broker.status().prefetch
        last = status.last if status is not None else None
    finally:
        await server.stop()
    return {
        "prefetch": prefetch,
        "load_s": round(upstreams.load_s[-1], 3),
        "prefetched_bytes": last["read_bytes"] if last else 0,
        "warm": last["warm"] if last else None,
        "cached_fraction": last["cached_fraction"] if last else None,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the weights file")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each (alternating)")
    parser.add_argument("--run-s", type=float, default=4.0, help="the job before the swap")
    parser.add_argument("--dir", default=None, help="where the file goes (default: temp)")
    args = parser.parse_args()
    size = int(args.gib * GIB)
    folder = Path(tempfile.mkdtemp(prefix="mgpu-prefetch-", dir=args.dir))
    free = shutil.disk_usage(folder).free
    if free < size + GIB:
        shutil.rmtree(folder)
        sys.exit(f"{folder}: {free / GIB:.1f} GiB free, {size / GIB + 1:.1f} GiB needed")
    weights = folder / "weights.bin"
    try:
        make_weights(weights, size)
        upstreams = Upstreams(weights, args.run_s)
        app = await serve_app(upstreams.app)
        rounds = []
        try:
            for _ in range(args.rounds):
                for prefetch in (False, True):
                    rounds.append(await one_round(upstreams, app.url, prefetch))
                    print(rounds[-1], flush=True)
        finally:
            await app.aclose()
        # The bare read, after the rounds (right after the file is written, a virtual disk's
        # host may still hold it in its own cache and read "cold" far faster).
        bare_cold, bare_warm = [], []
        for _ in range(args.rounds):
            drop_cache(weights)
            bare_cold.append(read_whole(weights))
            bare_warm.append(read_whole(weights))
    finally:
        shutil.rmtree(folder)
    cold = statistics.median(r["load_s"] for r in rounds if not r["prefetch"])
    warm = statistics.median(r["load_s"] for r in rounds if r["prefetch"])
    gib = size / GIB
    result = {
        "benchmark": "a swap's load time, weights cold vs read ahead during the job before",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown cpu'}",
        "weights_gib": gib,
        "rounds": rounds,
        "cold_s": round(cold, 3),
        "prefetched_s": round(warm, 3),
        "speedup": round(cold / warm, 2),
        "cold_gib_per_s": round(gib / cold, 2),
        "prefetched_gib_per_s": round(gib / warm, 2),
        "bare_read_cold_gib_per_s": round(gib / statistics.median(bare_cold), 2),
        "bare_read_cached_gib_per_s": round(gib / statistics.median(bare_warm), 2),
        "goal_speedup": 2.0,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"load of {gib:g} GiB: cold {cold:.3f} s ({result['cold_gib_per_s']} GiB/s), "
        f"prefetched {warm:.3f} s ({result['prefetched_gib_per_s']} GiB/s): "
        f"{result['speedup']}x; bare read cold {result['bare_read_cold_gib_per_s']} GiB/s, "
        f"cached {result['bare_read_cached_gib_per_s']} GiB/s"
    )
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
