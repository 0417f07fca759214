"""What a waiting streamed client hears, and what it costs the broker.

One broker (a process of its own, so that its CPU is its own) in front of the simulated GPU with
the fake Ollama and the fake mVoice. A TTS job that runs 20 s holds the lease; meanwhile
streamed requests arrive, half Ollama (`/api/chat`), half OpenAI (`/v1/chat/completions`,
`"stream": true`), and wait behind it. Reported:

- header latency: from the request sent (its body is a few hundred bytes, so it is admitted
  as soon as it arrives) to its status line, p50/p99/max (goal p99 < 50 ms);
- the longest silence a waiting client saw: between the headers and each frame, up to the
  holder's end (goal <= feedback_interval_s + 100 ms);
- the broker's CPU while they wait (its process's utime + stime over a window, less the same
  window with nobody waiting), per waiting client per second, and for 1,000 waiting streams
  (goal < 10 % of one core).

Phase one: 100 streams (latency, silence, CPU); phase two: 1,000 streams (CPU). Every answer
is read to its end afterwards. Results go to bench/results/wait.json.

    make bench-wait       # or: .venv/bin/python bench/bench_wait.py
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings

MODEL = "llama3.1:8b"
HOLD_S = 20.0
INTERVAL_S = 1.0
WINDOW_S = 8.0  # the CPU window
RESULTS = Path(__file__).parent / "results" / "wait.json"
TICKS = os.sysconf("SC_CLK_TCK")


def registry(cluster: SimCluster) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "gpu": {"backend": "sim", "sim_url": cluster.gpu_url},
        "feedback_interval_s": INTERVAL_S,
        "scheduler": {"max_queue": 5000, "queue_timeout_s": 600},
        "max_connections": 8000,
        "routing": {"tts": "mvoice", "llm": "ollama"},
        "consumers": {
            "mvoice": {
                "url": cluster.urls["mvoice"],
                "health": {"path": "/health", "interval_s": 5},
                "vram_resident_mib": 6000,
                "can_coexist_with": ["ollama"],
            },
            "ollama": {
                "type": "ollama",
                "url": cluster.urls["ollama"],
                "health": {"path": "/api/version", "interval_s": 5},
                "vram_resident_mib": 6500,
                "can_coexist_with": ["mvoice"],
                "models": [{"name": MODEL, "vram_mib": 6200}],
            },
        },
    }


async def serve(config_json: str) -> None:
    """The child: the broker on a port of its own, its URL and pid printed, until stdin closes."""
    from mgpumanager.broker import Broker
    from mgpumanager.daemon import start_server
    from mgpumanager.registry import Config

    raise_fd_limit()
    server = await start_server(Broker(Config.model_validate(json.loads(config_json))), port=0)
    print(json.dumps({"url": server.url, "pid": os.getpid()}), flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await server.stop()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


class Waiter:
    """One streamed request: when it was sent, when its headers came, when each piece came."""

    def __init__(self, http: aiohttp.ClientSession, url: str, openai: bool) -> None:
        self.openai = openai
        self.sent = 0.0
        self.headers_at: float | None = None
        self.pieces: list[float] = []
        self.body = b""
        self.answered = asyncio.Event()  # its headers came
        self.task = asyncio.ensure_future(self._run(http, url))

    async def _run(self, http: aiohttp.ClientSession, base: str) -> None:
        messages = [{"role": "user", "content": "Why is the sky blue?"}]
        body: dict[str, object] = {"model": MODEL, "messages": messages}
        if self.openai:
            url = f"{base}/v1/chat/completions"
            body["stream"] = True
        else:
            url = f"{base}/api/chat"
        self.sent = time.perf_counter()
        async with http.post(url, json=body) as resp:
            self.headers_at = time.perf_counter()
            self.answered.set()
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
            async for piece in resp.content.iter_any():
                self.pieces.append(time.perf_counter())
                self.body += piece

    def silence_s(self, until: float) -> float:
        if self.headers_at is None:
            return float("inf")
        marks = [self.headers_at, *(t for t in self.pieces if t <= until), until]
        return max(b - a for a, b in itertools.pairwise(marks))

    def complete(self) -> bool:
        text = self.body.decode()
        return "[DONE]" in text if self.openai else '"done":true' in text.replace(" ", "")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def holder(http: aiohttp.ClientSession, url: str) -> float:
    """Run one 20 s TTS job; answer when it ended."""
    async with http.post(f"{url}/v1/tts", json={"text": "hold"}) as resp:
        await resp.read()
    return time.perf_counter()


async def wait_for_holder(http: aiohttp.ClientSession, url: str) -> None:
    while True:
        async with http.get(f"{url}/v1/status") as resp:
            if (await resp.json())["scheduler"]["holder"] == "mvoice":
                return
        await asyncio.sleep(0.05)


async def phase(
    http: aiohttp.ClientSession, url: str, pid: int, clients: int
) -> tuple[list[Waiter], float, dict[str, float]]:
    """`clients` streams queued behind a 20 s job; the CPU of the broker with nobody waiting,
    then with them waiting; every answer read to its end."""
    ends = asyncio.ensure_future(holder(http, url))
    await wait_for_holder(http, url)
    before = cpu_s(pid)
    await asyncio.sleep(WINDOW_S / 2)
    idle_cpu_per_s = (cpu_s(pid) - before) / (WINDOW_S / 2)
    waiters = [Waiter(http, url, openai=i % 2 == 1) for i in range(clients)]
    await asyncio.gather(*(w.answered.wait() for w in waiters))
    await asyncio.sleep(INTERVAL_S)  # every stream in its steady state
    before = cpu_s(pid)
    await asyncio.sleep(WINDOW_S)
    waiting_cpu_per_s = (cpu_s(pid) - before) / WINDOW_S
    released = await ends
    await asyncio.gather(*(w.task for w in waiters))
    extra = max(0.0, waiting_cpu_per_s - idle_cpu_per_s)
    cpu = {
        "idle_core_fraction": idle_cpu_per_s,
        "waiting_core_fraction": waiting_cpu_per_s,
        "per_client_core_fraction": extra / clients,
    }
    return waiters, released, cpu


async def main() -> None:
    raise_fd_limit()
    spec = FakeSpec(
        mvoice=MVoiceSettings(run_s=HOLD_S, load_s=0, free_delay_s=0),
        ollama=OllamaSettings(models={MODEL: 6200}, chunks=4, load_s=0, run_s=0),
        comfyui=None,
        whisper=None,
    )
    async with await start_cluster(spec=spec) as cluster:
        config = json.dumps(registry(cluster))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            config,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        try:
            info = json.loads(await proc.stdout.readline())
            url, pid = info["url"], info["pid"]
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=None)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                body = {"model": MODEL, "prompt": "warm", "stream": False}
                async with http.post(f"{url}/api/generate", json=body) as resp:
                    await resp.read()  # the model resident: the waits are the queue's
                hundred, released, cpu100 = await phase(http, url, pid, 100)
                thousand, _, cpu1000 = await phase(http, url, pid, 1000)
        finally:
            proc.stdin.close()
            async with asyncio.timeout(30):
                await proc.wait()
    latencies_ms = [((w.headers_at or 0) - w.sent) * 1000 for w in hundred]
    silences_ms = [w.silence_s(released) * 1000 for w in hundred]
    thousand_latencies_ms = [((w.headers_at or 0) - w.sent) * 1000 for w in thousand]
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "hold_s": HOLD_S,
        "feedback_interval_s": INTERVAL_S,
        "streams": {
            "clients": len(hundred),
            "header_latency_ms": {
                "p50": statistics.median(latencies_ms),
                "p99": pct(latencies_ms, 0.99),
                "max": max(latencies_ms),
            },
            "longest_silence_ms": {
                "p50": statistics.median(silences_ms),
                "max": max(silences_ms),
                "goal": INTERVAL_S * 1000 + 100,
            },
            "cpu": cpu100,
            "answers_complete": sum(w.complete() for w in hundred),
        },
        "streams_1000": {
            "clients": len(thousand),
            "header_latency_ms": {
                "p50": statistics.median(thousand_latencies_ms),
                "p99": pct(thousand_latencies_ms, 0.99),
            },
            "cpu": cpu1000,
            "cost_of_1000_core_fraction": cpu1000["per_client_core_fraction"] * 1000,
            "answers_complete": sum(w.complete() for w in thousand),
        },
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help="(internal) serve the broker with this registry")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
    else:
        asyncio.run(main())
