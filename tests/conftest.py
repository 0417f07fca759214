"""Shared fixtures: real loopback servers on port 0, a broker in front of them, polling with a
deadline instead of sleeping."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from mgpumanager.broker import Broker
from mgpumanager.clock import FakeClock
from mgpumanager.daemon import Server, start_server
from mgpumanager.registry import Config, SchedulerConfig
from mgpumanager.scheduling.core import ConsumerPolicy, Outcome, SchedulerCore
from mgpumanager.sim.cluster import FakeSpec, SimCluster
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.sim.server import RunningApp, serve_app, wait_until

# The suite never talks to a Docker daemon that happens to run on the box: only the container
# tests (tests/docker, `make test-docker`) do, and they say so with MGPU_DOCKER_TESTS=1.
collect_ignore: list[str] = []
if not os.environ.get("MGPU_DOCKER_TESTS"):
    os.environ["DOCKER_HOST"] = "unix:///nonexistent/mgpumanager-tests/docker.sock"
    collect_ignore.append("docker")
# The cluster on a real local Ray cluster needs the `ray` extra and a few GiB: `make test-ray`.
if not os.environ.get("MGPU_RAY_TESTS"):
    collect_ignore.append("cluster_ray")

# The one poll-until helper, under the name the tests import from here.
wait_for = wait_until


# -- no test takes a fixed port ------------------------------------------------------------
# A broker or a `make demo` may run on the box while the suite does: a test that bound the
# broker's default port or one of the demo's would fail beside it, or stop it from starting.
# Every test binds port 0; a bind to a fixed port fails the test that made it.
BROKER_PORT = 8770
DEMO_PORTS = frozenset({8799, 8801, 8802, 8803, 8804, 8805})  # the demo registry's gpu and fakes
FIXED_PORTS = frozenset({BROKER_PORT}) | DEMO_PORTS


@pytest.fixture(autouse=True)
def no_fixed_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Fails a test that binds (or only tries to bind) one of FIXED_PORTS, even where the code
    under test swallows the error. Answers the list of such ports tried, for the guard's test."""
    tried: list[int] = []
    bind = socket.socket.bind

    def guarded(sock: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and len(address) >= 2 and address[1] in FIXED_PORTS:
            tried.append(address[1])
            raise AssertionError(f"a test bound the fixed port {address[1]}: bind port 0")
        bind(sock, address)

    monkeypatch.setattr(socket.socket, "bind", guarded)
    yield tried
    assert not tried, f"a test bound the fixed port(s) {tried}: bind port 0"


class Upstream:
    """A scriptable upstream on a real loopback port: tests add handlers; it records every
    request and how many ran at once."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.requests: list[web.Request] = []
        self.active = 0
        self.max_active = 0
        self.aborted = 0
        self.server: RunningApp | None = None
        self.url = ""
        self.app.router.add_get("/health", self._health)
        self.healthy = True

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, status=200 if self.healthy else 503)

    def route(
        self,
        method: str,
        path: str,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> None:
        async def tracked(request: web.Request) -> web.StreamResponse:
            self.requests.append(request)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                return await handler(request)
            except asyncio.CancelledError:
                self.aborted += 1
                raise
            finally:
                self.active -= 1

        self.app.router.add_route(method, path, tracked)

    async def start(self) -> None:
        self.server = await serve_app(self.app)
        self.url = self.server.url

    async def aclose(self) -> None:
        if self.server is not None:
            await self.server.aclose()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    yield up
    await up.aclose()


def consumer(url: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "url": url,
        "vram_resident_mib": 1000,
        "health": {"path": "/health", "interval_s": 0.05, "timeout_s": 1},
    }
    base.update(extra)
    return base


def make_config(consumers: dict[str, dict[str, Any]], **top: Any) -> Config:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "gpu": {"backend": "static", "total_mib": 24576},
        "routing": {},
        "consumers": consumers,
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Config.model_validate(data)


@asynccontextmanager
async def running_broker(config: Config) -> AsyncIterator[Server]:
    server = await start_server(Broker(config), port=0)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- the scheduler core, on a fake clock ----------------------------------------------------


def core(clock: FakeClock | None = None, policy: str = "fifo", **settings: object) -> SchedulerCore:
    """mvoice (priority 3), ollama (2, two at once) and comfyui (1)."""
    consumers = {
        "mvoice": ConsumerPolicy(priority=3, max_concurrency=1),
        "ollama": ConsumerPolicy(priority=2, max_concurrency=2),
        "comfyui": ConsumerPolicy(priority=1, max_concurrency=1),
    }
    return SchedulerCore(
        SchedulerConfig(policy=policy, **settings),
        consumers,
        clock or FakeClock(),
    )


def grant_one(c: SchedulerCore, **kwargs: object) -> int:
    """The single grant `schedule` makes now; the job is made ready at once."""
    [g] = c.schedule(**kwargs)  # type: ignore[arg-type]
    if g.prepare:
        c.ready(g.job_id)
    return g.job_id


def done(c: SchedulerCore, job: int) -> None:
    c.finish(job, Outcome.COMPLETED)


# -- the simulated box ---------------------------------------------------------------------

SIM_MODEL = "llm:14b"


def sim_spec() -> FakeSpec:
    """The fakes of `sim_registry`, without delays."""
    ollama = OllamaSettings(models={SIM_MODEL: 14000}, chunks=2)
    return FakeSpec.instant(whisper=None, ollama=ollama).with_timing(
        load_s=0, run_s=0, free_delay_s=0
    )


def sim_registry(cluster: SimCluster, **top: Any) -> Config:
    """mvoice (6000 MiB), ollama (14000) and comfyui (12300) on a cluster's simulated 24 GiB:
    ollama and comfyui never fit together."""
    health = {"interval_s": 0.2, "timeout_s": 2}
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
            "routing": {"tts": "mvoice", "llm": "ollama", "image": "comfyui"},
            "consumers": {
                "mvoice": {
                    "url": cluster.urls["mvoice"],
                    "health": {"path": "/health", **health},
                    "vram_resident_mib": 6000,
                    "unload": {"path": "/api/admin/unload"},
                    "load": {"path": "/api/admin/load"},
                    "gpu_processes": ["mvoice"],
                },
                "ollama": {
                    "type": "ollama",
                    "url": cluster.urls["ollama"],
                    "health": {"path": "/api/version", **health},
                    "vram_resident_mib": 14000,
                    "gpu_processes": ["ollama"],
                },
                "comfyui": {
                    "type": "comfyui",
                    "url": cluster.urls["comfyui"],
                    "health": {"path": "/system_stats", **health},
                    "vram_resident_mib": 12300,
                    "gpu_processes": ["comfyui"],
                },
            },
            **top,
        }
    )


async def wait_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str) -> list[str]:
    """A ComfyUI client's loop (Open WebUI's): the socket's text messages until `executing`
    with `node: null` for our prompt, ComfyUI's "done". Answers the event types seen."""
    seen = []
    async for msg in ws:
        if msg.type is not aiohttp.WSMsgType.TEXT:
            continue  # previews are binary
        message = json.loads(msg.data)
        seen.append(message["type"])
        data = message["data"]
        done = message["type"] == "executing" and data["node"] is None
        if done and data["prompt_id"] == prompt_id:
            return seen
    raise AssertionError(f"socket closed before {prompt_id} finished; saw {seen}")


T = TypeVar("T")


def without_wait_frames(parts: list[T]) -> list[T]:
    """An Ollama client's parts without the frames the broker sends while the job waits
    (queued, or its model loading): leading chunks with empty text and `done: false`."""
    for i, part in enumerate(parts):
        message = getattr(part, "message", None)
        text = getattr(part, "response", None) or (message.content if message else None)
        if text or getattr(part, "done", False):
            return parts[i:]
    return []


@asynccontextmanager
async def lease_held(broker: Broker, name: str = "mvoice") -> AsyncIterator[asyncio.Event]:
    """The lease held by a job of `name` until the event yielded is set (or the block ends)."""
    release, held = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with broker.lease.job(name, queue_timeout_s=60, exclusive=True, label="holder"):
            held.set()
            await release.wait()

    task = asyncio.create_task(hold())
    await held.wait()
    try:
        yield release
    finally:
        release.set()
        await task
