"""`discover`: each fake told apart by its answers (never its port), unknown services reported
as such, and the local side (/proc) read for real where it can be, from a scratch tree where
it cannot."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from conftest import make_config, running_broker
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.server import bind_loopback, serving
from mgpumanager.sim.speaches import SpeachesSettings
from mgpumanager.sim.vllm import VLLMSettings
from mgpumanager.tools.discover import (
    Service,
    ServiceKind,
    Target,
    Unidentified,
    parse_target,
    probe,
    targets_to_probe,
)


def target_of(url: str) -> Target:
    return parse_target(url.removeprefix("http://"))


@pytest.fixture
async def cluster() -> AsyncIterator[SimCluster]:
    spec = FakeSpec.instant(speaches=SpeachesSettings(), vllm=VLLMSettings(load_s=0))
    async with await start_cluster(spec=spec, total_mib=81920) as c:
        yield c


async def test_every_fake_is_identified_by_its_answers(cluster: SimCluster) -> None:
    expected = {
        "mvoice": ServiceKind.MVOICE,
        "ollama": ServiceKind.OLLAMA,
        "comfyui": ServiceKind.COMFYUI,
        "whisper": ServiceKind.WHISPER,
        "speaches": ServiceKind.SPEACHES,
        "vllm": ServiceKind.VLLM,
    }
    async with aiohttp.ClientSession() as session:
        for name, kind in expected.items():
            found = await probe(session, target_of(cluster.urls[name]))
            assert isinstance(found, Service), (name, found)
            assert found.kind is kind, name
            assert found.healthy, (name, found.health_detail)


async def test_models_and_residency_as_the_services_tell_them(cluster: SimCluster) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            cluster.urls["ollama"] + "/api/generate",
            json={"model": "llama3.1:8b", "prompt": "hi", "stream": False},
        ) as resp:
            assert resp.status == 200
        async with session.post(
            cluster.urls["speaches"] + "/api/ps/Systran/faster-whisper-small"
        ) as resp:
            assert resp.status == 201
        ollama = await probe(session, target_of(cluster.urls["ollama"]))
        speaches = await probe(session, target_of(cluster.urls["speaches"]))
        vllm = await probe(session, target_of(cluster.urls["vllm"]))
        comfyui = await probe(session, target_of(cluster.urls["comfyui"]))
    assert isinstance(ollama, Service) and ollama.version == "0.12.6"
    models = {m.name: m for m in ollama.models}
    assert set(models) == {"llama3.1:8b", "qwen2.5:14b"}
    assert models["llama3.1:8b"].loaded and models["llama3.1:8b"].vram_mib == 6200
    assert not models["qwen2.5:14b"].loaded
    assert models["qwen2.5:14b"].disk_mib == -(-int(10400 * 1024 * 1024 * 0.85) // 2**20)
    assert isinstance(speaches, Service) and speaches.loaded
    assert {m.name: m.loaded for m in speaches.models} == {
        "Systran/faster-whisper-small": True,
        "speaches-ai/Kokoro-82M-v1.0-ONNX": False,
    }
    assert isinstance(vllm, Service) and vllm.sleep_mode and vllm.loaded
    assert [m.name for m in vllm.models] == ["Qwen/Qwen2.5-7B-Instruct"]
    # ComfyUI has run nothing: it says so (no torch memory), so it is not loaded.
    assert isinstance(comfyui, Service) and comfyui.loaded is False


def answering(path: str, body: object) -> web.Application:
    async def handler(_: web.Request) -> web.Response:
        if isinstance(body, str):
            return web.Response(text=body)
        return web.json_response(body)

    app = web.Application()
    app.router.add_get(path, handler)
    return app


async def test_unknown_services_are_reported_not_guessed() -> None:
    plain = answering("/", "hello")
    openai_like = answering("/v1/models", {"data": [{"id": "x"}]})
    # Ollama's /api/version alone is not Ollama: /api/tags must answer too.
    half_ollama = answering("/api/version", {"version": "1"})
    async with serving(plain) as a, serving(openai_like) as b, serving(half_ollama) as c:
        async with aiohttp.ClientSession() as session:
            found = [await probe(session, target_of(s.url)) for s in (a, b, c)]
    assert all(isinstance(f, Unidentified) for f in found), found
    details = [f.detail for f in found if isinstance(f, Unidentified)]
    assert "GET / answered 200" in details[0]
    assert "OpenAI-compatible" in details[1] and "openai: true" in details[1]
    assert "like none of" in details[2]


async def test_a_port_that_does_not_speak_http_is_reported() -> None:
    async def garbage(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await w.drain()
        w.close()

    sock = bind_loopback()
    server = await asyncio.start_server(garbage, sock=sock)
    try:
        async with aiohttp.ClientSession() as session:
            found = await probe(session, Target("127.0.0.1", sock.getsockname()[1]))
    finally:
        server.close()
        await server.wait_closed()
    assert isinstance(found, Unidentified) and "does not answer HTTP" in found.detail


async def test_nothing_listening_is_none() -> None:
    # A socket bound but not listening holds its port: connections to it are refused.
    with socket.socket() as quiet:
        quiet.bind(("127.0.0.1", 0))
        async with aiohttp.ClientSession() as session:
            assert await probe(session, Target("127.0.0.1", quiet.getsockname()[1])) is None


async def test_a_real_whisper_server_page_and_a_broker_are_told_apart() -> None:
    page = web.Application()
    html = "<html><head><title>Whisper.cpp Server</title></head></html>"

    async def root(_: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html", headers={"Server": "x"})

    page.router.add_get("/", root)
    broker_config = make_config({})
    async with serving(page) as whisper, running_broker(broker_config) as broker:
        async with aiohttp.ClientSession() as session:
            w = await probe(session, target_of(whisper.url))
            b = await probe(session, target_of(broker.url))
    assert isinstance(w, Service) and w.kind is ServiceKind.WHISPER
    # The broker answers Ollama's API too; it is still recognised as a broker.
    assert isinstance(b, Service) and b.kind is ServiceKind.BROKER


def test_parse_target() -> None:
    assert parse_target("11434") == Target("127.0.0.1", 11434, scanned=True)
    assert parse_target("gpu-box:8188") == Target("gpu-box", 8188, scanned=True)
    assert parse_target("[::1]:8000").url == "http://[::1]:8000"
    for bad in ("nope", "host:", ":80", "host:0", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_target(bad)


def test_targets_to_probe_puts_the_scan_list_first_and_each_address_once() -> None:
    scan = [parse_target("127.0.0.1:11434"), parse_target("10.0.0.2:9000")]
    targets = targets_to_probe(scan, usual=(11434, 8188))
    assert [t.address for t in targets] == ["10.0.0.2:9000", "127.0.0.1:11434", "127.0.0.1:8188"]
    assert [t.scanned for t in targets] == [True, True, False]


async def test_vllm_without_sleep_mode_is_still_vllm() -> None:
    models = {"data": [{"id": "m", "object": "model", "owned_by": "vllm"}], "object": "list"}
    async with serving(answering("/v1/models", models)) as server:
        async with aiohttp.ClientSession() as session:
            found = await probe(session, target_of(server.url))
    assert isinstance(found, Service) and found.kind is ServiceKind.VLLM
    assert found.sleep_mode is False and found.loaded is True
