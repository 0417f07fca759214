"""The event stream: the bus on its own (bounded buffers, dropping), the scheduler's jobs as
events on a fake clock, and `GET /v1/events` on a real broker in front of the simulated GPU:
snapshot first, the events of one job with a swap in order, a client that stops reading
dropped while jobs go on, and the token."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from conftest import SIM_MODEL, core, running_broker, sim_registry, sim_spec, wait_for
from mgpumanager.clock import FakeClock
from mgpumanager.daemon import Server
from mgpumanager.events import Emit, Event, EventBus, History, JobEvents
from mgpumanager.registry import Config
from mgpumanager.scheduling.core import ConsumerPolicy, Outcome
from mgpumanager.sim.cluster import SimCluster, start_cluster

MODEL = "llm:14b"
GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}

# -- the bus --------------------------------------------------------------------------------


async def test_each_subscriber_gets_every_event_in_order_with_time_and_figures() -> None:
    bus = EventBus(wall=lambda: 1700000000.5)
    a, b = bus.subscribe(), bus.subscribe()
    bus.emit("job.queued", job=1, consumer="ollama")
    bus.emit("job.granted", job=1, consumer="ollama", wait_s=0.25)
    for sub in (a, b):
        docs = parse_all(await sub.get() or b"")  # what is pending comes as one piece
        assert [t for t, _ in docs] == ["job.queued", "job.granted"]
        assert docs[1][1] == {
            "seq": 2,
            "type": "job.granted",
            "time": 1700000000.5,
            "job": 1,
            "consumer": "ollama",
            "wait_s": 0.25,
        }


async def test_a_subscriber_whose_buffer_is_full_is_dropped_and_told() -> None:
    bus = EventBus(buffer=3)
    slow, fast = bus.subscribe(), bus.subscribe()
    told: list[str] = []
    slow.on_drop = lambda: told.append("dropped")
    for i in range(3):
        bus.emit("tick", i=i)
        assert parse(await fast.get() or b"")[1]["i"] == i  # `fast` keeps up
    assert slow.pending() == 3 and not slow.dropped
    bus.emit("tick", i=3)  # one more than `slow` can hold
    assert slow.dropped and told == ["dropped"]
    assert await slow.get() is None  # its stream ends; nothing stale is delivered
    assert bus.subscribers == 1 and bus.dropped == 1
    assert parse(await fast.get() or b"")[1]["i"] == 3


async def test_a_failing_listener_does_not_fail_the_emitter_and_close_ends_streams() -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    bus.taps += [broken, lambda e: seen.append(e.type)]
    sub = bus.subscribe()
    bus.emit("health.changed", consumer="mvoice", healthy=False)
    assert seen == ["health.changed"]
    bus.close()
    assert await sub.get() is None  # the broker stops: the stream ends
    assert await bus.subscribe().get() is None  # a closed bus ends new streams at once


def parse(frame: bytes) -> tuple[str, dict[str, Any]]:
    [doc] = parse_all(frame)
    return doc


def parse_all(frames: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in frames.decode().strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.split("\n"))
        out.append((fields["event"], json.loads(fields["data"])))
    return out


# -- jobs as events, on a fake clock ---------------------------------------------------------


def recorder(events: list[tuple[str, dict[str, Any]]]) -> Emit:
    """An `emit` that appends each (kind, figures) to `events`."""

    def emit(kind: str, /, **figures: Any) -> None:
        events.append((kind, figures))

    return emit


def test_a_job_is_queued_granted_and_finished_with_its_wait_and_run() -> None:
    clock = FakeClock()
    c = core(clock)
    events: list[tuple[str, dict[str, Any]]] = []
    jobs = JobEvents(c, clock, recorder(events))
    job = c.submit("ollama", label="/v1/llm llm:14b")
    clock.advance(2.0)
    [grant] = c.schedule()
    assert jobs.running_s(job) == 0.0
    clock.advance(3.0)
    assert jobs.running_s(job) == 3.0
    c.finish(job, Outcome.COMPLETED)
    assert [k for k, _ in events] == ["job.queued", "job.granted", "job.finished"]
    assert events[0][1] == {
        "job": job,
        "consumer": "ollama",
        "label": "/v1/llm llm:14b",
        "priority": 2,
        "exclusive": False,
    }
    assert events[1][1]["wait_s"] == 2.0 and events[1][1]["swap"] is grant.prepare
    assert events[2][1] == {
        "job": job,
        "consumer": "ollama",
        "label": "/v1/llm llm:14b",
        "outcome": "completed",
        "wait_s": 2.0,
        "run_s": 3.0,
        "status": None,
    }
    assert jobs.running_s(job) is None


def test_a_job_that_leaves_the_queue_finishes_without_a_run() -> None:
    clock = FakeClock()
    c = core(clock)
    events: list[tuple[str, dict[str, Any]]] = []
    JobEvents(c, clock, recorder(events))
    c.submit("mvoice")  # holds the lease
    c.schedule()
    waiting = c.submit("comfyui", label="/v1/image")
    clock.advance(4.0)
    assert c.cancel(waiting, Outcome.TIMED_OUT)
    finished = [f for k, f in events if k == "job.finished"]
    assert finished == [
        {
            "job": waiting,
            "consumer": "comfyui",
            "label": "/v1/image",
            "outcome": "timed_out",
            "wait_s": 4.0,
            "run_s": None,
            "status": None,
        }
    ]


def test_a_job_of_a_consumer_removed_by_a_reload_finishes_failed() -> None:
    clock = FakeClock()
    c = core(clock)
    events: list[tuple[str, dict[str, Any]]] = []
    JobEvents(c, clock, recorder(events))
    c.submit("mvoice")
    c.schedule()
    gone = c.submit("comfyui", label="/v1/image")
    c.reconfigure(c.settings, {"mvoice": ConsumerPolicy(3, 1)})
    [(kind, finished)] = [e for e in events if e[1]["job"] == gone and e[0] != "job.queued"]
    assert (kind, finished["outcome"], finished["run_s"]) == ("job.finished", "failed", None)


def test_history_keeps_evictions_with_their_outcome_and_unloads_asked_for() -> None:
    bus = EventBus(wall=lambda: 1.0)
    history = History(keep=10)
    bus.taps.append(history)
    bus.emit(
        "eviction.planned",
        target="comfyui",
        need_mib=12300,
        headroom_mib=4000,
        victims=["ollama/llm:14b", "mvoice"],
        residents=["ollama/llm:14b", "mvoice"],
    )
    bus.emit("eviction.confirmed", consumer="ollama", for_consumer="comfyui", unload_s=0.5)
    [row] = history.evictions
    assert row.outcome == "planned" and row.pending == {"mvoice"}
    bus.emit("eviction.confirmed", consumer="mvoice", for_consumer="comfyui", unload_s=0.2)
    assert row.outcome == "confirmed"
    bus.emit("eviction.failed", consumer="whisper", reason="memory not back within 10 s")
    unload = history.evictions[-1]
    assert (unload.target, unload.victims, unload.outcome) == (None, ["whisper"], "failed")
    assert unload.detail == "memory not back within 10 s"


# -- GET /v1/events on a broker in front of the simulated GPU ----------------------------------


class Follower:
    """A /v1/events client that reads everything into `events` (type, document)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        block: list[str] = []
        async for raw in self.response.content:
            line = raw.decode().rstrip("\n")
            if line:
                block.append(line)
                continue
            fields = dict(x.split(": ", 1) for x in block if not x.startswith(":"))
            block = []
            if "data" in fields:
                self.events.append((fields["event"], json.loads(fields["data"])))

    def types(self) -> list[str]:
        return [t for t, _ in self.events]

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.response.close()


