"""The broker's own hop against the floors: a bare aiohttp proxy and nginx, on loopback.

Four ways to the same tiny upstream (an aiohttp app, a process of its own):
- direct: no proxy, what the upstream and the load generator cost by themselves;
- nginx: the native floor (skipped with a note where nginx is not installed), upstream
  keep-alive, no lock;
- bare: the Python floor, an aiohttp proxy written here that takes one asyncio.Lock around the
  upstream call and streams both ways, as the broker does;
- broker: mgpumanager (`POST /v1/llm`, one generic consumer, static GPU backend).
Each proxy runs in a process of its own. The load generator is wrk (skipped with a note where
it is missing) for the request rates and curl for the 512 MiB transfers; every target gets the
same rounds, interleaved (the order turns each round), so that a slow moment of the shared
machine hits them alike. The hop of a proxy is its p50 at one connection minus the direct p50.

Then, in a fresh broker: its RSS idle (after 1,000 jobs) and after 100,000 more; and the cost
of a long queue: with the lease held, 10 / 1,000 / 10,000 jobs waiting, the memory per waiting
job and the time from the holder's end to the next job reaching the upstream. The scheduler
core alone is timed too (a grant: finish + schedule, at those queue depths).

    make bench-proxy                                 # ~4 minutes, to results/proxy.json
    .venv/bin/python bench/bench_proxy.py --rounds 1 --seconds 1 --soak-jobs 5000 --out /tmp/p
    .venv/bin/python bench/bench_proxy.py --profile  # cProfile of the broker under load
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib
import io
import json
import logging
import os
import platform
import pstats
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from mgpumanager.clock import FakeClock

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024
BIG = 512 * MIB
TINY = b'{"model":"m","response":"ok","done":true}'
BODY = '{"model":"m","prompt":"hi"}'
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)


# -- the processes ------------------------------------------------------------------------------


def upstream_app() -> web.Application:
    """POST /api/generate: a tiny JSON answer; `?size=N`: N bytes streamed back; `?sink=1`: the
    body read and counted; `?hold=1`: held until POST /control/release (which releases the
    oldest held request, or all with `?all=1` and stops holding). GET /control/arrivals: when
    each request came (time.monotonic), for the handoff times."""
    chunk = bytes(MIB)
    held: list[asyncio.Future[None]] = []
    arrivals: list[float] = []
    releases: list[float] = []
    holding = [True]

    async def generate(request: web.Request) -> web.StreamResponse:
        arrivals.append(time.monotonic())
        query = request.query
        if "sink" in query:
            seen = 0
            async for part in request.content.iter_chunked(MIB):
                seen += len(part)
            return web.json_response({"received": seen})
        await request.read()
        if "hold" in query and holding[0]:
            future = asyncio.get_running_loop().create_future()
            held.append(future)
            await future
        size = int(query.get("size", "0"))
        if not size:
            return web.Response(body=TINY, content_type="application/json")
        response = web.StreamResponse()
        response.content_length = size
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        while size > 0:
            await response.write(chunk[: min(size, MIB)])
            size -= MIB
        await response.write_eof()
        return response

    async def release(request: web.Request) -> web.Response:
        if "all" in request.query:
            holding[0] = False
            while held:
                held.pop(0).set_result(None)
        elif held:
            releases.append(time.monotonic())
            held.pop(0).set_result(None)
        return web.json_response({"held": len(held)})

    async def timeline(request: web.Request) -> web.Response:
        return web.json_response({"arrivals": arrivals[-2000:], "releases": releases[-2000:]})

    async def reset(request: web.Request) -> web.Response:
        holding[0] = True
        arrivals.clear()
        releases.clear()
        return web.json_response({})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=2 * BIG)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/control/release", release)
    app.router.add_post("/control/reset", reset)
    app.router.add_get("/control/arrivals", timeline)
    app.router.add_get("/health", health)
    return app


def bare_app(upstream: str) -> web.Application:
    """The Python floor: relay to the upstream under one asyncio.Lock, streaming both ways."""
    lock = asyncio.Lock()
    holder: dict[str, aiohttp.ClientSession] = {}

    async def start(app: web.Application) -> None:
        holder["session"] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
        )

    async def stop(app: web.Application) -> None:
        await holder["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        data = request.content.iter_chunked(64 * 1024) if request.body_exists else None
        async with (
            lock,
            holder["session"].request(
                request.method,
                upstream + request.path_qs,
                data=data,
                headers=headers,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            ) as answer,
        ):
            response = web.StreamResponse(status=answer.status)
            for k, v in answer.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    response.headers.add(k, v)
            await response.prepare(request)
            async for part in answer.content.iter_any():
                await response.write(part)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=2 * BIG)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


async def serve_role(role: str, upstream: str, profile: Path | None) -> None:
    """The child's side: serve `role` on a port of its own choosing, print where, serve until
    stdin closes."""
    raise_fd_limit()
    # A wrk run ends with requests in flight: their handlers fail on the closed connection and
    # aiohttp logs each one. Those lines go to the child's log file (see `child`).
    logging.basicConfig(level=logging.WARNING)
    profiler = cProfile.Profile() if profile is not None else None
    if role == "broker":
        from mgpumanager.broker import Broker
        from mgpumanager.daemon import start_server

        server = await start_server(Broker(broker_config(upstream)), port=0)
        url = server.url
        stop: Callable[[], Any] = server.stop
    else:
        app = upstream_app() if role == "upstream" else bare_app(upstream)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url, stop = f"http://{host}:{port}", runner.cleanup
    print(json.dumps({"url": url, "pid": os.getpid()}), flush=True)
    if profiler is not None:
        profiler.enable()
    await asyncio.to_thread(sys.stdin.read)
    if profiler is not None and profile is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    await stop()


def broker_config(upstream: str) -> Any:
    from mgpumanager.registry import Config

    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "max_body_mib": 2 * BIG // MIB,
            "gpu": {"backend": "static", "total_mib": 24576},
            "scheduler": {"max_queue": 20000},
            # 10,000 clients wait at once in the long-queue run: past the default cap of 4096
            # connections (the file limit lowers it further where it must).
            "max_connections": 30000,
            "routing": {"llm": "up"},
            "consumers": {
                "up": {"url": upstream, "vram_resident_mib": 1000, "health": {"path": "/health"}}
            },
        }
    )


# 10,000 waiting jobs: the broker keeps a descriptor budget per connection (its client, the
# upstream, a spool file), so it needs ~30,000; this process needs one per client connection.
WANTED_FDS = 65536


def raise_fd_limit() -> None:
    """The open-file limit as high as this process may set it: past the hard limit where it is
    allowed to (root), else up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < WANTED_FDS:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (WANTED_FDS, WANTED_FDS))
            return
        except (ValueError, OSError):
            pass  # not allowed: the hard limit it is
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Child:
    url: str
    pid: int
    proc: subprocess.Popen[str]

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def child(
    role: str,
    logs: Path,
    upstream: str = "",
    loop: str = "asyncio",
    profile: Path | None = None,
) -> Iterator[Child]:
    """`role` in a process of its own; its stderr (logs) appended to `logs`/<role>.log."""
    command = [sys.executable, __file__, "--serve", role, "--upstream", upstream, "--loop", loop]
    if profile is not None:
        command += ["--profile-to", str(profile)]
    with (logs / f"{role}.log").open("a") as log:
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
    assert proc.stdout is not None
    try:
        info = json.loads(proc.stdout.readline())
        yield Child(info["url"], info["pid"], proc)
    finally:
        if proc.poll() is None:
            Child("", proc.pid, proc).stop()


