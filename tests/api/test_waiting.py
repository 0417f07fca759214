"""No client waits in silence: real `ollama` and `openai` clients sent while the lease is busy
get their headers at once, a frame every feedback_interval_s, then the whole answer; errors
after the headers come in-band (the clients raise them); non-streamed requests keep their
status; a client that leaves while it waits leaves the queue; /v1/status and the events say
where each waiting job stands."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import ollama
import openai
import pytest
from aiohttp import web

from conftest import Upstream, consumer, lease_held, make_config, running_broker, wait_for
from mgpumanager.broker import Broker
from mgpumanager.daemon import Server
from mgpumanager.events import Event
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.ollama import FakeOllama, OllamaSettings

MODEL = "llama3.1:8b"
CHUNKS = 4


@dataclasses.dataclass
class Box:
    cluster: SimCluster
    server: Server
    fake: FakeOllama
    client: ollama.AsyncClient
    openai: openai.AsyncOpenAI

    @property
    def broker(self) -> Broker:
        return self.server.broker


@contextlib.asynccontextmanager
async def sim_box(**top: Any) -> AsyncIterator[Box]:
    """The fake Ollama (and the fake mVoice, whose jobs hold the lease) behind the broker;
    `top`: registry keys on top (feedback_interval_s, scheduler, an `ollama` consumer's
    extra keys under `ollama_extra`)."""
    extra = top.pop("ollama_extra", {})
    settings = OllamaSettings(models={MODEL: 6200}, chunks=CHUNKS, load_s=0, run_s=0)
    spec = FakeSpec(ollama=settings, comfyui=None, whisper=None).with_timing(free_delay_s=0)
    async with await start_cluster(spec=spec) as cluster:
        health = {"interval_s": 0.05}
        config = Config.model_validate(
            {
                "listen": "127.0.0.1:0",
                "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
                "routing": {"llm": "ollama", "tts": "mvoice"},
                "consumers": {
                    "ollama": {
                        "type": "ollama",
                        "url": cluster.urls["ollama"],
                        "health": {"path": "/api/version", **health},
                        "vram_resident_mib": 6500,
                        **extra,
                    },
                    "mvoice": {
                        "url": cluster.urls["mvoice"],
                        "health": {"path": "/health", **health},
                        "vram_resident_mib": 2000,
                    },
                },
                **top,
            }
        )
        async with (
            running_broker(config) as server,
            ollama.AsyncClient(host=server.url, trust_env=False) as client,
        ):
            oa = openai.AsyncOpenAI(
                base_url=f"{server.url}/v1",
                api_key="sk-anything",
                max_retries=0,
                timeout=3.0,  # a read timeout that a silent wait of 7 s would run out
                http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
            )
            async with oa:
                yield Box(cluster, server, cast(FakeOllama, cluster.fakes["ollama"]), client, oa)


def gaps(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@pytest.mark.slow
async def test_real_clients_hear_from_the_broker_while_the_lease_is_busy_for_7_s() -> None:
    async with sim_box() as box, lease_held(box.broker) as release:
        loop = asyncio.get_running_loop()
        loop.call_later(7.0, release.set)  # the job ahead runs 7 s
        messages = [{"role": "user", "content": "Why is the sky blue?"}]

        async def ollama_chat() -> tuple[float, list[float], list[ollama.ChatResponse]]:
            sent = loop.time()
            times, parts = [], []
            async for part in await box.client.chat(model=MODEL, messages=messages, stream=True):
                times.append(loop.time())
                parts.append(part)
            return sent, times, parts

        async def ollama_generate() -> tuple[float, list[float], list[ollama.GenerateResponse]]:
            sent = loop.time()
            times, parts = [], []
            async for part in await box.client.generate(model=MODEL, prompt="Hi", stream=True):
                times.append(loop.time())
                parts.append(part)
            return sent, times, parts

        async def openai_chat() -> tuple[float, float, str]:
            sent = loop.time()
            stream = await box.openai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
            )
            headers_at = loop.time()  # the SDK returns once the status line is in
            text = ""
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            return headers_at - sent, loop.time() - sent, text

        chat, generate, (oa_headers_s, oa_total_s, oa_text) = await asyncio.gather(
            ollama_chat(), ollama_generate(), openai_chat()
        )
    for sent, times, parts in (chat, generate):
        assert times[0] - sent < 1.0  # the first frame: headers at once
        assert gaps([sent, *times]) < 3.0  # never silent longer than 3 s
        assert times[-1] - sent >= 7.0  # and the answer after the job ahead
        waiting = [p for p in parts if not p.done][: len(parts) - CHUNKS - 1]
        assert len(waiting) >= 5 and parts[-1].done is True
    chat_text = "".join(p.message.content or "" for p in chat[2])
    assert chat_text.startswith("The sky")
    assert "".join(p.response or "" for p in generate[2]).startswith("The sky")
    assert oa_headers_s < 1.0 and oa_total_s >= 7.0 and oa_text  # no APITimeoutError


async def test_frames_say_where_the_job_stands_and_the_notice_is_said_once() -> None:
    async with (
        sim_box(feedback_interval_s=0.05, ollama_extra={"loading_notice": True}) as box,
        lease_held(box.broker) as release,
    ):
        messages = [{"role": "user", "content": "Hi"}]
        parts: list[ollama.ChatResponse] = []
        async for part in await box.client.chat(model=MODEL, messages=messages, stream=True):
            parts.append(part)
            if len(parts) == 4:
                release.set()
    notes = [p.message.thinking for p in parts if p.message.thinking]
    assert notes[0] == "queued, 0 ahead, waiting for mvoice to finish\n"
    assert len(notes) == len(set(notes))  # once per change: queued, then loading the model
    assert "".join(p.message.content or "" for p in parts).startswith("The sky")


async def test_openai_frames_are_sse_comments_and_the_notice_a_reasoning_delta() -> None:
    async with (
        sim_box(feedback_interval_s=0.05, ollama_extra={"loading_notice": True}) as box,
        lease_held(box.broker) as release,
        aiohttp.ClientSession() as http,
    ):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        async with http.post(f"{box.server.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            first = await resp.content.readuntil(b"\n\n")
            assert first == b": queued, 0 ahead, waiting for mvoice to finish\n\n"
            notice = await resp.content.readuntil(b"\n\n")
            delta = json.loads(notice.removeprefix(b"data: "))["choices"][0]["delta"]
            assert delta == {"reasoning_content": "queued, 0 ahead, waiting for mvoice to finish\n"}
            release.set()
            rest = (await resp.read()).decode()
    assert rest.rstrip().endswith("data: [DONE]")


async def test_queue_timeout_reaches_both_clients_in_band() -> None:
    async with (
        sim_box(feedback_interval_s=0.05, scheduler={"queue_timeout_s": 0.5}) as box,
        lease_held(box.broker),
    ):
        with pytest.raises(ollama.ResponseError) as ollama_error:
            async for _ in await box.client.generate(model=MODEL, prompt="Hi", stream=True):
                pass
        with pytest.raises(openai.APIError) as openai_error:
            stream = await box.openai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
            )
            async for _ in stream:
                pass
    assert "queue_timeout_s" in ollama_error.value.error
    assert "queue_timeout_s" in openai_error.value.message
    body = cast(dict[str, Any], openai_error.value.body)
    assert body["code"] == "queue_timeout" and body["consumer"] == "ollama"
    assert body["retryable"] is True


async def test_the_upstream_dying_while_the_request_waits_comes_in_band() -> None:
    async with sim_box(feedback_interval_s=0.05) as box:
        await box.client.generate(model=MODEL, prompt="warm", stream=False)
        async with lease_held(box.broker) as release:
            parts: list[ollama.GenerateResponse] = []
            with pytest.raises(ollama.ResponseError) as caught:
                async for part in await box.client.generate(model=MODEL, prompt="Hi", stream=True):
                    parts.append(part)
                    if len(parts) == 2:  # it waits, and hears so: now Ollama goes away
                        await box.cluster.servers.pop("ollama").aclose()
                        release.set()
    assert parts and all(p.response == "" and p.done is False for p in parts)
    assert "ollama" in caught.value.error


async def test_a_load_that_fails_comes_in_band(upstream: Upstream) -> None:
    async def failing_load(request: web.Request) -> web.Response:
        return web.json_response({"error": "out of memory"}, status=500)

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    upstream.route("POST", "/load", failing_load)
    upstream.route("POST", "/unload", ok)
    await upstream.start()
    config = make_config(
        {
            "gen": consumer(
                upstream.url,
                openai=True,
                models=["m1"],
                load={"path": "/load"},
                unload={"path": "/unload"},
            )
        },
        feedback_interval_s=0.05,
    )
    async with running_broker(config) as server, aiohttp.ClientSession() as http:
        body = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        async with http.post(f"{server.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            events = (await resp.read()).decode().strip().split("\n\n")
        client = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1",
            api_key="x",
            max_retries=0,
            timeout=3.0,
            http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
        )
        async with client:
            with pytest.raises(openai.APIError) as caught:
                async for _ in await client.chat.completions.create(
                    model="m1", messages=[{"role": "user", "content": "Hi"}], stream=True
                ):
                    pass
    assert events[0] == ": loading m1"
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == "load_failed" and error["consumer"] == "gen"
    assert caught.value.message == error["message"]


async def test_non_streamed_requests_keep_their_status() -> None:
    async with sim_box(feedback_interval_s=0.05) as box:
        async with lease_held(box.broker) as release:
            task = asyncio.ensure_future(
                box.client.generate(model="nope:1b", prompt="hi", stream=False)
            )
            await wait_for(lambda: box.broker.lease.core.queue_depth == 1, what="queued")
            release.set()
            with pytest.raises(ollama.ResponseError) as caught:
                await task
        assert caught.value.status_code == 404


async def test_a_client_that_leaves_while_it_waits_leaves_the_queue() -> None:
    async with (
        sim_box(feedback_interval_s=0.05) as box,
        lease_held(box.broker),
        aiohttp.ClientSession() as http,
    ):
        core = box.broker.lease.core
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        async with http.post(f"{box.server.url}/api/chat", json=body) as resp:
            line = json.loads(await resp.content.readline())
            assert line["message"]["content"] == "" and line["done"] is False
            assert core.queue_depth == 1
            resp.close()  # the client goes
        await wait_for(lambda: core.queue_depth == 0, what="the job left the queue")
        assert core.stats().cancelled == 1


async def test_status_and_events_say_position_and_expected_start() -> None:
    async with (
        sim_box(feedback_interval_s=0.05) as box,
        lease_held(box.broker),
        aiohttp.ClientSession() as http,
    ):
        seen: list[Event] = []
        box.broker.events.taps.append(seen.append)
        body = {"model": MODEL, "prompt": "Hi"}
        answers = [await http.post(f"{box.server.url}/api/generate", json=body) for _ in range(3)]
        try:
            async with http.get(f"{box.server.url}/v1/status") as resp:
                waiting = (await resp.json())["scheduler"]["waiting"]
        finally:
            for answer in answers:
                answer.close()
    assert [w["position"] for w in waiting] == [0, 1, 2]
    assert all(w["waited_s"] >= 0 and "expected_start_s" in w for w in waiting)
    queued = [e for e in seen if e.type == "job.queued"]
    assert [e.figures["position"] for e in queued] == [0, 1, 2]


async def test_a_generic_consumers_declared_streams_get_its_keepalive(upstream: Upstream) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: hello\n\n")
        await response.write_eof()
        return response

    upstream.route("POST", "/stream", stream)
    upstream.route("POST", "/run", stream)
    await upstream.start()
    gen = consumer(
        upstream.url,
        scheduled=[
            {"path": "/stream", "streams": True},
            {"path": "/run", "stream_detect": {"field": "stream"}},
        ],
        keepalive={"frame": ": hold on\n\n"},
    )
    config = make_config({"gen": gen}, feedback_interval_s=0.05)
    async with running_broker(config) as server, aiohttp.ClientSession() as http:
        broker = server.broker
        url = f"{server.url}/upstream/gen"
        async with lease_held(broker, "gen") as release:
            async with http.post(f"{url}/stream", json={}) as resp:
                assert resp.status == 200
                assert await resp.content.readuntil(b"\n\n") == b": hold on\n\n"
                release.set()
                rest = await resp.read()
        assert rest.endswith(b"data: hello\n\n")
        # Where the body does not ask for a stream, no early headers: the status comes after.
        async with lease_held(broker, "gen") as release:
            pending = asyncio.ensure_future(http.post(f"{url}/run", json={"stream": False}))
            await wait_for(lambda: broker.lease.core.queue_depth == 1, what="queued")
            assert not pending.done()
            release.set()
            async with await pending as resp:
                assert await resp.read() == b"data: hello\n\n"


async def test_early_headers_on_a_non_streamed_answer(upstream: Upstream) -> None:
    async def run(request: web.Request) -> web.Response:
        return web.json_response({"audio": "ok"})

    upstream.route("POST", "/api/synthesize", run)
    await upstream.start()
    config = make_config(
        {"tts": consumer(upstream.url, early_headers=True)},
        routing={"tts": "tts"},
        feedback_interval_s=0.05,
    )
    async with running_broker(config) as server, aiohttp.ClientSession() as http:
        async with lease_held(server.broker, "tts") as release:
            async with http.post(f"{server.url}/v1/tts", json={"text": "hi"}) as resp:
                assert resp.status == 200  # at once, while the lease is held
                assert await resp.content.readexactly(1) == b"\n"
                release.set()
                body = await resp.read()
    assert json.loads(body) == {"audio": "ok"}