@pytest.fixture
async def cluster() -> AsyncIterator[SimCluster]:
    async with await start_cluster(spec=sim_spec()) as c:
        yield c


async def follow(session: aiohttp.ClientSession, server: Server, **kwargs: Any) -> Follower:
    response = await session.get(server.url + "/v1/events", **kwargs)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    follower = Follower(response)
    await wait_for(lambda: bool(follower.events), what="the snapshot")
    return follower


async def post_ok(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


async def test_snapshot_first_then_one_jobs_swap_in_order(cluster: SimCluster) -> None:
    async with running_broker(sim_registry(cluster)) as server, aiohttp.ClientSession() as s:
        await post_ok(s, server.url + "/v1/llm", {"model": MODEL, "prompt": "hi"})
        await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="idle")
        follower = await follow(s, server)
        kind, snapshot = follower.events[0]
        assert kind == "snapshot"
        assert set(snapshot["consumers"]) == {"mvoice", "ollama", "comfyui"}
        assert snapshot["consumers"]["ollama"]["residency"] == "resident"
        assert snapshot["scheduler"]["waiting"] == [] and snapshot["recent_jobs"]

        # The image needs 12300 MiB: Ollama's 14000 must go first.
        await post_ok(s, server.url + "/v1/image", {"prompt": GRAPH})
        await wait_for(lambda: "job.finished" in follower.types(), what="job.finished")
        await follower.aclose()

    events = follower.events[1:]
    [queued] = [f for t, f in events if t == "job.queued"]
    job = queued["job"]
    [planned] = [f for t, f in events if t == "eviction.planned"]
    victims = sorted({v.partition("/")[0] for v in planned["victims"]})
    assert planned["target"] == "comfyui" and "ollama" in victims
    assert planned["need_mib"] == 12300 and planned["headroom_mib"] < 12300

    def about_this_job(kind: str, f: dict[str, Any]) -> bool:
        if kind.startswith("job."):
            return bool(f["job"] == job)
        return kind != "health.changed" and f.get("consumer", f.get("target")) in (
            "comfyui",
            *victims,
        )

    seen = [
        (kind, f.get("consumer", f.get("target")), f.get("residency"))
        for kind, f in events
        if about_this_job(kind, f)
    ]
    expected: list[tuple[str, str, str | None]] = [
        ("job.queued", "comfyui", None),
        ("job.granted", "comfyui", None),
    ]
    expected.append(("eviction.planned", "comfyui", None))
    for victim in victims:
        expected += [
            ("residency.changed", victim, "unloading"),
            ("residency.changed", victim, "unloaded"),
            ("eviction.confirmed", victim, None),
        ]
    expected += [
        ("residency.changed", "comfyui", "loading"),
        ("load.started", "comfyui", None),
        ("residency.changed", "comfyui", "resident"),
        ("load.ready", "comfyui", None),
        ("job.finished", "comfyui", None),
    ]
    assert seen == expected
    granted = next(f for t, f in events if t == "job.granted" and f["job"] == job)
    finished = next(f for t, f in events if t == "job.finished" and f["job"] == job)
    assert granted["swap"] is True and granted["label"] == "/v1/image"
    assert finished["outcome"] == "completed" and finished["run_s"] > 0
    seqs = [f["seq"] for _, f in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(isinstance(f["time"], float) for _, f in events)


def stalled_client(url: str) -> socket.socket:
    """A /v1/events client that never reads: a small receive buffer, so the broker's writes to
    it back up soon."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /v1/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def read_to_end(sock: socket.socket, timeout_s: float) -> bool:
    """Read everything the broker sent; True once the connection is closed (EOF or reset)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def test_a_client_that_stops_reading_is_dropped_and_jobs_go_on(cluster: SimCluster) -> None:
    async with running_broker(sim_registry(cluster)) as server, aiohttp.ClientSession() as s:
        bus = server.broker.events
        sock = stalled_client(server.url)
        try:
            await wait_for(lambda: bus.subscribers == 1, what="the stalled client subscribed")
            # Jobs run while it is connected and reads nothing: emitting never waits on it.
            for _ in range(3):
                await post_ok(s, server.url + "/v1/tts", {"text": "hi"})
            assert bus.subscribers == 1 and bus.dropped == 0

            # Now more than the socket buffers and its own buffer can hold.
            pad = "x" * 4000

            async def flood() -> bool:
                for _ in range(50):
                    bus.emit("test.padding", pad=pad)
                return bus.dropped == 1

            await wait_for(flood, timeout_s=30, what="the stalled client dropped")
            assert bus.subscribers == 0
            # Its connection is cut: what it had not read is all it will ever get.
            assert await asyncio.to_thread(read_to_end, sock, 10.0)
        finally:
            sock.close()

        # The broker goes on: a job, and a new follower gets its snapshot and the job's events.
        follower = await follow(s, server)
        await post_ok(s, server.url + "/v1/tts", {"text": "again"})
        await wait_for(lambda: "job.finished" in follower.types(), what="job.finished")
        await follower.aclose()
        status = server.broker.status()
        assert status.events.dropped_clients == 1


async def test_the_stream_needs_the_token_like_any_data(cluster: SimCluster) -> None:
    config = sim_registry(cluster, auth={"token": "s3cret"})
    async with running_broker(config) as server, aiohttp.ClientSession() as s:
        async with s.get(server.url + "/v1/events") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
        async with s.get(server.url + "/v1/events?token=s3cret") as resp:
            assert resp.status == 401  # a token in the URL is not accepted: headers only
        follower = await follow(s, server, headers={"Authorization": "Bearer s3cret"})
        assert follower.events[0][0] == "snapshot"
        await follower.aclose()


async def test_a_draining_broker_ends_the_streams(cluster: SimCluster) -> None:
    async with running_broker(sim_registry(cluster)) as server, aiohttp.ClientSession() as s:
        follower = await follow(s, server)
        await server.broker.drain()
        # The stream ends while the server still runs: its shutdown need not cut it.
        await asyncio.wait_for(follower._task, timeout=10)
        assert follower.response.content.at_eof()


async def test_failed_evictions_loads_and_health_changes_are_events(cluster: SimCluster) -> None:
    data = sim_registry(cluster).model_dump(mode="json", exclude_unset=True)
    # comfyui's "unload" answers 200 and frees nothing; mVoice's load call does not exist.
    data["consumers"]["comfyui"]["unload"] = {"method": "GET", "path": "/system_stats"}
    data["consumers"]["comfyui"]["unload_timeout_s"] = 0.5
    data["consumers"]["mvoice"]["load"] = {"path": "/no-such-load"}
    async with running_broker(Config.model_validate(data)) as server, aiohttp.ClientSession() as s:
        seen: list[Event] = []
        server.broker.events.taps.append(seen.append)
        await post_ok(s, server.url + "/v1/image", {"prompt": GRAPH})
        async with s.post(server.url + "/v1/llm", json={"model": SIM_MODEL}) as resp:
            assert (await resp.json())["error"] == "eviction_failed"
        async with s.post(server.url + "/v1/tts", json={"text": "hi"}) as resp:
            assert (await resp.json())["error"] == "load_failed"
        await cluster.servers["comfyui"].aclose()  # its health probes fail from now on
        await wait_for(lambda: any(e.type == "health.changed" for e in seen), what="health.changed")
    types = [e.type for e in seen]
    failed = next(e.figures for e in seen if e.type == "eviction.failed")
    assert failed["consumer"] == "comfyui" and "not back" in failed["reason"]
    assert types.index("eviction.planned") < types.index("eviction.failed")
    [row] = [r for r in server.broker.history.evictions if r.target == "ollama"]
    assert row.outcome == "failed" and row.victims == ["comfyui"]
    llm = next(
        e.figures for e in seen if e.type == "job.finished" and e.figures["consumer"] == "ollama"
    )
    assert llm["outcome"] == "failed"
    load = next(e.figures for e in seen if e.type == "load.failed")
    assert load["consumer"] == "mvoice" and "404" in load["reason"]
    assert types.index("load.started") < types.index("load.failed")
    health = next(e.figures for e in seen if e.type == "health.changed")
    assert (health["consumer"], health["healthy"]) == ("comfyui", False)
