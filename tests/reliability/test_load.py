"""Load, disconnects, upstream faults and signals against a real `mgpumanager serve` process in
front of the simulated GPU and the fakes: 64 clients and hundreds (soak: thousands) of mixed
jobs under VRAM pressure lose, duplicate and overlap nothing, never run the card out of memory
and leave the daemon's memory flat; a storm of clients that leave leaves nothing queued or
running; an upstream that dies, hangs or answers garbage gets the documented errors; SIGKILL
and a restart, SIGTERM's drain and SIGHUPs under load all behave. Overlap and duplicates are
measured at the upstreams (the fakes' activity log), not by the broker's own counters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from harness import Daemon, assert_clean_log, daemon, figure, scaled, write_registry
from yarl import URL

from conftest import Upstream, consumer, make_config, wait_for
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import SimCluster, start_cluster
from test_e2e import registry as e2e_registry
from test_e2e import requests_for, spec

pytestmark = pytest.mark.slow

CLIENTS = 64
KINDS = {"tts": "mvoice", "llm": "ollama", "image": "comfyui", "stt": "mvoice"}


def registry(cluster: SimCluster) -> Config:
    """The end-to-end tests' box (mvoice, ollama, comfyui on a 24 GiB card: they cannot all be
    resident), without the whisper process (mvoice serves stt)."""
    config = e2e_registry(cluster)
    mvoice = config.consumers["mvoice"].model_copy(update={"can_coexist_with": []})
    return config.model_copy(update={"consumers": {**config.consumers, "mvoice": mvoice}})


@pytest.fixture
async def cluster() -> AsyncIterator[SimCluster]:
    async with await start_cluster(spec=spec()) as c:
        yield c


@pytest.fixture
async def box(cluster: SimCluster, tmp_path: Path) -> AsyncIterator[Daemon]:
    path = write_registry(tmp_path / "registry.yaml", registry(cluster))
    async with daemon(path, tmp_path / "daemon.log") as d:
        yield d


async def status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/v1/status") as resp:
        return dict(await resp.json())


async def until_idle(url: str, timeout_s: float = 60) -> dict[str, Any]:
    """/v1/status's scheduler once nothing is queued or running (held prompts included)."""
    async with aiohttp.ClientSession() as session:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            s: dict[str, Any] = (await status(session, url))["scheduler"]
            if s["in_flight"] == 0 and s["queue_depth"] == 0:
                return s
            if loop.time() > deadline:
                raise AssertionError(f"not idle after {timeout_s} s: {s}")
            await asyncio.sleep(0.05)  # poll with a deadline


async def run_clients(url: str, jobs_each: int, seed: int) -> Counter[tuple[str, int]]:
    """CLIENTS clients, each running `jobs_each` mixed jobs one after another: what came back,
    by (kind, status)."""
    rng = random.Random(seed)
    plans = [rng.choices(list(KINDS), weights=[3, 3, 2, 2], k=jobs_each) for _ in range(CLIENTS)]
    seen: Counter[tuple[str, int]] = Counter()
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(plan: list[str]) -> None:
            for kind in plan:
                target, kwargs = requests_for(kind, url, direct=False)
                async with session.post(target, **kwargs) as resp:
                    await resp.read()
                    seen[(kind, resp.status)] += 1

        await asyncio.gather(*(client(plan) for plan in plans))
    return seen


def executed(cluster: SimCluster) -> Counter[str]:
    return Counter(i.consumer for i in cluster.activity.intervals())


@pytest.mark.timeout(900)
async def test_load_loses_duplicates_and_overlaps_nothing(box: Daemon, cluster: SimCluster) -> None:
    jobs_each = scaled(6, 32)
    rounds = 2
    rss: list[float] = []
    total: Counter[tuple[str, int]] = Counter()
    started = asyncio.get_running_loop().time()
    for n in range(rounds):
        total += await run_clients(box.url, jobs_each, seed=n)
        await until_idle(box.url)
        rss.append(box.rss_mib())
    elapsed = asyncio.get_running_loop().time() - started
    jobs = CLIENTS * jobs_each * rounds
    assert sum(total.values()) == jobs
    assert {status for _, status in total} == {200}, total  # none lost
    wanted: Counter[str] = Counter()
    for (kind, _), n in total.items():
        wanted[KINDS[kind]] += n
    assert executed(cluster) == wanted  # each job ran once at its upstream: none duplicated
    assert cluster.activity.overlapping_pairs() == []
    assert cluster.activity.max_concurrency("mvoice") == 1
    assert cluster.gpu.oom_count == 0
    figure(f"load: {jobs} jobs from {CLIENTS} clients, seconds", round(elapsed, 1))
    figure("load: daemon RSS after each round (MiB)", json.dumps([round(r, 1) for r in rss]))
    assert rss[-1] - rss[0] < 30, rss  # flat: a second round costs no new memory
    assert_clean_log(box.log())


