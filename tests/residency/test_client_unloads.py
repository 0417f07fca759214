"""Unloads by clients are seen at once: a request through the broker that unloads (Ollama's
keep_alive 0, vLLM's /sleep, speaches' DELETE /api/ps/{model}, ComfyUI's /free) re-reads that
consumer right after it answers, so status and events change within half a second, with no
background check in between; and a job right after such an unload never fails because the
card's memory lags the upstream's word."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from conftest import running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.events import Event
from mgpumanager.registry import Config, ConsumerConfig
from mgpumanager.residency.records import State
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.sim.speaches import SpeachesSettings
from mgpumanager.sim.vllm import VLLMSettings
from mgpumanager.upstreams.client_unloads import client_unload, zero_keep_alive

SEEN_WITHIN_S = 0.5


def consumer(kind: str, **more: Any) -> ConsumerConfig:
    return ConsumerConfig.model_validate(
        {"type": kind, "url": "http://127.0.0.1:9", "vram_resident_mib": 1000, **more}
    )


@pytest.mark.parametrize("value", [0, 0.0, "0", "0s", "0m", "0h0m0s", "0.0s"])
def test_keep_alive_zero_in_every_spelling(value: object) -> None:
    assert zero_keep_alive(value)


@pytest.mark.parametrize("value", [None, -1, "5m", "-1", "10", True, False, "0x", [], "30s"])
def test_keep_alive_that_is_not_zero(value: object) -> None:
    assert not zero_keep_alive(value)


def test_which_requests_unload() -> None:
    ollama = consumer("ollama")
    unload = client_unload(ollama, "POST", "/api/generate", {"model": "big", "keep_alive": 0})
    assert unload is not None and unload.model == "big" and not unload.runs
    chat = {"model": "big", "keep_alive": "0s", "messages": [{"role": "user", "content": "x"}]}
    unload = client_unload(ollama, "POST", "/api/chat", chat)
    assert unload is not None and unload.runs  # it runs, then the model goes
    assert client_unload(ollama, "POST", "/api/generate", {"model": "big"}) is None
    assert client_unload(ollama, "POST", "/api/generate", None) is None
    assert client_unload(ollama, "POST", "/api/show", {"model": "big", "keep_alive": 0}) is None
    assert client_unload(consumer("comfyui"), "POST", "/free") is not None
    assert client_unload(consumer("comfyui"), "POST", "/api/free") is not None
    assert client_unload(consumer("comfyui"), "GET", "/free") is None
    assert client_unload(consumer("vllm"), "POST", "/sleep") is not None
    assert client_unload(consumer("vllm"), "POST", "/wake_up") is None
    speaches = client_unload(consumer("speaches"), "DELETE", "/api/ps/Systran/faster-whisper")
    assert speaches is not None and speaches.model == "Systran/faster-whisper"
    generic = consumer("generic", unload={"path": "/api/admin/unload?now=1"})
    assert client_unload(generic, "POST", "/api/admin/unload") is not None
    assert client_unload(generic, "POST", "/api/synthesize") is None


# -- through a broker ------------------------------------------------------------------------

BIG = "big:latest"
EMBED = "embed:latest"


def registry(cluster: SimCluster, **consumers: dict[str, Any]) -> Config:
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {
                "backend": "sim",
                "sim_url": cluster.gpu_url,
                "poll_interval_s": 0.02,
                "reconcile_interval_s": 600,  # no background check: only the request's re-read
            },
            "consumers": consumers,
        }
    )


def ollama(cluster: SimCluster) -> dict[str, Any]:
    return {
        "type": "ollama",
        "url": cluster.urls["ollama"],
        "health": {"interval_s": 0.2, "timeout_s": 2},
        "vram_resident_mib": 14000,
        "unload_timeout_s": 5,
        "gpu_processes": ["ollama"],
    }


def recorder(server: Server) -> list[Event]:
    events: list[Event] = []
    server.broker.events.taps.append(events.append)
    return events


def changed_to(events: list[Event], consumer: str, residency: str) -> bool:
    return any(
        e.type == "residency.changed"
        and e.figures["consumer"] == consumer
        and e.figures["residency"] == residency
        and "by a client" in e.figures["reason"]
        for e in events
    )


async def post(session: aiohttp.ClientSession, url: str, body: Any = None) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def chat(session: aiohttp.ClientSession, server: Server, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    status, answer = await post(session, f"{server.url}/api/chat", body)
    assert status == 200, answer


OLLAMA_SPEC = FakeSpec(
    mvoice=None,
    whisper=None,
    comfyui=None,
    ollama=OllamaSettings(
        models={BIG: 14000, EMBED: 300}, load_s=0, run_s=0, free_delay_s=0.05, chunks=1
    ),
)


@pytest.fixture
async def box() -> AsyncIterator[tuple[SimCluster, Server, aiohttp.ClientSession]]:
    async with await start_cluster(spec=OLLAMA_SPEC) as cluster:
        async with running_broker(registry(cluster, ollama=ollama(cluster))) as server:
            async with aiohttp.ClientSession() as session:
                yield cluster, server, session


@pytest.mark.parametrize("route", ["/api/generate", "/upstream/ollama/api/generate"])
async def test_an_ollama_unload_shows_in_status_and_events_at_once(
    box: tuple[SimCluster, Server, aiohttp.ClientSession], route: str
) -> None:
    _cluster, server, session = box
    await chat(session, server, "big")
    record = server.broker.residency.view.records["ollama"]
    assert record.state is State.RESIDENT
    events = recorder(server)
    status, answer = await post(session, server.url + route, {"model": "big", "keep_alive": 0})
    assert status == 200 and answer["done_reason"] == "unload", answer

    def seen() -> bool:
        doc = server.broker.status().model_dump()["consumers"]["ollama"]
        return doc["residency"] == "unloaded" and changed_to(events, "ollama", "unloaded")

    await wait_for(seen, timeout_s=SEEN_WITHIN_S, what="the unload in status and events")
    assert "unloaded by a client" in record.detail
    assert server.broker.lease.core.stats().completed == 1  # the unload ran no job


async def test_one_model_of_several_unloaded_shows_at_once(
    box: tuple[SimCluster, Server, aiohttp.ClientSession],
) -> None:
    _cluster, server, session = box
    await chat(session, server, "big")
    await post(session, f"{server.url}/api/embed", {"model": "embed", "input": "x"})
    await server.broker.residency.view.reconcile()
    record = server.broker.residency.view.records["ollama"]
    assert set(record.models) == {BIG, EMBED}
    events = recorder(server)
    await post(session, f"{server.url}/api/generate", {"model": "embed", "keep_alive": "0s"})

    def seen() -> bool:
        models = server.broker.status().model_dump()["consumers"]["ollama"]["resident_models"]
        return models == [BIG] and changed_to(events, "ollama", "resident")

    await wait_for(seen, timeout_s=SEEN_WITHIN_S, what="the model's unload in status and events")


def pinned_mvoice(cluster: SimCluster) -> dict[str, Any]:
    return {
        "type": "generic",
        "url": cluster.urls["mvoice"],
        "vram_resident_mib": 9000,
        "pinned": True,
        "gpu_processes": ["mvoice"],
    }


def lagging_spec(free_delay_s: float) -> FakeSpec:
    """A pinned service holds 9000 of 24576 MiB beside Ollama's 14000 MiB model, whose memory
    the card frees `free_delay_s` after Ollama let go: no room to spare while it lags."""
    return FakeSpec(
        mvoice=MVoiceSettings(vram_mib=9000, preload=True, load_s=0, run_s=0, free_delay_s=0),
        whisper=None,
        comfyui=None,
        ollama=OllamaSettings(
            models={BIG: 14000}, load_s=0, run_s=0, free_delay_s=free_delay_s, chunks=1
        ),
    )


async def test_a_job_right_after_an_unload_never_fails() -> None:
    """The unload through the pass-through, then at once a job for the same model: 100 times,
    whether the broker has seen the unload by then or not."""
    async with await start_cluster(spec=lagging_spec(0.03)) as cluster:
        config = registry(cluster, ollama=ollama(cluster), mvoice=pinned_mvoice(cluster))
        async with running_broker(config) as server, aiohttp.ClientSession() as session:
            for _ in range(100):
                body = {"model": "big", "keep_alive": 0}
                status, answer = await post(session, f"{server.url}/api/generate", body)
                assert status == 200, answer
                await chat(session, server, "big")
            assert cluster.gpu.oom_count == 0
            assert server.broker.residency.view.counters.eviction_failures == 0


async def test_memory_that_lags_an_unload_is_waited_for_not_called_outside() -> None:
    """A pinned service holds 9000 of 24576 MiB; Ollama's 14000 MiB model is unloaded by a
    client and the broker has seen it go, but the card frees the memory 0.3 s later. The next
    job for it must wait for that memory, not fail with "held outside the broker"."""
    async with await start_cluster(spec=lagging_spec(0.3)) as cluster:
        config = registry(cluster, ollama=ollama(cluster), mvoice=pinned_mvoice(cluster))
        async with running_broker(config) as server, aiohttp.ClientSession() as session:
            await chat(session, server, "big")
            record = server.broker.residency.view.records["ollama"]
            await post(session, f"{server.url}/api/generate", {"model": "big", "keep_alive": 0})
            await wait_for(
                lambda: record.state is State.UNLOADED, timeout_s=SEEN_WITHIN_S, what="seen"
            )
            assert cluster.gpu.held_by("ollama") == 14000  # the card has not let go yet
            await chat(session, server, "big")  # waits for it; no insufficient_vram
            assert cluster.gpu.oom_count == 0


async def test_vllm_sleep_and_a_speaches_unload_show_at_once() -> None:
    spec = FakeSpec(
        mvoice=None,
        whisper=None,
        comfyui=None,
        ollama=None,
        vllm=VLLMSettings(vram_mib=8000, load_s=0, wake_s=0, run_s=0, chunks=1),
        speaches=SpeachesSettings(load_s=0, run_s=0, free_delay_s=0),
    )
    async with await start_cluster(spec=spec) as cluster:
        config = registry(
            cluster,
            vllm={
                "type": "vllm",
                "url": cluster.urls["vllm"],
                "vram_resident_mib": 8000,
                "gpu_processes": ["vllm"],
            },
            speaches={
                "type": "speaches",
                "url": cluster.urls["speaches"],
                "vram_resident_mib": 2000,
                "gpu_processes": ["speaches"],
            },
        )
        async with running_broker(config) as server, aiohttp.ClientSession() as session:
            residency = server.broker.residency
            await wait_for(
                lambda: residency.view.records["vllm"].state is State.RESIDENT, what="vLLM awake"
            )
            status, answer = await post(session, f"{server.url}/upstream/vllm/sleep?level=1")
            assert status == 200, answer
            await wait_for(
                lambda: residency.view.records["vllm"].state is State.UNLOADED,
                timeout_s=SEEN_WITHIN_S,
                what="vLLM asleep",
            )
            model = "Systran/faster-whisper-small"
            status, answer = await post(session, f"{server.url}/upstream/speaches/api/ps/{model}")
            assert status == 201, answer
            await residency.view.reconcile()
            assert residency.view.records["speaches"].state is State.RESIDENT
            async with session.delete(f"{server.url}/upstream/speaches/api/ps/{model}") as resp:
                assert resp.status == 200, await resp.text()
            await wait_for(
                lambda: residency.view.records["speaches"].state is State.UNLOADED,
                timeout_s=SEEN_WITHIN_S,
                what="speaches' model gone",
            )
