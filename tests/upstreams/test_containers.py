"""The container driver and the Engine API client, against a fake Engine API on a unix socket
(tests/fake_docker.py) and a fake service on a loopback port; no Docker needed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fake_docker import FakeContainer, FakeDocker, serving
from fake_nvml import FakeNvml, proc
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import ConfigError, ConsumerConfig, parse_config
from mgpumanager.sim.server import RunningApp, serve_app
from mgpumanager.upstreams.adapters import ContainerDriver, DockerAdapter, make_adapter
from mgpumanager.upstreams.adapters.ollama import OllamaAdapter
from mgpumanager.upstreams.containers import (
    Container,
    ContainerNames,
    DockerClient,
    NoSuchContainer,
    container_id_of,
    docker_socket,
    missing_containers,
)
from mgpumanager.upstreams.gpu import NvmlReader, measured_mib

CID = "a" * 64


@pytest.fixture
async def docker(tmp_path: Path) -> AsyncIterator[tuple[FakeDocker, str]]:
    fake = FakeDocker()
    async with serving(fake, tmp_path / "docker.sock") as path:
        yield fake, path


class Service:
    """A service that answers /health only while its container runs."""

    def __init__(self, container: FakeContainer) -> None:
        self.container = container
        self.app = web.Application()
        self.app.router.add_get("/health", self._health)
        self.server: RunningApp | None = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, status=200 if self.container.running else 503)


async def adapter_for(
    session: aiohttp.ClientSession, url: str, socket_path: str, **keys: Any
) -> ContainerDriver:
    config = ConsumerConfig.model_validate(
        {"type": "docker", "url": url, "vram_resident_mib": 1000, "container": "whisper", **keys}
    )
    adapter = make_adapter("whisper", config, session)
    assert isinstance(adapter, DockerAdapter)
    adapter.docker = DockerClient(socket_path)
    return adapter


async def test_stop_to_unload_start_to_load(docker: tuple[FakeDocker, str]) -> None:
    fake, path = docker
    container = fake.add(FakeContainer("whisper"))
    service = Service(container)
    server = await serve_app(service.app, port=0)
    try:
        async with aiohttp.ClientSession() as session:
            adapter = await adapter_for(session, server.url, path, stop_timeout_s=7)
            assert adapter.has_load and adapter.can_unload and adapter.stops_process
            assert (await adapter.residency()).resident is True
            assert (await adapter.health()).ok
            await adapter.unload()
            assert fake.calls == ["stop whisper t=7"]
            assert await adapter.unloaded()
            report = await adapter.residency()
            assert report.resident is False and "stopped" in report.detail
            health = await adapter.health()
            # Stopped is not failing: nothing listens, as when the broker stops it.
            assert not health.ok and health.refused and health.detail.startswith("stopped")
            await adapter.load()
            assert fake.calls[-1] == "start whisper"
            assert (await adapter.health()).ok
    finally:
        await server.aclose()


async def test_load_waits_until_the_service_answers(docker: tuple[FakeDocker, str]) -> None:
    fake, path = docker
    container = fake.add(FakeContainer("whisper", running=False))
    ready = asyncio.Event()
    app = web.Application()

    async def health(request: web.Request) -> web.Response:
        return web.json_response({}, status=200 if ready.is_set() else 503)

    app.router.add_get("/health", health)

    async def started(c: FakeContainer) -> None:
        asyncio.get_running_loop().call_later(0.3, ready.set)

    fake.on_start = started
    server = await serve_app(app, port=0)
    try:
        async with aiohttp.ClientSession() as session:
            adapter = await adapter_for(session, server.url, path)
            await asyncio.wait_for(adapter.load(), 5)
            assert ready.is_set() and container.running
    finally:
        await server.aclose()


async def test_a_container_that_exits_while_starting_fails_the_load(
    docker: tuple[FakeDocker, str],
) -> None:
    fake, path = docker
    container = fake.add(FakeContainer("whisper", running=False, exit_code=137))

    async def crashes(c: FakeContainer) -> None:
        c.running = False

    fake.on_start = crashes
    async with aiohttp.ClientSession() as session:
        adapter = await adapter_for(session, "http://127.0.0.1:9", path)
        with pytest.raises(BrokerError) as caught:
            await asyncio.wait_for(adapter.load(), 5)
    assert caught.value.code is ErrorCode.LOAD_FAILED
    assert "exited while starting" in caught.value.message
    assert "137" in caught.value.message
    assert not container.running


async def test_no_docker_fails_the_unload_and_the_probe(tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        adapter = await adapter_for(session, "http://127.0.0.1:9", str(tmp_path / "none.sock"))
        health = await adapter.health()
        assert not health.ok and not health.refused and "not reachable" in health.detail
        with pytest.raises(BrokerError) as caught:
            await adapter.unload()
    assert caught.value.code is ErrorCode.EVICTION_FAILED


async def test_any_type_with_a_container_gets_the_driver(docker: tuple[FakeDocker, str]) -> None:
    fake, path = docker
    fake.add(FakeContainer("ollama", running=False))
    config = ConsumerConfig.model_validate(
        {
            "type": "ollama",
            "url": "http://127.0.0.1:9",
            "vram_resident_mib": 1000,
            "container": "ollama",
        }
    )
    async with aiohttp.ClientSession() as session:
        adapter = make_adapter("ollama", config, session)
        assert isinstance(adapter, ContainerDriver) and isinstance(adapter, OllamaAdapter)
        assert adapter.per_model  # its models are still evicted one by one through its API
        adapter.docker = DockerClient(path)
        report = await adapter.residency()
    assert report.resident is False and report.models == {}
    assert config.gpu_processes == ["[container:ollama]"]


async def test_the_client_reads_what_init_shows(docker: tuple[FakeDocker, str]) -> None:
    fake, path = docker
    fake.add(FakeContainer("ollama", host_network=False, ports=[11434]))
    fake.add(FakeContainer("webui", gpu=False, host_network=False, ports=[3000]))
    fake.add(FakeContainer("old", running=False))
    client = DockerClient(path)
    found = sorted(await client.running(), key=lambda c: c.name)
    assert [(c.name, c.ports, c.gpu, c.host_network) for c in found] == [
        ("ollama", (11434,), True, False),
        ("webui", (3000,), False, False),
    ]
    with pytest.raises(NoSuchContainer):
        await client.inspect("nope")


def test_inspect_fields() -> None:
    c = Container.from_inspect(
        {
            "Id": CID,
            "Name": "/comfyui",
            "Config": {"Image": "comfy:1", "Env": ["NVIDIA_VISIBLE_DEVICES=all"]},
            "State": {"Status": "exited", "ExitCode": 0},
            "HostConfig": {"NetworkMode": "bridge", "Runtime": "runc"},
            "NetworkSettings": {"Ports": {"8188/tcp": [{"HostPort": "8188"}], "53/udp": None}},
        }
    )
    assert (c.name, c.image, c.running, c.ports, c.gpu) == (
        "comfyui",
        "comfy:1",
        False,
        (8188,),
        True,
    )


def test_the_socket_follows_docker_host() -> None:
    assert docker_socket({}) == "/var/run/docker.sock"
    assert docker_socket({"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}) == (
        "/run/user/1000/docker.sock"
    )
    assert docker_socket({"DOCKER_HOST": "tcp://10.0.0.1:2375"}) == "/var/run/docker.sock"


# -- processes in containers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "cgroup",
    [
        f"0::/system.slice/docker-{CID}.scope\n",  # cgroup v2, systemd driver
        f"12:memory:/docker/{CID}\n1:name=systemd:/docker/{CID}\n",  # v1, cgroupfs driver
        f"0::/kubepods/besteffort/pod1/cri-containerd-{CID}.scope\n",
    ],
)
def test_the_container_of_a_process(tmp_path: Path, cgroup: str) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(cgroup)
    assert container_id_of(42, tmp_path) == CID


def test_a_host_process_is_in_no_container(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text("0::/system.slice/ollama.service\n")
    assert container_id_of(42, tmp_path) is None
    assert container_id_of(43, tmp_path) is None  # gone


async def test_gpu_processes_are_named_by_their_container(
    tmp_path: Path, docker: tuple[FakeDocker, str]
) -> None:
    fake, path = docker
    container = fake.add(FakeContainer("whisper"))
    proc_root = tmp_path / "proc"
    for pid, cgroup in {100: f"0::/system.slice/docker-{container.id}.scope", 200: "0::/"}.items():
        (proc_root / str(pid)).mkdir(parents=True)
        (proc_root / str(pid) / "cmdline").write_bytes(b"whisper-server\0--port\0" + b"9\0")
        (proc_root / str(pid) / "cgroup").write_text(cgroup + "\n")
    names = ContainerNames(path)
    reader = NvmlReader(
        nvml=FakeNvml(procs=[proc(100, 3000), proc(200, 1000)]),
        proc_root=proc_root,
        containers=names,
    )
    await reader.start()
    try:
        reading = await reader.read()
    finally:
        await reader.aclose()
    by_pid = {p.pid: p.name for p in reading.processes}
    assert by_pid == {
        100: "whisper-server --port 9 [container:whisper]",
        200: "whisper-server --port 9",
    }
    config = ConsumerConfig.model_validate(
        {"type": "docker", "url": "http://x:1", "vram_resident_mib": 1, "container": "whisper"}
    )
    assert measured_mib(reading, config.gpu_processes) == 3000


def test_without_docker_a_container_goes_by_its_short_id(tmp_path: Path) -> None:
    names = ContainerNames(str(tmp_path / "none.sock"))
    assert names.name_of(CID) == CID[:12]


# -- check-config ------------------------------------------------------------------------------


async def test_check_config_refuses_a_missing_container(docker: tuple[FakeDocker, str]) -> None:
    fake, path = docker
    fake.add(FakeContainer("whisper", running=False))
    problems, note = await asyncio.to_thread(
        missing_containers, {"stt": "whisper", "tts": "piper"}, path
    )
    assert note is None
    assert problems == [
        "consumers.tts.container: no container named 'piper' (docker ps -a lists them)"
    ]


def test_check_config_without_docker_only_notes_it(tmp_path: Path) -> None:
    problems, note = missing_containers({"stt": "whisper"}, str(tmp_path / "none.sock"))
    assert problems == [] and note is not None and "not checked" in note


REGISTRY = """\
gpu: {backend: static, total_mib: 24000}
consumers:
  x:
    url: http://127.0.0.1:9
    vram_resident_mib: 1000
"""


@pytest.mark.parametrize(
    ("keys", "path", "message"),
    [
        ("    type: docker\n", "consumers.x.container", "type: docker needs container"),
        ("    stop_timeout_s: 5\n", "consumers.x.stop_timeout_s", "only for a consumer with"),
        ("    type: command\n    container: c\n", "consumers.x.container", "not both"),
        ("    container: c\n    unload: {path: /u}\n", "consumers.x.unload", "not applicable"),
    ],
)
def test_registry_rules_of_containers(keys: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(REGISTRY + keys)
    assert [(p.path, message in p.message) for p in caught.value.problems] == [(path, True)]


def test_a_container_consumer_is_accepted() -> None:
    config = parse_config(REGISTRY + "    type: docker\n    container: c\n    stop_timeout_s: 3\n")
    c = config.consumers["x"]
    assert (c.container, c.stop_timeout_s, c.gpu_processes) == ("c", 3, ["[container:c]"])