@pytest.mark.timeout(600)
async def test_a_storm_of_leaving_clients_leaves_nothing_behind(
    box: Daemon, cluster: SimCluster
) -> None:
    storm = scaled(150, 450)
    rng = random.Random(7)
    u = URL(box.url)
    assert u.host is not None and u.port is not None

    async def leaver(i: int) -> None:
        kind = rng.choice(["llm", "tts", "image"])
        path = {"llm": "/v1/llm", "tts": "/v1/tts", "image": "/v1/image"}[kind]
        _, kwargs = requests_for(kind, box.url, direct=False)
        body = json.dumps(kwargs["json"]).encode()
        reader, writer = await asyncio.open_connection(u.host, u.port)
        when = rng.choice(["mid-body", "queued", "queued", "mid-answer", "mid-answer"])
        sent = body[: rng.randrange(len(body))] if when == "mid-body" else body
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + sent
        )
        await writer.drain()
        if when == "mid-answer":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(1), 10)
        elif when == "queued":
            await asyncio.sleep(rng.random() * 0.2)  # the leaver's own moment
        writer.transport.abort()

    await asyncio.gather(*(leaver(i) for i in range(storm)))
    await until_idle(box.url)
    async with aiohttp.ClientSession() as session:
        url, kwargs = requests_for("tts", box.url, direct=False)
        async with session.post(url, **kwargs) as resp:
            assert resp.status == 200
        s = (await status(session, box.url))["scheduler"]
    figure(
        f"disconnect storm: {storm} clients left; queued / cancelled / completed",
        f"{s['total_jobs']} / {s['cancelled']} / {s['completed']}",
    )
    assert s["failed"] == 0
    assert cluster.gpu.oom_count == 0
    assert_clean_log(box.log())


@pytest.mark.timeout(300)
async def test_signals_under_load(cluster: SimCluster, tmp_path: Path) -> None:
    """SIGHUPs under load change nothing a job sees; SIGKILL mid-load and a restart find the
    card as the fakes hold it; SIGTERM drains what runs and refuses what waits."""
    base = registry(cluster)
    path = write_registry(tmp_path / "registry.yaml", base)
    d = Daemon(path, tmp_path / "daemon.log")
    try:
        await d.start()
        # SIGHUP: alternate two registries while 64 clients run.
        hups = scaled(10, 28)
        load = asyncio.create_task(run_clients(d.url, scaled(4, 16), seed=11))
        for i in range(hups):
            batch = 4 if i % 2 else 8
            write_registry(path, base, scheduler={"queue_timeout_s": 120, "max_batch": batch})
            d.send(signal.SIGHUP)

            def reloaded(n: int = i + 1) -> bool:
                return d.log().count("SIGHUP: registry") >= n

            await wait_for(reloaded, timeout_s=30, what=f"reload {i + 1}")
        seen = await load
        assert {status for _, status in seen} == {200}, seen
        figure(f"SIGHUP: {hups} reloads under load, jobs answered", sum(seen.values()))

        # SIGKILL in the middle of load, then a restart.
        load = asyncio.create_task(run_clients(d.url, scaled(4, 16), seed=12))
        await wait_for(lambda: cluster.activity.active_count > 0, what="jobs running")
        await d.kill()
        killed = await asyncio.gather(load, return_exceptions=True)
        assert isinstance(killed[0], aiohttp.ClientError | ConnectionError), killed
        await wait_for(lambda: cluster.activity.active_count == 0, what="fakes idle")
        url = await d.start()
        seen = await run_clients(url, scaled(2, 8), seed=13)
        assert {status for _, status in seen} == {200}, seen
        assert cluster.gpu.oom_count == 0

        # SIGTERM: what runs finishes, what waits gets shutting_down, exit 0.
        await until_idle(url)
        answers: list[int] = []

        async def one(session: aiohttp.ClientSession, kind: str) -> None:
            target, kwargs = requests_for(kind, url, direct=False)
            try:
                async with session.post(target, **kwargs) as resp:
                    await resp.read()
                    answers.append(resp.status)
            except aiohttp.ClientConnectionError:
                answers.append(0)  # arrived after the port closed

        async with aiohttp.ClientSession() as session:
            jobs = [asyncio.create_task(one(session, k)) for k in ["llm", "tts", "image"] * 10]
            for _ in range(400):  # poll with a deadline until a job holds the lease
                if (await status(session, url))["scheduler"]["in_flight"] > 0:
                    break
                await asyncio.sleep(0.01)
            d.send(signal.SIGTERM)
            assert await d.wait(60) == 0
            await asyncio.gather(*jobs)
        counted = Counter(answers)
        figure("SIGTERM drain: answers by status", json.dumps(counted))
        assert set(counted) <= {200, 503, 0} and counted[200] >= 1, counted
        assert cluster.gpu.oom_count == 0
        assert "signal received: draining" in d.log() and "stopped" in d.log()
        assert_clean_log(d.log())
    finally:
        await d.kill()


