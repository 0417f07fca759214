"""Against a real dockerd: fake whisper.cpp servers (mgpumanager's own, `python -m
mgpumanager.sim.whisper`, run from the broker's image) in containers on the host's network,
allocating on a simulated GPU served here. The broker stops one container to make room and
starts the other, with no OOM on the card; a container stopped by someone else is `unloaded`,
not failing, and its next job starts it; `init` finds the containers and proposes them; and the
broker's image serves `mgpumanager demo`, hardened as deploy/compose.yaml runs it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from docker_fixtures import docker, free_port, image, names, unique

from conftest import running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.registry import Config
from mgpumanager.sim.gpu import SimGPU, gpu_app
from mgpumanager.sim.server import RunningApp, serve_app
from mgpumanager.tools.init import run_init

__all__ = ["image", "names"]  # fixtures, used by name

MODEL_MIB = 5000
TOTAL_MIB = 8192  # one model fits, two do not


@pytest.fixture
async def card() -> AsyncIterator[tuple[SimGPU, str]]:
    gpu = SimGPU(TOTAL_MIB)
    server: RunningApp = await serve_app(gpu_app(gpu), host="127.0.0.1", port=0)
    try:
        yield gpu, server.url
    finally:
        await server.aclose()


def whisper_container(image: str, name: str, port: int, ledger: str, owner: str) -> None:
    """Created, not started: the broker starts it when a job needs it."""
    docker(
        "create",
        "--name", name,
        "--network", "host",
        "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        image,
        "python3", "-m", "mgpumanager.sim.whisper",
        "--host", "127.0.0.1", "--port", str(port), "--ledger", ledger,
        "--owner", owner, "--model-mib", str(MODEL_MIB),
        "--load-s", "0.3", "--run-s", "0.05", "--free-delay-s", "0.5",
    )  # fmt: skip


def registry(ledger: str, containers: dict[str, tuple[str, int]]) -> Config:
    return Config.model_validate(
        {
            "gpu": {"backend": "sim", "sim_url": ledger, "safety_margin_mib": 256},
            "routing": {"stt": next(iter(containers))},
            "consumers": {
                name: {
                    "type": "docker",
                    "container": container,
                    "stop_timeout_s": 5,
                    "url": f"http://127.0.0.1:{port}",
                    "health": {"path": "/health", "interval_s": 0.5},
                    "paths": {"stt": {"path": "/inference"}},
                    "vram_resident_mib": MODEL_MIB,
                    "load_timeout_s": 60,
                    "unload_timeout_s": 30,
                    "gpu_processes": [name],  # the ledger's owner names
                }
                for name, (container, port) in containers.items()
            },
        }
    )


async def transcribe(session: aiohttp.ClientSession, server: Server, name: str) -> str:
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF....WAVE", filename="a.wav", content_type="audio/wav")
    async with session.post(f"{server.url}/upstream/{name}/inference", data=form) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        return text


async def consumer_status(session: aiohttp.ClientSession, server: Server, name: str) -> Any:
    async with session.get(f"{server.url}/v1/status") as resp:
        return (await resp.json())["consumers"][name]


def running(name: str) -> bool:
    return docker("inspect", "-f", "{{.State.Running}}", name) == "true"


@pytest.mark.timeout(150)
async def test_the_broker_stops_and_starts_containers_to_make_room(
    image: str, names: list[str], card: tuple[SimGPU, str]
) -> None:
    gpu, ledger = card
    port = free_port(2)
    containers = {"stt-a": (unique("stt-a"), port), "stt-b": (unique("stt-b"), port + 1)}
    for consumer, (container, p) in containers.items():
        names.append(container)
        whisper_container(image, container, p, ledger, consumer)
    config = registry(ledger, containers)
    async with running_broker(config) as server, aiohttp.ClientSession() as session:
        # Both stopped: both unloaded, neither failing.
        for consumer in containers:
            status = await consumer_status(session, server, consumer)
            assert status["residency"] == "unloaded", status
        order = ["stt-a", "stt-b", "stt-a", "stt-b"]
        for consumer in order:
            await transcribe(session, server, consumer)
            other = "stt-b" if consumer == "stt-a" else "stt-a"
            assert running(containers[consumer][0])
            assert not running(containers[other][0])  # stopped to make room
            assert gpu.held_by(consumer) == MODEL_MIB and gpu.held_by(other) == 0
        assert gpu.oom_count == 0
        async with session.get(f"{server.url}/v1/status") as resp:
            scheduler = (await resp.json())["scheduler"]
        assert scheduler["evictions"] >= len(order) - 1, scheduler
        assert scheduler["eviction_failures"] == 0 and scheduler["load_failures"] == 0

        # Someone else stops the running one: it is unloaded, not failing, and its next job
        # starts it again.
        last = containers[order[-1]][0]
        docker("stop", "-t", "5", last)

        async def stopped_seen() -> bool:
            status = await consumer_status(session, server, order[-1])
            return bool(status["residency"] == "unloaded")

        await wait_for(stopped_seen, timeout_s=20, what="the broker to see the stop")
        status = await consumer_status(session, server, order[-1])
        assert status["health_detail"].startswith("stopped"), status
        assert status["health_state"] == "stopped", status  # not failing
        await transcribe(session, server, order[-1])
        assert running(last)
        assert gpu.oom_count == 0


@pytest.mark.timeout(120)
async def test_init_finds_the_containers_and_proposes_them(
    image: str, names: list[str], card: tuple[SimGPU, str], tmp_path: Path
) -> None:
    _, ledger = card
    port = free_port()
    container = unique("whisper")
    names.append(container)
    whisper_container(image, container, port, ledger, "whisper-server")
    docker("start", container)

    async def serving() -> bool:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/health") as resp,
            ):
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(serving, timeout_s=60, what="the whisper container to serve")
    out = tmp_path / "consumers.yaml"
    # No --scan: init finds the port from the container's own listening socket.
    _, report = await run_init(out=out, gpu_sim=ledger, usual_ports=())
    written = yaml.safe_load(out.read_text())["consumers"]
    [consumer] = written.values()
    assert consumer["type"] == "docker", json.dumps(consumer)
    assert consumer["container"] == container
    assert consumer["url"] == f"http://127.0.0.1:{port}"
    assert container in report and "host network" in report, report


@pytest.mark.timeout(150)
async def test_the_image_serves_the_demo(image: str, names: list[str]) -> None:
    port = free_port(36)  # the demo's fakes listen on N+29..N+35
    name = unique("demo")
    names.append(name)
    docker(
        "run", "-d", "--name", name, "--network", "host",
        # As deploy/compose.yaml runs it.
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        "-e", f"MGPU_HEALTH_URL=http://127.0.0.1:{port}/healthz",
        "--health-interval", "1s", "--health-start-period", "60s",
        image, "mgpumanager", "demo", "--port", str(port),
    )  # fmt: skip
    status: dict[str, Any] = {}

    async def answers() -> bool:
        nonlocal status
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/v1/status") as resp,
            ):
                status = await resp.json() if resp.status == 200 else {}
        except aiohttp.ClientError:
            return False
        return bool(status)

    try:
        await wait_for(answers, timeout_s=45, what="the demo in the image to answer")
    except TimeoutError:
        raise AssertionError(docker("logs", name, check=False)) from None
    assert status["gpu"]["backend"] == "sim"
    assert set(status["consumers"]) == {"mvoice", "ollama", "comfyui", "whisper", "speaches"}
    # The image's HEALTHCHECK (GET /healthz) passes; its user is not root.
    await wait_for(
        lambda: docker("inspect", "-f", "{{.State.Health.Status}}", name) == "healthy",
        timeout_s=45,
        what="the image's healthcheck",
    )
    assert docker("exec", name, "id", "-u") == "10001"
    docker("stop", "-t", "20", name)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", name) == "0"