@contextmanager
def nginx(upstream: str, work: Path) -> Iterator[str | None]:
    """nginx in front of the upstream on a port bound here (port 0) and handed over as an
    inherited socket; None where nginx is not installed."""
    binary = nginx_binary()
    if binary is None:
        yield None
        return
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    up = upstream.removeprefix("http://")
    temp = " ".join(
        f"{kind}_temp_path {work}/{kind};" for kind in ("client_body", "proxy", "fastcgi")
    )
    (work / "nginx.conf").write_text(
        f"""daemon off; master_process on; worker_processes 1; pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; {temp} uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  upstream up {{ server {up}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_buffer_size 64k;
    proxy_buffers 8 64k;
    proxy_busy_buffers_size 128k;
    location / {{ proxy_pass http://up; proxy_http_version 1.1;
                  proxy_set_header Connection ""; }}
  }}
}}
"""
    )
    proc = subprocess.Popen(
        [binary, "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")],
        env={**os.environ, "NGINX": f"{sock.fileno()};"},
        pass_fds=[sock.fileno()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url + "/health", alive=lambda: proc.poll() is None)
        except RuntimeError as exc:
            log = (work / "error.log").read_text()[-2000:]
            raise RuntimeError(f"nginx did not come up: {exc}\n{log}") from None
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        sock.close()