@pytest.fixture
async def faulty(upstream: Upstream, tmp_path: Path) -> AsyncIterator[tuple[Daemon, Upstream]]:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def dies(request: web.Request) -> web.StreamResponse:
        # A small answer is read whole before anything is sent: its end is an envelope. A large
        # one has started when the upstream dies: the client is cut off.
        resp = web.StreamResponse()
        resp.content_length = int(request.query.get("size", "1000"))
        await resp.prepare(request)
        await resp.write(b"x" * 100_000 if resp.content_length > 100_000 else b"x" * 100)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def fine(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    upstream.route("POST", "/hang", hang)
    upstream.route("POST", "/dies", dies)
    upstream.route("POST", "/fine", fine)
    await upstream.start()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /health "):  # healthy to its probe, garbage to its jobs
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        else:
            writer.write(b"HTTP/1.1 2OO NOT-A-STATUS\r\nX: \x00\x01\r\n\r\ngarbage")
        await writer.drain()
        writer.close()

    junk = await asyncio.start_server(garbage, "127.0.0.1", 0)
    junk_url = f"http://127.0.0.1:{junk.sockets[0].getsockname()[1]}"
    config = make_config(
        {
            "hangs": consumer(upstream.url, paths={"tts": {"path": "/hang"}}, run_timeout_s=1),
            "dies": consumer(upstream.url, paths={"tts": {"path": "/dies"}}),
            "junk": consumer(junk_url, paths={"tts": {"path": "/x"}}),
            "fine": consumer(upstream.url, paths={"tts": {"path": "/fine"}}),
        },
    )
    path = write_registry(tmp_path / "registry.yaml", config)
    async with daemon(path, tmp_path / "daemon.log") as d:
        yield d, upstream
    junk.close()


@pytest.mark.timeout(120)
async def test_upstream_faults_get_the_documented_errors(
    faulty: tuple[Daemon, Upstream],
) -> None:
    d, upstream = faulty
    async with aiohttp.ClientSession() as session:
        # Each one's registry `tts` path is scheduled when it comes under /upstream/<name>/.
        urls = {
            "hangs": "/upstream/hangs/hang",
            "dies": "/upstream/dies/dies",
            "junk": "/upstream/junk/x",
            "fine": "/upstream/fine/fine",
        }
        seen: dict[str, tuple[int, bytes]] = {}
        for name, path in urls.items():
            async with session.post(f"{d.url}{path}", json={}) as resp:
                try:
                    seen[name] = (resp.status, await resp.read())
                except aiohttp.ClientPayloadError:
                    seen[name] = (resp.status, b"<cut>")
        assert seen["fine"][0] == 200
        assert seen["dies"][0] == 502 and b"upstream_error" in seen["dies"][1]
        async with session.post(f"{d.url}{urls['dies']}?size=1000000", json={}) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):  # died mid-answer: cut off
                await resp.read()
            assert resp.status == 200
        assert seen["hangs"][0] == 504 and b"upstream_timeout" in seen["hangs"][1]
        assert seen["junk"][0] == 502 and b"upstream_error" in seen["junk"][1]
        # The upstream dies altogether: consumer_unreachable once its probe fails.
        await upstream.aclose()
        await wait_for(lambda: "fine: health FAILED" in d.log(), timeout_s=20, what="probe fails")
        async with session.post(f"{d.url}{urls['fine']}", json={}) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"] == "consumer_unreachable"
        s = await status(session, d.url)
        assert s["scheduler"]["in_flight"] == 0 and s["scheduler"]["queue_depth"] == 0
    figure("upstream faults: answers", json.dumps({k: v[0] for k, v in seen.items()}))
    assert_clean_log(d.log())
