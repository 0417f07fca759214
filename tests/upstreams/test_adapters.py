"""Each protocol adapter against its fake on loopback (mgpumanager.sim): what it reports as
resident, how it unloads and knows the upstream let go, how it loads, when a job is really over,
how a job is cancelled, and work posted around the broker. Adapters are driven directly where
that is clearest, and through a running broker where the behaviour is about jobs and the lease.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from conftest import running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import Config, ConsumerConfig
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings, FakeComfyUI
from mgpumanager.sim.gpu import LocalLedger
from mgpumanager.sim.mvoice import FakeMVoice, MVoiceSettings
from mgpumanager.sim.ollama import FakeOllama, OllamaSettings
from mgpumanager.sim.server import serve_app
from mgpumanager.sim.speaches import FakeSpeaches, SpeachesSettings
from mgpumanager.sim.vllm import FakeVLLM, VLLMSettings
from mgpumanager.sim.whisper import WhisperSettings
from mgpumanager.upstreams.adapters import (
    BaseAdapter,
    ComfyUIAdapter,
    CommandAdapter,
    OllamaAdapter,
    SpeachesAdapter,
    make_adapter,
)

LLM = "llm:8b"
STT = "Systran/faster-whisper-small"
VLLM_MODEL = "Qwen/Qwen2.5-7B-Instruct"
GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 7}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}
NOTHING = FakeSpec(mvoice=None, ollama=None, comfyui=None, whisper=None)
HEALTH = {"interval_s": 0.05, "timeout_s": 2}


def only(**fakes: Any) -> FakeSpec:
    """A cluster spec with just the named fakes."""
    return dataclasses.replace(NOTHING, **fakes)


def ollama_settings(**timing: Any) -> OllamaSettings:
    base = {"models": {LLM: 6000}, "load_s": 0, "run_s": 0, "free_delay_s": 0, "chunks": 3}
    return OllamaSettings(**{**base, **timing})


def comfyui_settings(**timing: Any) -> ComfyUISettings:
    base = {"model_mib": 12000, "ctx_mib": 300, "load_s": 0, "run_s": 0, "free_delay_s": 0}
    return ComfyUISettings(**{**base, **timing})


def consumer_config(kind: str, url: str, **extra: Any) -> ConsumerConfig:
    return ConsumerConfig.model_validate(
        {"type": kind, "url": url, "vram_resident_mib": 1000, **extra}
    )


@asynccontextmanager
async def adapter(name: str, config: ConsumerConfig) -> AsyncIterator[BaseAdapter]:
    async with aiohttp.ClientSession() as session:
        yield make_adapter(name, config, session)


def broker_config(
    cluster: SimCluster, consumers: dict[str, dict[str, Any]], routing: dict[str, str]
) -> Config:
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
            "routing": routing,
            "consumers": consumers,
        }
    )


def ollama_consumer(cluster: SimCluster, **extra: Any) -> dict[str, Any]:
    return {
        "type": "ollama",
        "url": cluster.urls["ollama"],
        "health": {"path": "/api/version", **HEALTH},
        "vram_resident_mib": 14000,
        "gpu_processes": ["ollama"],
        **extra,
    }


def comfyui_consumer(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "comfyui",
        "url": url,
        "health": {"path": "/system_stats", **HEALTH},
        "vram_resident_mib": 12300,
        "gpu_processes": ["comfyui"],
        **extra,
    }


def requests_to(fake: Any, method: str, path: str) -> list[str]:
    """Query strings of the requests `fake` received for `method path`."""
    return [r.query_string for r in fake.received if (r.method, r.path) == (method, path)]


async def post_json(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json()


# -- generic (mVoice) --------------------------------------------------------------------------


async def test_generic_adapter_runs_the_registry_calls_and_leaves_residency_to_the_gpu() -> None:
    spec = only(mvoice=MVoiceSettings(load_s=0, run_s=0, free_delay_s=0))
    async with await start_cluster(spec=spec) as cluster:
        fake = cast(FakeMVoice, cluster.fakes["mvoice"])
        config = consumer_config(
            "generic",
            cluster.urls["mvoice"],
            unload={"path": "/api/admin/unload"},
            load={"path": "/api/admin/load"},
        )
        async with adapter("mvoice", config) as a:
            assert (await a.health()).ok
            assert (await a.residency()).resident is None  # it cannot tell: the GPU decides
            assert a.has_load
            await a.load()
            assert fake.loaded
            await a.unload()
            assert await a.unloaded()
            assert not fake.loaded


async def test_a_kind_the_consumer_has_no_path_for_is_an_envelope_not_a_crash() -> None:
    config = consumer_config("generic", "http://127.0.0.1:9")
    async with adapter("mvoice", config) as a:
        with pytest.raises(BrokerError) as caught:
            a.path_for("video")
    assert caught.value.code is ErrorCode.NO_CONSUMER


# -- Ollama ------------------------------------------------------------------------------------


async def test_ollama_residency_follows_api_ps_and_load_names_each_model() -> None:
    async with await start_cluster(spec=only(ollama=ollama_settings())) as cluster:
        fake = cast(FakeOllama, cluster.fakes["ollama"])
        url = cluster.urls["ollama"]
        async with adapter("ollama", consumer_config("ollama", url)) as lazy:
            assert not lazy.has_load  # no models named: the first job loads it
            assert (await lazy.health()).ok  # /api/version by default
            report = await lazy.residency()
            assert report.resident is False and not report.busy
        async with adapter("ollama", consumer_config("ollama", url, models=[LLM])) as a:
            assert a.has_load
            await a.load()
            assert fake.resident_models() == [LLM]
            report = await a.residency()
            assert report.resident is True and report.detail == LLM


async def test_ollama_unload_is_answered_before_the_model_is_gone() -> None:
    """keep_alive 0 answers at once; with a request in flight the model stays in /api/ps until
    it finished, and its memory comes back after that: `unloaded` waits for /api/ps, and the
    GPU reading (residency.py) for the memory."""
    settings = ollama_settings(run_s=0.3, free_delay_s=0.3)
    async with await start_cluster(spec=only(ollama=settings)) as cluster:
        fake = cast(FakeOllama, cluster.fakes["ollama"])
        url = cluster.urls["ollama"]
        async with adapter("ollama", consumer_config("ollama", url)) as a:
            session = cast(OllamaAdapter, a).session
            body = {"model": LLM, "prompt": "a long answer"}
            async with session.post(f"{url}/api/generate", json=body) as resp:
                assert json.loads(await resp.content.readline())["done"] is False
                await a.unload()  # answered while the request still runs
                assert fake.unload_count == 0
                assert not await a.unloaded()
                assert (await a.residency()).resident is True
                lines = (await resp.read()).splitlines()
            assert json.loads(lines[-1])["done_reason"] == "stop"  # not cut short
            await wait_for(a.unloaded, what="/api/ps empty")
            # /api/ps is empty but the memory is not back yet: only the GPU can confirm.
            assert cluster.gpu.held_by("ollama") == 6000
            await wait_for(lambda: cluster.gpu.held_by("ollama") == 0, what="memory back")
            assert fake.unload_count == 1 and fake.aborted_requests == 0


async def test_ollama_eviction_through_the_broker_waits_for_api_ps_and_the_memory() -> None:
    settings = ollama_settings(free_delay_s=0.2)
    async with await start_cluster(spec=only(ollama=settings)) as cluster:
        config = broker_config(cluster, {"ollama": ollama_consumer(cluster)}, {"llm": "ollama"})
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            body = {"model": LLM, "prompt": "hi", "stream": False}
            status, answer = await post_json(http, f"{server.url}/v1/llm", body)
            assert status == 200 and answer["done"] is True
            assert cluster.gpu.held_by("ollama") == 6000
            url = f"{server.url}/v1/admin/consumers/ollama/unload"
            status, answer = await post_json(http, url, None)
            assert (status, answer["residency"]) == (200, "unloaded")
            assert cluster.gpu.held_by("ollama") == 0  # confirmed, not just asked
            assert server.broker.residency.view.counters.evictions == 1


async def test_ollama_client_disconnect_aborts_the_upstream_request() -> None:
    settings = ollama_settings(run_s=20, chunks=200)  # would stream for 20 s
    async with await start_cluster(spec=only(ollama=settings)) as cluster:
        fake = cast(FakeOllama, cluster.fakes["ollama"])
        config = broker_config(cluster, {"ollama": ollama_consumer(cluster)}, {"llm": "ollama"})
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            body = {"model": LLM, "prompt": "tell me everything"}
            resp = await http.post(f"{server.url}/v1/llm", json=body)
            assert json.loads(await resp.content.readline())["done"] is False
            assert fake.active_requests == 1
            resp.close()  # the client goes away mid-answer
            await wait_for(lambda: fake.aborted_requests == 1, what="upstream aborted")
            await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="slot freed")
            assert fake.active_requests == 0 and fake.completed_requests == 0
            assert server.broker.lease.core.stats().cancelled == 1


# -- ComfyUI -----------------------------------------------------------------------------------


@asynccontextmanager
async def comfyui_box(
    settings: ComfyUISettings, *, websocket: bool = True
) -> AsyncIterator[tuple[SimCluster, FakeComfyUI, str]]:
    """A simulated GPU and a ComfyUI fake; websocket=False puts it behind something that
    refuses the upgrade (a reverse proxy without websocket support, say)."""
    async with await start_cluster(spec=NOTHING) as cluster:
        fake = FakeComfyUI(settings, ledger=LocalLedger(cluster.gpu), activity=cluster.activity)
        if not websocket:

            @web.middleware
            async def refuse_ws(request: web.Request, handler: Any) -> web.StreamResponse:
                if request.path == "/ws":
                    return web.Response(status=404)
                return cast(web.StreamResponse, await handler(request))

            fake.app.middlewares.append(refuse_ws)
        server = await serve_app(fake.app)
        try:
            yield cluster, fake, server.url
        finally:
            await server.aclose()


def comfy_adapter(server: Server) -> ComfyUIAdapter:
    return cast(ComfyUIAdapter, server.broker.adapters["comfyui"])


async def post_image(http: aiohttp.ClientSession, server: Server, **extra: Any) -> str:
    status, answer = await post_json(http, f"{server.url}/v1/image", {"prompt": GRAPH, **extra})
    assert status == 200, answer
    return str(answer["prompt_id"])


async def test_comfyui_job_holds_the_lease_until_the_websocket_says_the_prompt_ended() -> None:
    async with comfyui_box(comfyui_settings(run_s=0.3)) as (cluster, fake, url):
        config = broker_config(cluster, {"comfyui": comfyui_consumer(url)}, {"image": "comfyui"})
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            comfy = comfy_adapter(server)
            # One /history look at the start, then the socket must end it (its end event may
            # make the adapter look once more, at once).
            comfy.history_poll_s = 60
            pid = await post_image(http, server)
            # /prompt has answered; the prompt runs on and still holds the lease.
            assert server.broker.lease.core.in_flight == 1
            assert pid not in fake.history
            assert (await comfy.residency()).busy is False  # our own prompt is not outside work
            await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="released")
            # Released only once ComfyUI had taken it off its queue and written its history.
            assert fake.running is None and not fake.queue
            assert fake.history[pid]["status"]["status_str"] == "success"
            assert requests_to(fake, "GET", f"/history/{pid}") in ([""], ["", ""])
            [query] = requests_to(fake, "GET", "/ws")
            assert query.startswith("clientId=mgpumanager-")
            assert not comfy.ours
            assert server.broker.lease.core.stats().completed == 1


@pytest.mark.parametrize("prompt_id", ["../free", "a/b", "..", "x" * 129, "id with space"])
async def test_comfyui_refuses_a_prompt_id_that_could_leave_its_urls(prompt_id: str) -> None:
    """The id goes into /history/{id}: "../free" would make the broker poll another route and
    hold the lease until run_timeout_s. Refused before anything reaches ComfyUI."""
    async with comfyui_box(comfyui_settings()) as (cluster, fake, url):
        config = broker_config(cluster, {"comfyui": comfyui_consumer(url)}, {"image": "comfyui"})
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            body = {"prompt": GRAPH, "prompt_id": prompt_id}
            status, answer = await post_json(http, f"{server.url}/v1/image", body)
            assert (status, answer["error"]) == (400, "bad_request"), answer
            assert "prompt_id" in answer["message"]
            assert requests_to(fake, "POST", "/prompt") == []
            assert server.broker.lease.core.in_flight == 0


@pytest.mark.parametrize("failure", ["refused", "dropped"])
async def test_comfyui_follows_history_when_the_websocket_fails(failure: str) -> None:
    settings = comfyui_settings(run_s=0.3)
    async with comfyui_box(settings, websocket=failure != "refused") as (cluster, fake, url):
        config = broker_config(cluster, {"comfyui": comfyui_consumer(url)}, {"image": "comfyui"})
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            comfy_adapter(server).history_poll_s = 0.02
            pid = await post_image(http, server)
            if failure == "dropped":  # connected, then ComfyUI closes it mid-prompt
                await wait_for(lambda: bool(fake.sockets), what="broker socket")
                for group in list(fake.sockets.values()):
                    for ws in list(group):
                        await ws.close()
            else:
                assert not fake.sockets
            assert server.broker.lease.core.in_flight == 1
            await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="released")
            assert fake.history[pid]["status"]["status_str"] == "success"
            assert fake.running is None
            assert len(requests_to(fake, "GET", f"/history/{pid}")) > 1


async def test_comfyui_does_not_take_over_the_callers_websocket() -> None:
    """A caller that posts with its own client_id listens on its own socket under that id;
    real ComfyUI keeps one socket per id, so the broker must not connect under it."""
    async with comfyui_box(comfyui_settings(run_s=0.1)) as (cluster, fake, url):
        config = broker_config(cluster, {"comfyui": comfyui_consumer(url)}, {"image": "comfyui"})
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            comfy_adapter(server).history_poll_s = 0.02
            async with http.ws_connect(f"{url}/ws", params={"clientId": "mine"}) as mine:
                pid = await post_image(http, server, client_id="mine")
                async with asyncio.timeout(10):
                    async for msg in mine:
                        data = json.loads(msg.data)
                        if data["type"] == "executing" and data["data"]["node"] is None:
                            assert data["data"]["prompt_id"] == pid
                            break
            assert requests_to(fake, "GET", "/ws") == ["clientId=mine"]
            await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="released")
            assert fake.history[pid]["status"]["status_str"] == "success"


async def test_comfyui_prompt_past_run_timeout_is_interrupted_before_the_lease_goes() -> None:
    # ComfyUI stops an interrupted prompt at the next node boundary: 1 s nodes.
    async with comfyui_box(comfyui_settings(run_s=2)) as (cluster, fake, url):
        consumers = {"comfyui": comfyui_consumer(url, run_timeout_s=0.3)}
        config = broker_config(cluster, consumers, {"image": "comfyui"})
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            comfy_adapter(server).history_poll_s = 0.02
            pid = await post_image(http, server)
            await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="timed out")
            # The lease went only once ComfyUI had stopped it: nothing still runs on the GPU.
            assert fake.running is None and not fake.queue
            status = fake.history[pid]["status"]
            assert status["status_str"] == "error"
            assert "execution_interrupted" in [kind for kind, _ in status["messages"]]
            assert requests_to(fake, "POST", "/interrupt") == [""]
            assert server.broker.lease.core.stats().timed_out == 1


async def test_outside_prompt_makes_comfyui_busy_and_the_planner_will_not_evict_it() -> None:
    spec = only(ollama=ollama_settings(models={LLM: 14000}))
    async with await start_cluster(spec=spec) as cluster:
        fake = FakeComfyUI(
            comfyui_settings(run_s=0.02),
            ledger=LocalLedger(cluster.gpu),
            activity=cluster.activity,
        )
        comfy_server = await serve_app(fake.app)
        try:
            consumers = {
                "ollama": ollama_consumer(cluster),
                "comfyui": comfyui_consumer(comfy_server.url, run_timeout_s=0.5),
            }
            config = broker_config(cluster, consumers, {"llm": "ollama", "image": "comfyui"})
            async with running_broker(config) as server, aiohttp.ClientSession() as http:
                await outside_prompt_scenario(server, http, fake, comfy_server.url)
        finally:
            await comfy_server.aclose()
    assert cluster.gpu.oom_count == 0


async def outside_prompt_scenario(
    server: Server, http: aiohttp.ClientSession, fake: FakeComfyUI, comfy_url: str
) -> None:
    comfy = comfy_adapter(server)
    comfy.history_poll_s = 0.02
    await post_image(http, server)  # through the broker: comfyui becomes resident
    await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="first image")
    assert (await comfy.residency()).busy is False

    # Someone posts straight to ComfyUI, around the broker: another graph (an unchanged one
    # would be answered from ComfyUI's cache at once); 4 s nodes, as an interrupt waits for
    # the node that runs to end.
    fake.settings = dataclasses.replace(fake.settings, run_s=8)
    graph = {**GRAPH, "3": {"class_type": "KSampler", "inputs": {"seed": 8}}}
    status, answer = await post_json(http, f"{comfy_url}/prompt", {"prompt": graph})
    assert status == 200
    outside = answer["prompt_id"]
    await wait_for(lambda: fake.running is not None, what="outside prompt running")
    report = await comfy.residency()
    assert report.busy is True and "1 prompt(s) posted around the broker" in report.detail

    # Ollama needs comfyui's memory; comfyui is busy, so the planner refuses, retryably.
    body = {"model": LLM, "prompt": "hi", "stream": False}
    status, answer = await post_json(http, f"{server.url}/v1/llm", body)
    assert status == 507, answer
    assert answer["error"] == "insufficient_vram" and answer["retryable"] is True
    assert fake.model_loaded and fake.unload_count == 0

    # A broker prompt waits behind it and passes run_timeout_s: it leaves ComfyUI's queue,
    # and the interrupt (which names our prompt) leaves the outside one alone.
    ours = await post_image(http, server)
    await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="held prompt timed out")
    assert ours not in fake.prompts_started and not fake.queue
    assert fake.running is not None and fake.running.prompt_id == outside
    assert server.broker.lease.core.stats().timed_out == 1

    async with http.post(f"{comfy_url}/interrupt", json={}) as resp:
        assert resp.status == 200
    await wait_for(lambda: fake.running is None, what="outside prompt stopped")
    assert (await comfy.residency()).busy is False


async def test_comfyui_free_only_sets_flags_and_its_cuda_context_stays() -> None:
    settings = comfyui_settings(run_s=0.3)
    async with comfyui_box(settings) as (cluster, fake, url):
        async with adapter("comfyui", consumer_config("comfyui", url)) as comfy:
            session = cast(ComfyUIAdapter, comfy).session
            async with session.post(f"{url}/prompt", json={"prompt": GRAPH}) as resp:
                assert resp.status == 200
            await wait_for(lambda: fake.running is not None and fake.model_loaded, what="run")
            await comfy.unload()  # answered at once: only flags
            assert fake.flags == {"unload_models": True, "free_memory": True}
            assert cluster.gpu.held_by("comfyui") == 12300  # the prompt still runs on it
            # Its own allocator still holds the model while the prompt runs...
            assert not await comfy.unloaded()
            report = await comfy.residency()
            assert (report.resident, report.held_mib) == (True, 12300)
            await wait_for(lambda: cluster.gpu.held_by("comfyui") == 300, what="weights freed")
            # ...and only its CUDA context once the flags were acted on.
            assert await comfy.unloaded()
            report = await comfy.residency()
            assert (report.resident, report.held_mib) == (False, None)
            assert fake.running is None and fake.ctx_allocated  # the CUDA context stays


async def test_comfyui_eviction_is_confirmed_with_the_cuda_context_still_held() -> None:
    async with comfyui_box(comfyui_settings(free_delay_s=0.1)) as (cluster, fake, url):
        config = broker_config(cluster, {"comfyui": comfyui_consumer(url)}, {"image": "comfyui"})
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            comfy_adapter(server).history_poll_s = 0.02
            await post_image(http, server)
            await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="image done")
            unload = f"{server.url}/v1/admin/consumers/comfyui/unload"
            status, answer = await post_json(http, unload, None)
            assert (status, answer["residency"]) == (200, "unloaded")
            assert cluster.gpu.held_by("comfyui") == 300
            assert fake.unload_count == 1


# -- speaches ----------------------------------------------------------------------------------


def speaches_settings(**timing: Any) -> SpeachesSettings:
    base = {"ttl_s": -1, "load_s": 0, "run_s": 0, "free_delay_s": 0, "residual_mib": 200}
    return SpeachesSettings(**{**base, **timing})


def transcription_form() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF" + b"\0" * 1024, filename="a.wav")
    form.add_field("model", STT)
    return form


async def test_speaches_residency_load_and_unload() -> None:
    async with await start_cluster(spec=only(speaches=speaches_settings())) as cluster:
        fake = cast(FakeSpeaches, cluster.fakes["speaches"])
        config = consumer_config("speaches", cluster.urls["speaches"], models=[STT])
        async with adapter("speaches", config) as a:
            assert a.has_load
            assert (await a.residency()).resident is False
            await a.load()
            await a.load()  # already loaded: speaches answers 409, which is fine
            report = await a.residency()
            assert report.resident is True and report.detail == STT
            assert cluster.gpu.held_by("speaches") == 1200
            await a.unload()
            assert await a.unloaded()
            assert fake.loaded == {}
            assert cluster.gpu.held_by("speaches") == 200  # its runtime stays


async def test_speaches_unload_retries_409_while_in_use_within_unload_timeout() -> None:
    async with await start_cluster(spec=only(speaches=speaches_settings(run_s=0.5))) as cluster:
        fake = cast(FakeSpeaches, cluster.fakes["speaches"])
        url = cluster.urls["speaches"]
        async with aiohttp.ClientSession() as session:
            patient = make_adapter(
                "speaches", consumer_config("speaches", url, unload_timeout_s=10), session
            )
            hasty = make_adapter(
                "speaches", consumer_config("speaches", url, unload_timeout_s=0.1), session
            )
            for a in (patient, hasty):
                cast(SpeachesAdapter, a).retry_s = 0.01

            async def transcribe() -> int:
                async with session.post(
                    f"{url}/v1/audio/transcriptions", data=transcription_form()
                ) as resp:
                    await resp.read()
                    return resp.status

            job = asyncio.ensure_future(transcribe())
            await wait_for(lambda: fake.loaded.get(STT) == 1, what="model in use")
            with pytest.raises(BrokerError) as caught:
                await hasty.unload()
            assert caught.value.code is ErrorCode.EVICTION_FAILED
            assert "0.1 s" in caught.value.message
            await patient.unload()  # 409 until the transcription is done, then 200
            assert job.done() and job.result() == 200
            assert await patient.unloaded()
            deletes = requests_to(fake, "DELETE", f"/api/ps/{STT}")
            assert len(deletes) > 2  # asked again and again while it answered 409


# -- vLLM --------------------------------------------------------------------------------------


def vllm_settings() -> VLLMSettings:
    return VLLMSettings(
        vram_mib=8000, residual_mib=500, load_s=0, wake_s=0, run_s=0, free_delay_s=0
    )


async def test_vllm_sleeps_to_unload_and_wakes_to_load() -> None:
    async with await start_cluster(spec=only(vllm=vllm_settings())) as cluster:
        fake = cast(FakeVLLM, cluster.fakes["vllm"])
        url = cluster.urls["vllm"]
        async with adapter("vllm", consumer_config("vllm", url)) as a:
            assert a.has_load
            assert (await a.residency()).resident is True
            assert not await a.unloaded()
            await a.unload()
            assert await a.unloaded() and fake.sleep_level == 1
            assert (await a.residency()).resident is False
            assert cluster.gpu.held_by("vllm") == 500  # level 1: weights gone, context stays
            await a.load()
            assert (await a.residency()).resident is True
            assert cluster.gpu.held_by("vllm") == 8000
        deep = consumer_config("vllm", url, unload={"path": "/sleep?level=2"})
        async with adapter("vllm", deep) as a:
            await a.unload()
            assert fake.sleep_level == 2


async def test_vllm_job_after_an_unload_wakes_it_first() -> None:
    async with await start_cluster(spec=only(vllm=vllm_settings())) as cluster:
        fake = cast(FakeVLLM, cluster.fakes["vllm"])
        vllm = {
            "type": "vllm",
            "url": cluster.urls["vllm"],
            "health": {"path": "/health", **HEALTH},
            "vram_resident_mib": 8000,
            "gpu_processes": ["vllm"],
        }
        config = broker_config(cluster, {"vllm": vllm}, {"llm": "vllm"})
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            unload = f"{server.url}/v1/admin/consumers/vllm/unload"
            assert (await post_json(http, unload, None))[1]["residency"] == "unloaded"
            assert fake.is_sleeping
            body = {"model": VLLM_MODEL, "prompt": "hi"}
            status, answer = await post_json(http, f"{server.url}/v1/llm", body)
            assert status == 200 and answer["object"] == "text_completion"
            assert not fake.is_sleeping and fake.load_count == 2  # start-up, then the wake


# -- command (whisper-server) ------------------------------------------------------------------


async def test_command_adapter_stops_and_starts_the_process() -> None:
    whisper = WhisperSettings(load_s=0, run_s=0)
    spec = only(whisper=whisper, whisper_subprocess=True)
    async with await start_cluster(spec=spec) as cluster:
        proc = cluster.whisper_process
        assert proc is not None
        config = consumer_config(
            "command",
            proc.url,
            unload={"command": proc.stop_argv},
            load={"command": proc.start_argv},
        )
        async with adapter("whisper", config) as a:
            assert a.stops_process and a.has_load
            await wait_for(lambda: cluster.gpu.held_by("whisper-server") == 3000, what="up")
            assert (await a.residency()).resident is True
            assert not await a.unloaded()
            await a.unload()
            assert await a.unloaded() and not proc.running()
            report = await a.residency()
            assert report.resident is False and report.detail == "process not running"
            assert cluster.gpu.held_by("whisper-server") == 0
            await a.load()
            await wait_for(lambda: _ok(a), what="healthy again")
            assert (await a.residency()).resident is True
            assert cluster.gpu.held_by("whisper-server") == 3000


async def _ok(a: BaseAdapter) -> bool:
    return (await a.health()).ok


@pytest.mark.parametrize(
    ("argv", "timeout_s", "expected"),
    [
        (["sh", "-c", "echo whisper-server.service not loaded >&2; exit 3"], 10, "exited 3: "),
        (["/nonexistent/whisper-ctl", "stop"], 10, "cannot run"),
        (["sh", "-c", "echo stopping; sleep 30"], 0.2, "ran longer than 0.2 s: stopping"),
    ],
    ids=["exit-status", "missing-program", "timeout"],
)
async def test_command_failure_names_the_command_its_status_and_its_output(
    argv: list[str], timeout_s: float, expected: str
) -> None:
    action = {"command": argv, "timeout_s": timeout_s}
    config = consumer_config("command", "http://127.0.0.1:9", unload=action, load=action)
    async with adapter("whisper", config) as a:
        with pytest.raises(BrokerError) as unload:
            await a.unload()
        with pytest.raises(BrokerError) as load:
            await a.load()
    assert unload.value.code is ErrorCode.EVICTION_FAILED
    assert load.value.code is ErrorCode.LOAD_FAILED
    for caught in (unload, load):
        assert expected in caught.value.message and repr(argv) in caught.value.message
    if argv[0] == "sh" and "exit 3" in argv[2]:
        assert "whisper-server.service not loaded" in unload.value.message


async def test_command_that_leaves_a_server_running_in_the_background_returns(
    tmp_path: Path,
) -> None:
    """`sh -c 'server &'` exits at once but its child keeps the output open: the adapter
    waits for the command, not for the end of its output."""
    pidfile = tmp_path / "server.pid"
    script = f"{sys.executable} -c 'import time; time.sleep(30)' & echo $! > {pidfile}; echo up"
    action = {"command": ["sh", "-c", script], "timeout_s": 10}
    config = consumer_config("command", "http://127.0.0.1:9", load=action)
    try:
        async with adapter("whisper", config) as a, asyncio.timeout(5):
            await a.load()
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


async def test_command_adapter_types_are_wired() -> None:
    config = consumer_config("command", "http://127.0.0.1:9")
    async with adapter("whisper", config) as a:
        assert isinstance(a, CommandAdapter) and not a.has_load
        with pytest.raises(BrokerError) as caught:
            await a.unload()
    assert caught.value.code is ErrorCode.EVICTION_FAILED