def wait_http(url: str, alive: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if not alive():
            raise RuntimeError("it has exited")
        try:
            subprocess.run(
                ["curl", "-sf", "-o", "/dev/null", url], check=True, timeout=5, capture_output=True
            )
            return
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer in {timeout_s} s") from None
            time.sleep(0.05)


# -- the load ---------------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = 'BODY'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{"requests": %d, "duration_us": %d, "errors": %d, "status_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
""".replace("BODY", BODY)


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, float]:
    """One wrk run (one thread): requests/s, p50 and p99 in µs, errors."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    return {
        "rps": doc["requests"] / (doc["duration_us"] / 1e6),
        "p50_us": doc["p50_us"],
        "p99_us": doc["p99_us"],
        "requests": doc["requests"],
        "errors": doc["errors"] + doc["status_errors"],
    }


def curl_mib_s(url: str, upload: Path | None = None) -> float:
    """MiB/s of one 512 MiB transfer: the answer streamed back, or `upload` streamed up."""
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total} %{http_code}", "-X", "POST"]
    if upload is not None:
        # No "Expect: 100-continue": every path here would answer it, but at a round trip's
        # cost that is no part of the relay.
        command += ["-T", str(upload), "-H", "Content-Type: application/octet-stream"]
        command += ["-H", "Expect:"]
    else:
        command += ["-H", "Content-Type: application/json", "--data", BODY]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True, timeout=120)
    total_s, code = out.stdout.split()
    if code != "200":
        raise RuntimeError(f"{url}: HTTP {code}")
    return BIG / MIB / float(total_s)


@dataclass(frozen=True)
class Target:
    name: str
    post_url: str  # where a job goes: /api/generate or the broker's /v1/llm


def one_round(targets: Sequence[Target], seconds: float, script: Path, big: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in targets:
        one = wrk(t.post_url, 1, seconds, script)
        many = wrk(t.post_url, 16, seconds, script)
        down = curl_mib_s(f"{t.post_url}?size={BIG}")
        up = curl_mib_s(f"{t.post_url}?sink=1", upload=big)
        out[t.name] = {"c1": one, "c16": many, "answer_mib_s": down, "upload_mib_s": up}
        print(
            f"  {t.name:14} p50 {one['p50_us']:6.0f} µs  p99 {one['p99_us']:6.0f} µs  "
            f"16 conns {many['rps']:7.0f}/s  answer {down:6.0f} MiB/s  upload {up:6.0f} MiB/s",
            flush=True,
        )
    return out


def ratios(rounds: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Per round, then the median and range over rounds: each target's hop (its p50 minus the
    direct p50) and p99, its jobs/s and MiB/s, against the bare proxy's."""
    per: dict[str, dict[str, list[float]]] = {}
    for r in rounds:
        direct, bare = r["direct"], r["bare"]
        for name in names:
            t = r[name]
            row = per.setdefault(name, {})
            row.setdefault("hop_us", []).append(t["c1"]["p50_us"] - direct["c1"]["p50_us"])
            if name == "direct" or name not in r:
                continue
            bare_hop = bare["c1"]["p50_us"] - direct["c1"]["p50_us"]
            row.setdefault("hop_vs_bare", []).append(
                (t["c1"]["p50_us"] - direct["c1"]["p50_us"]) / bare_hop
            )
            row.setdefault("p99_vs_bare", []).append(t["c1"]["p99_us"] / bare["c1"]["p99_us"])
            row.setdefault("rps16_vs_bare", []).append(t["c16"]["rps"] / bare["c16"]["rps"])
            row.setdefault("answer_vs_bare", []).append(t["answer_mib_s"] / bare["answer_mib_s"])
            row.setdefault("upload_vs_bare", []).append(t["upload_mib_s"] / bare["upload_mib_s"])
    return {
        name: {
            k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for k, v in row.items()
        }
        for name, row in per.items()
    }


def medians(rounds: list[dict[str, Any]], name: str) -> dict[str, float]:
    def over_rounds(figure: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(figure(r[name]) for r in rounds)

    return {
        "p50_us": over_rounds(lambda t: t["c1"]["p50_us"]),
        "p99_us": over_rounds(lambda t: t["c1"]["p99_us"]),
        "rps_c1": over_rounds(lambda t: t["c1"]["rps"]),
        "rps_c16": over_rounds(lambda t: t["c16"]["rps"]),
        "answer_mib_s": over_rounds(lambda t: t["answer_mib_s"]),
        "upload_mib_s": over_rounds(lambda t: t["upload_mib_s"]),
    }


# -- the broker's memory and its queue ----------------------------------------------------------


async def status(session: aiohttp.ClientSession, broker: str) -> dict[str, Any]:
    async with session.get(broker + "/v1/status") as resp:
        doc: dict[str, Any] = await resp.json()
        return doc


async def soak(broker: Child, jobs: int, script: Path) -> dict[str, Any]:
    """RSS after start, after 1,000 jobs (idle), and after `jobs` more."""
    async with aiohttp.ClientSession() as session:
        start = broker.rss_mib()
        await asyncio.to_thread(run_jobs, broker.url, 1000, script)
        idle = broker.rss_mib()
        base = (await status(session, broker.url))["scheduler"]["total_jobs"]
        started = time.monotonic()
        done = 0
        while done < jobs:
            await asyncio.to_thread(run_jobs, broker.url, jobs - done, script)
            done = (await status(session, broker.url))["scheduler"]["total_jobs"] - base
        return {
            "rss_start_mib": start,
            "rss_idle_mib": idle,
            "jobs": done,
            "rss_after_mib": broker.rss_mib(),
            "growth_mib": broker.rss_mib() - idle,
            "jobs_per_s": done / (time.monotonic() - started),
        }


def run_jobs(url: str, jobs: int, script: Path) -> None:
    """About `jobs` jobs at 16 connections (wrk runs for a time: at ~1,000 jobs/s)."""
    wrk(url + "/v1/llm", 16, max(1.0, min(30.0, jobs / 1000)), script)


async def queue_cost(broker: Child, upstream: Child, depths: Sequence[int]) -> dict[str, Any]:
    """With the lease held by a job the upstream holds, `depth` jobs waiting: the broker's
    memory per waiting job, and the time from the upstream releasing the holder to the next
    job arriving there (the broker's answer, its grant and its forward), over 20 handoffs."""
    out: dict[str, Any] = {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for depth in depths:
            await control(session, upstream.url + "/control/reset")
            before = broker.rss_mib()
            url = broker.url + "/v1/llm?hold=1"
            holder = asyncio.create_task(post(session, url))
            await until(session, broker, lambda s: s["scheduler"]["in_flight"] == 1)
            jobs: list[asyncio.Task[int]] = []
            while len(jobs) < depth:
                # 500 connections at a time: a burst of 10,000 overflows the listen backlog
                # (the kernel resets what it cannot queue). /v1/status lists every waiting job:
                # polled slowly, and never while measuring.
                more = min(500, depth - len(jobs))
                jobs += [asyncio.create_task(post(session, url)) for _ in range(more)]
                await until(session, broker, depth_is(len(jobs)), every_s=0.05)
            started = time.monotonic()
            await status(session, broker.url)
            status_ms = (time.monotonic() - started) * 1000
            await asyncio.sleep(0.5)
            per_job_kib = (broker.rss_mib() - before) * 1024 / depth
            for _ in range(min(20, depth)):
                await control(session, upstream.url + "/control/release")
                await until_held(session, upstream.url)
            async with session.get(upstream.url + "/control/arrivals") as resp:
                timeline = await resp.json()
            gaps = handoff_gaps(timeline["releases"], timeline["arrivals"])
            await control(session, upstream.url + "/control/release?all=1")
            await asyncio.gather(holder, *jobs)
            out[str(len(jobs))] = {
                "rss_per_waiting_job_kib": per_job_kib,
                "status_ms": status_ms,
                "handoff_ms": {
                    "median": statistics.median(gaps) * 1000,
                    "max": max(gaps) * 1000,
                    "n": len(gaps),
                },
            }
            print(
                f"  queue {len(jobs):6}: {per_job_kib:6.1f} KiB per waiting job, handoff median "
                f"{statistics.median(gaps) * 1000:.2f} ms, /v1/status {status_ms:.0f} ms",
                flush=True,
            )
    return out


async def control(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url) as resp:
        await resp.read()


def depth_is(depth: int) -> Callable[[dict[str, Any]], bool]:
    return lambda doc: bool(doc["scheduler"]["queue_depth"] == depth)


async def post(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
        await r.read()
        return r.status


async def until(
    session: aiohttp.ClientSession,
    broker: Child,
    ok: Callable[[dict[str, Any]], bool],
    timeout_s: float = 120.0,
    every_s: float = 0.01,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok(await status(session, broker.url)):
        if broker.proc.poll() is not None:
            raise RuntimeError(f"the broker exited with code {broker.proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("the broker did not get there in time")
        await asyncio.sleep(every_s)


async def until_held(session: aiohttp.ClientSession, upstream: str) -> None:
    """Until the next job (a held one) has reached the upstream."""
    deadline = time.monotonic() + 60
    while True:
        async with session.get(upstream + "/control/arrivals") as resp:
            timeline = await resp.json()
        if len(timeline["arrivals"]) > len(timeline["releases"]) or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.005)


def handoff_gaps(releases: Sequence[float], arrivals: Sequence[float]) -> list[float]:
    """For each release, the first arrival after it."""
    gaps = []
    for at in releases:
        later = [a for a in arrivals if a > at]
        if later:
            gaps.append(min(later) - at)
    return gaps


def core_grant_cost(depths: Sequence[int], grants: int = 2000) -> dict[str, float]:
    """The scheduler core alone: the mean time of one grant (the holder's job finishes, the
    next is picked), in µs, with `depth` jobs waiting of 4 consumers x 3 priorities; a new job
    comes after each grant, so the depth holds."""
    return {str(depth): grant_cost(depth, grants) for depth in depths}


def grant_cost(depth: int, grants: int) -> float:
    from mgpumanager.registry import SchedulerConfig
    from mgpumanager.scheduling.core import ConsumerPolicy, Outcome, SchedulerCore

    names = ("a", "b", "c", "d")
    clock = FakeClock()
    core = SchedulerCore(
        SchedulerConfig(max_queue=depth + 10), {n: ConsumerPolicy(priority=2) for n in names}, clock
    )
    rng = random.Random(depth)

    def submit() -> None:
        core.submit(rng.choice(names), rng.choice((1, 2, 3)))
        clock.advance(0.01)

    for _ in range(depth + 1):
        submit()
    resident, costs = frozenset({"a"}), {n: 5.0 for n in names}
    [grant] = core.schedule(resident, costs)
    core.ready(grant.job_id)
    running, elapsed = grant.job_id, 0.0
    for _ in range(grants):
        clock.advance(0.5)
        t0 = time.perf_counter()
        core.finish(running, Outcome.COMPLETED)
        [grant] = core.schedule(resident, costs)
        elapsed += time.perf_counter() - t0
        if grant.prepare:
            core.ready(grant.job_id)
        running = grant.job_id
        submit()
    return elapsed / grants * 1e6


# -- the whole run ------------------------------------------------------------------------------


def nginx_binary() -> str | None:
    """nginx on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def tools() -> dict[str, str | None]:
    """Each tool's version line, None where it is missing."""

    def version(binary: str | None, flag: str) -> str | None:
        if binary is None:
            return None
        run = subprocess.run([binary, flag], capture_output=True, text=True, timeout=10)
        return (run.stdout + run.stderr).strip().splitlines()[0]

    return {
        "wrk": version(shutil.which("wrk"), "--version"),
        "nginx": version(nginx_binary(), "-v"),
        "curl": version(shutil.which("curl"), "--version"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    found = tools()
    notes = []
    if found["wrk"] is None or found["curl"] is None:
        raise SystemExit("bench_proxy needs wrk and curl (apt-get install wrk curl)")
    if found["nginx"] is None:
        notes.append("nginx is not installed: no native floor (apt-get install nginx-light)")
    results: dict[str, Any] = {
        "meta": {
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "cpus": os.cpu_count(),
            "tools": found,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "loop": args.loop,
            "notes": notes,
        }
    }
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        work = Path(tmp)
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT)
        big = work / "upload.bin"
        with big.open("wb") as f:
            f.truncate(BIG)  # sparse: 512 MiB of zeros that cost no memory
        with (
            child("upstream", work) as up,
            child("bare", work, up.url, args.loop) as bare,
            child("broker", work, up.url, args.loop) as broker,
            nginx(up.url, work) as ngx,
        ):
            targets = [Target("direct", up.url + "/api/generate")]
            if ngx is not None:
                targets.append(Target("nginx", ngx + "/api/generate"))
            targets += [
                Target("bare", bare.url + "/api/generate"),
                Target("broker", broker.url + "/v1/llm"),
            ]
            for t in targets:  # warm up: connections, imports, first-request costs, buffers
                wrk(t.post_url, 1, 1, script)
                curl_mib_s(f"{t.post_url}?size={BIG}")
                curl_mib_s(f"{t.post_url}?sink=1", upload=big)
            rounds = []
            for n in range(args.rounds):
                print(f"round {n + 1} of {args.rounds}", flush=True)
                turn = n % len(targets)
                rounds.append(one_round(targets[turn:] + targets[:turn], args.seconds, script, big))
            names = [t.name for t in targets]
            results["rounds"] = rounds
            results["median"] = {name: medians(rounds, name) for name in names}
            results["ratios"] = ratios(rounds, names)
        print("the broker's memory over many jobs, and a long queue", flush=True)
        with child("upstream", work) as up, child("broker", work, up.url, args.loop) as broker:
            results["soak"] = asyncio.run(soak(broker, args.soak_jobs, script))
            results["queue"] = asyncio.run(queue_cost(broker, up, args.depths))
        # What the broker logged: warnings for the requests a wrk run cut off at its end, no
        # traceback expected.
        broker_log = (work / "broker.log").read_text()
        results["meta"]["broker_log"] = {
            "lines": len(broker_log.splitlines()),
            "tracebacks": broker_log.count("Traceback"),
            "last": broker_log[-3000:],
        }
    # In one process, no connections: 10,000 waiting whatever the open-file limit allows.
    results["core_grant_us"] = core_grant_cost(sorted({*args.depths, 10, 1000, 10000}))
    return results


def profile(args: argparse.Namespace) -> None:
    """cProfile of the broker while wrk sends it jobs at 16 connections (and, apart, while it
    streams 512 MiB each way); prints the costliest functions."""
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        work = Path(tmp)
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT)
        stats = work / "broker.prof"
        with (
            child("upstream", work) as up,
            child("broker", work, up.url, args.loop, stats) as broker,
        ):
            wrk(broker.url + "/v1/llm", 16, args.seconds * 3, script)
            broker.stop()
        text = io.StringIO()
        p = pstats.Stats(str(stats), stream=text)
        p.sort_stats("tottime").print_stats(35)
        p.sort_stats("cumulative").print_stats(90)
        print(text.getvalue())


def table(results: Mapping[str, Any]) -> str:
    """Markdown for bench/README.md."""
    med, rat = results["median"], results["ratios"]
    lines = [
        "| path | p50 / p99 at 1 connection | hop (p50 - direct) | jobs/s at 16 connections "
        "| 512 MiB answer | 512 MiB upload |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in med.items():
        hop = rat[name]["hop_us"]["median"]
        lines.append(
            f"| {name} | {m['p50_us']:.0f} / {m['p99_us']:.0f} µs | "
            f"{'' if name == 'direct' else f'{hop:+.0f} µs'} | {m['rps_c16']:,.0f} | "
            f"{m['answer_mib_s']:,.0f} MiB/s | {m['upload_mib_s']:,.0f} MiB/s |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk run")
    parser.add_argument("--soak-jobs", type=int, default=100_000)
    parser.add_argument(
        "--depths", type=lambda s: [int(x) for x in s.split(",")], default=[10, 1000, 10000]
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop of the bare proxy and the broker",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true", help="profile the broker instead")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        role = serve_role(args.serve, args.upstream, args.profile_to)
        if args.loop == "uvloop":
            importlib.import_module("uvloop").run(role)
        else:
            asyncio.run(role)
        return 0
    raise_fd_limit()
    if args.profile:
        profile(args)
        return 0
    started = time.monotonic()
    results = run(args)
    results["meta"]["wall_s"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "proxy.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    for name, r in results["ratios"].items():
        if name != "direct":
            print(name, {k: round(v["median"], 2) for k, v in r.items()})
    print("soak", {k: round(v, 2) for k, v in results["soak"].items()})
    print("core grant µs", {k: round(v, 1) for k, v in results["core_grant_us"].items()})
    print(f"wall {results['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
