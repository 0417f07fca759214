"""The compatibility surfaces against real loopback upstreams: errors in each surface's dialect,
routing by model across several consumers, multipart uploads routed by the `model` of their
head and sent on whole, every consumer's API under /upstream/ (GPU routes scheduled, the rest
passed through, websockets both ways, paths that may not escape), and the seam at `GET /`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from conftest import Upstream, consumer, make_config, running_broker, wait_for
from mgpumanager.api.app import error_middleware, make_app
from mgpumanager.api.ollama import HTML_ROOT
from mgpumanager.api.upstream import DIALECT, consumer_api
from mgpumanager.broker import BROKER, Broker
from mgpumanager.errors import ERROR_TABLE, Dialect
from mgpumanager.sim import FakeOllama, LocalLedger, OllamaSettings, SimGPU, serving

OLLAMA_HEALTH = {"path": "/api/version", "interval_s": 0.05, "timeout_s": 1}


def ollama_fake(models: dict[str, int], ledger: LocalLedger, name: str) -> FakeOllama:
    settings = OllamaSettings(
        name=name, owner=name, models=models, load_s=0, run_s=0, free_delay_s=0, chunks=2
    )
    return FakeOllama(settings, ledger=ledger)


# -- errors in the client's dialect ------------------------------------------------------------


async def test_each_surface_answers_errors_in_its_dialect(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, routing={"tts": "mvoice"})
    async with running_broker(config) as server:
        # Ollama's API: the message where Ollama clients look for it.
        async with client.post(f"{server.url}/api/chat", json={"model": "m"}) as resp:
            assert resp.status == ERROR_TABLE["no_consumer"].status  # type: ignore[index]
            assert await resp.json() == {
                "error": "no consumer of type ollama is configured",
                "code": "no_consumer",
                "consumer": None,
                "retryable": False,
            }
        async with client.get(f"{server.url}/api/chat") as resp:
            assert resp.status == 405
            assert (await resp.json())["code"] == "method_not_allowed"
        # OpenAI's shape, with the field at fault.
        async with client.post(f"{server.url}/v1/chat/completions", json={"messages": []}) as resp:
            assert resp.status == 400
            assert await resp.json() == {
                "error": {
                    "message": "the request names no model ('model' is required)",
                    "type": "invalid_request_error",
                    "code": "bad_request",
                    "param": "model",
                    "consumer": None,
                    "retryable": False,
                }
            }
        async with client.post(f"{server.url}/v1/embeddings", data=b"not json") as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"
        async with client.get(f"{server.url}/v1/models") as resp:
            assert await resp.json() == {"object": "list", "data": []}
        async with client.post(
            f"{server.url}/v1/chat/completions", json={"model": "m", "messages": []}
        ) as resp:
            assert resp.status == 404
            error = (await resp.json())["error"]
            assert error["code"] == "no_consumer" and error["type"] == "invalid_request_error"
        # The broker's own facade keeps its envelope.
        async with client.post(f"{server.url}/v1/stt", data=b"x") as resp:
            body = await resp.json()
            assert set(body) == {"error", "message", "consumer", "retryable"}
            assert body["error"] == "no_consumer"
        async with client.get(f"{server.url}/upstream/nope/x") as resp:
            assert resp.status == 404
            body = await resp.json()
            assert body["error"] == "not_found" and "mvoice" in body["message"]


async def test_upstream_errors_take_the_consumers_dialect(client: aiohttp.ClientSession) -> None:
    gone = "http://127.0.0.1:9"  # discard port: nothing listens
    config = make_config(
        {
            "comfyui": consumer(gone, type="comfyui"),
            "ollama": consumer(gone, type="ollama"),
            "tts": consumer(gone, openai=True),
        },
        auth={"token": "s3cret"},
    )
    auth = {"Authorization": "Bearer s3cret"}
    async with running_broker(config) as server:
        async with client.get(f"{server.url}/upstream/comfyui/queue", headers=auth) as resp:
            assert resp.status == 502
            body = await resp.json()
        assert body["node_errors"] == {}
        assert body["error"]["type"] == "consumer_unreachable" and body["error"]["message"]
        async with client.get(f"{server.url}/upstream/ollama/api/tags", headers=auth) as resp:
            body = await resp.json()
        assert body["code"] == "consumer_unreachable" and isinstance(body["error"], str)
        async with client.get(f"{server.url}/upstream/tts/v1/models", headers=auth) as resp:
            assert (await resp.json())["error"]["type"] == "server_error"
        async with client.get(f"{server.url}/v1/models") as resp:  # no token
            assert resp.status == 401
            error = (await resp.json())["error"]
            assert error["type"] == "authentication_error" and error["code"] == "unauthorized"


# -- several Ollama consumers ------------------------------------------------------------------


async def test_several_ollamas_route_by_model_and_list_the_union(
    client: aiohttp.ClientSession,
) -> None:
    ledger = LocalLedger(SimGPU(49152))
    big = ollama_fake({"big:70b": 40000, "shared:1b": 700}, ledger, "big")
    small = ollama_fake({"small:3b": 2000, "shared:1b": 700}, ledger, "small")
    async with serving(big.app) as big_server, serving(small.app) as small_server:
        config = make_config(
            {
                "big": consumer(
                    big_server.url, type="ollama", vram_resident_mib=40000, health=OLLAMA_HEALTH
                ),
                "small": consumer(
                    small_server.url,
                    type="ollama",
                    aliases={"tiny": "small:3b"},
                    health=OLLAMA_HEALTH,
                ),
            },
            routing={"llm": "small"},
            gpu={"total_mib": 49152},
        )
        async with running_broker(config) as server:
            for model, answered in (
                ("big:70b", "big:70b"),
                ("small:3b", "small:3b"),
                ("tiny", "small:3b"),
            ):
                body = {"model": model, "prompt": "hi", "stream": False}
                async with client.post(f"{server.url}/api/generate", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["model"] == answered
            assert (big.completed_requests, small.completed_requests) == (1, 2)
            # A model nobody has goes to the default (the llm route), which answers its 404.
            body = {"model": "nope", "prompt": "hi"}
            async with client.post(f"{server.url}/api/generate", json=body) as resp:
                assert resp.status == 404 and "not found" in (await resp.json())["error"]
            assert small.received[-1].path == "/api/generate"
            async with client.post(f"{server.url}/api/show", json={"model": "big:70b"}) as resp:
                assert resp.status == 200
            assert big.received[-1].path == "/api/show"
            async with client.get(f"{server.url}/api/tags") as resp:
                names = [m["name"] for m in (await resp.json())["models"]]
            assert names == ["big:70b", "shared:1b", "small:3b"]
            async with client.get(f"{server.url}/api/ps") as resp:
                running = sorted(m["name"] for m in (await resp.json())["models"])
            assert running == ["big:70b", "small:3b"]
            stats = server.broker.lease.core.stats()
            assert stats.total_jobs == 4  # generate x4; show, tags, ps are not GPU work
        await big_server.aclose()
        async with running_broker(config) as server:
            async with client.get(f"{server.url}/api/tags") as resp:
                assert resp.status == 200
                assert resp.headers["X-Mgpumanager-Unreachable"] == "big"
                names = [m["name"] for m in (await resp.json())["models"]]
            assert names == ["small:3b", "shared:1b"]


# -- multipart uploads: the model read, the upload streamed ------------------------------------


SpeechServer = tuple[Upstream, list[Any], asyncio.Event]


@pytest.fixture
async def speech_server(upstream: Upstream) -> AsyncIterator[SpeechServer]:
    """An OpenAI-style STT upstream: what it received, and an event set at its first file
    bytes."""
    received: list[Any] = []
    first_file_bytes = asyncio.Event()

    async def transcribe(request: web.Request) -> web.Response:
        reader = await request.multipart()
        fields: dict[str, str] = {}
        size = 0
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            if part.filename is not None:
                while chunk := await part.read_chunk(4096):
                    size += len(chunk)
                    first_file_bytes.set()
            else:
                fields[part.name or ""] = await part.text()
        received.append((fields, size, request.headers.get("Content-Length")))
        return web.json_response({"text": "ok"})

    upstream.route("POST", "/v1/audio/transcriptions", transcribe)
    await upstream.start()
    yield upstream, received, first_file_bytes


def stt_config(url: str) -> Any:
    return make_config(
        {
            "stt": consumer(
                url, openai=True, models=["whisper-large"], aliases={"whisper-1": "whisper-large"}
            )
        }
    )


async def test_an_upload_is_routed_by_its_head_and_sent_whole_with_its_length(
    speech_server: SpeechServer, client: aiohttp.ClientSession
) -> None:
    """The model is read from the form's head; the job starts only once the rest is here, and
    the upstream gets the upload with its exact length."""
    upstream, received, first_file_bytes = speech_server
    boundary = "XyZ"
    rest = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
            f"whisper-large\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode() + b"\x01" * 65536
        await asyncio.wait_for(rest.wait(), 10)
        yield b"\x02" * 65536 + f"\r\n--{boundary}--\r\n".encode()

    async with running_broker(stt_config(upstream.url)) as server:
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        sending = asyncio.create_task(
            client.post(f"{server.url}/v1/audio/transcriptions", data=body(), headers=headers)
        )
        # Another request answered meanwhile: the broker has had time to act on the head.
        await (await client.get(f"{server.url}/v1/models")).read()
        assert not first_file_bytes.is_set() and upstream.requests == []
        assert server.broker.lease.core.stats().total_jobs == 0  # not even queued
        rest.set()
        async with await sending as resp:
            assert resp.status == 200 and await resp.json() == {"text": "ok"}
            sent_length = resp.request_info.headers.get("Content-Length")
    [(fields, size, length)] = received
    assert fields == {"model": "whisper-large"} and size == 131072
    assert sent_length is None  # the client sent it chunked; the broker knows its length
    assert length is not None and int(length) > size


async def test_a_file_before_its_model_is_spooled_and_an_alias_resolved(
    speech_server: SpeechServer, client: aiohttp.ClientSession
) -> None:
    upstream, received, _ = speech_server
    form = aiohttp.FormData()
    form.add_field("file", b"\x03" * 300_000, filename="a.wav", content_type="audio/wav")
    form.add_field("model", "whisper-1")
    form.add_field("language", "de")
    async with running_broker(stt_config(upstream.url)) as server:
        async with client.post(f"{server.url}/v1/audio/transcriptions", data=form) as resp:
            assert resp.status == 200
    [(fields, size, length)] = received
    assert fields == {"model": "whisper-large", "language": "de"} and size == 300_000
    assert length is not None  # the body changed length: received whole, sent with its own


async def test_an_unchanged_upload_keeps_its_length(
    speech_server: SpeechServer, client: aiohttp.ClientSession
) -> None:
    upstream, received, _ = speech_server
    form = aiohttp.FormData()
    form.add_field("model", "whisper-large")
    form.add_field("file", b"\x05" * 5000, filename="a.wav")
    payload = form()
    async with running_broker(stt_config(upstream.url)) as server:
        async with client.post(f"{server.url}/v1/audio/transcriptions", data=payload) as resp:
            assert resp.status == 200
            sent_length = resp.request_info.headers.get("Content-Length")
    [(fields, size, length)] = received
    assert fields == {"model": "whisper-large"} and size == 5000
    assert length is not None and length == sent_length


# -- /upstream/<consumer>/ -------------------------------------------------------------------


async def test_upstream_relays_everything_and_schedules_only_gpu_routes(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "body": body.decode(),
                "x": request.headers.get("X-Custom"),
                "origin": request.headers.get("Origin"),
            },
            status=201,
            headers={"X-Upstream": "yes"},
        )

    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        upstream.route(method, "/{tail:.*}", echo)
    await upstream.start()
    config = make_config(
        {
            "svc": consumer(
                upstream.url,
                paths={"tts": {"path": "/speak"}},
                scheduled=[{"method": "PUT", "path": "/render"}],
            )
        }
    )
    async with running_broker(config) as server:
        base = f"{server.url}/upstream/svc"
        jobs = server.broker.lease.core.stats
        async with client.patch(
            f"{base}/a/b%20c?q=1&q=2", data=b"hello", headers={"X-Custom": "v"}
        ) as resp:
            assert resp.status == 201 and resp.headers["X-Upstream"] == "yes"
            assert await resp.json() == {
                "method": "PATCH",
                "path": "/a/b%20c?q=1&q=2",
                "body": "hello",
                "x": "v",
                "origin": None,
            }
        assert jobs().total_jobs == 0
        async with client.post(f"{base}/speak", data=b"text") as resp:
            assert (await resp.json())["path"] == "/speak"
        async with client.put(f"{base}/render") as resp:
            assert resp.status == 201
        async with client.get(f"{base}/render") as resp:  # another method: not declared
            assert resp.status == 201
        await wait_for(lambda: jobs().completed == 2, what="two scheduled jobs")
        assert jobs().total_jobs == 2
        async with client.get(base) as resp:
            assert (await resp.json())["path"] == "/"
        # A page served through the broker posts with the broker's Origin: made the upstream's.
        same = {"Origin": server.url}
        async with client.post(f"{base}/x", headers=same) as resp:
            assert (await resp.json())["origin"] == upstream.url
        # Another site's page is refused by the broker: the upstream never sees it.
        seen = len(upstream.requests)
        other = {"Origin": "http://evil.example"}
        async with client.post(f"{base}/x", headers=other) as resp:
            assert resp.status == 403
        assert len(upstream.requests) == seen


@pytest.mark.parametrize(
    "tail", ["..%2f..%2fadmin", "a/%2e%2e/b", "a/..", "x%5c..%5cy", "a/%252e%252e/b"]
)
async def test_an_upstream_path_may_not_escape(
    upstream: Upstream, client: aiohttp.ClientSession, tail: str
) -> None:
    await upstream.start()
    config = make_config({"svc": consumer(upstream.url)})
    async with running_broker(config) as server:
        async with client.get(URL(f"{server.url}/upstream/svc/{tail}", encoded=True)) as resp:
            assert resp.status == 400
            assert "may not leave /upstream/svc/" in (await resp.json())["message"]
    assert upstream.requests == []


async def test_websockets_are_relayed_both_ways(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    seen: dict[str, Any] = {}

    async def ws_echo(request: web.Request) -> web.StreamResponse:
        seen["query"] = request.query_string
        seen["protocol"] = request.headers.get("Sec-WebSocket-Protocol")
        ws = web.WebSocketResponse(protocols=["comfy"])
        await ws.prepare(request)
        await ws.send_str(json.dumps({"hello": request.query.get("clientId")}))
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data == "bye":
                    await ws.close(code=4001, message=b"asked to")
                    break
                await ws.send_str(msg.data.upper())
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    upstream.route("GET", "/ws", ws_echo)
    await upstream.start()
    config = make_config({"svc": consumer(upstream.url)})
    async with running_broker(config) as server:
        async with client.ws_connect(
            f"{server.url}/upstream/svc/ws?clientId=abc", protocols=["comfy"]
        ) as ws:
            assert ws.protocol == "comfy"
            assert await ws.receive_json(timeout=5) == {"hello": "abc"}
            await ws.send_str("ping")
            assert (await ws.receive(timeout=5)).data == "PING"
            await ws.send_bytes(b"\x01\x02\x03")
            assert (await ws.receive(timeout=5)).data == b"\x03\x02\x01"
            await ws.send_str("bye")
            closing = await ws.receive(timeout=5)
            assert closing.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 4001
        assert seen == {"query": "clientId=abc", "protocol": "comfy"}
        assert server.broker.lease.core.stats().total_jobs == 0
        # A path the upstream does not upgrade: its own status.
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await client.ws_connect(f"{server.url}/upstream/svc/nows")
        assert caught.value.status == 404


# -- the seam at GET / -------------------------------------------------------------------------


async def test_root_is_ollamas_heartbeat_and_a_browser_page_can_take_it(
    client: aiohttp.ClientSession,
) -> None:
    fake = ollama_fake({"m:1b": 500}, LocalLedger(SimGPU(24576)), "ollama")
    async with serving(fake.app) as ollama_server:
        config = make_config(
            {"ollama": consumer(ollama_server.url, type="ollama", health=OLLAMA_HEALTH)}
        )
        broker = Broker(config)
        await broker.start()
        app = make_app(broker)

        async def page(request: web.Request) -> web.Response:
            return web.Response(text="<html>dashboard</html>", content_type="text/html")

        app[HTML_ROOT] = page
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        try:
            async with client.get(url, headers={"Accept": "text/html,*/*"}) as resp:
                assert await resp.text() == "<html>dashboard</html>"
            async with client.get(url, headers={"Accept": "application/json"}) as resp:
                assert await resp.text() == "Ollama is running"
            async with client.head(url) as resp:
                assert resp.status == 200
        finally:
            await runner.cleanup()
            await broker.aclose()


async def test_a_consumers_api_can_be_served_at_the_root_of_its_own_listener(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """The /upstream/ handler is built for any prefix: the same code serves one consumer's API
    at the root of a listener of its own, with that consumer's error dialect."""

    async def queue(request: web.Request) -> web.Response:
        return web.json_response({"path": request.raw_path})

    upstream.route("GET", "/queue", queue)
    await upstream.start()
    config = make_config({"comfyui": consumer(upstream.url, type="comfyui")})
    async with running_broker(config) as server:
        door = web.Application(middlewares=[error_middleware])
        door[BROKER] = server.broker
        door[DIALECT] = Dialect.COMFYUI
        door.router.add_route("*", "/{tail:.*}", consumer_api("/", "comfyui"))
        runner = web.AppRunner(door)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with client.get(f"{url}/queue?x=1") as resp:
                assert await resp.json() == {"path": "/queue?x=1"}
            async with client.get(URL(f"{url}/a/%2e%2e/b", encoded=True)) as resp:
                assert resp.status == 400
                assert (await resp.json())["node_errors"] == {}
        finally:
            await runner.cleanup()


async def test_image_generation_goes_to_the_consumer_that_serves_the_model(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"created": 1, "data": [{"b64_json": body["model"]}]})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "sdxl-turbo"}]})

    upstream.route("POST", "/v1/images/generations", generate)
    upstream.route("GET", "/v1/models", models)
    await upstream.start()
    config = make_config(
        {"images": consumer(upstream.url, openai=True, aliases={"dall-e-3": "sdxl-turbo"})}
    )
    async with running_broker(config) as server:
        body = {"model": "dall-e-3", "prompt": "a cat", "n": 1}
        async with client.post(f"{server.url}/v1/images/generations", json=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["data"] == [{"b64_json": "sdxl-turbo"}]
        async with client.get(f"{server.url}/v1/models") as resp:
            listed = {m["id"]: m["owned_by"] for m in (await resp.json())["data"]}
        assert listed == {"dall-e-3": "images", "sdxl-turbo": "images"}
        assert server.broker.lease.core.stats().total_jobs == 1


async def test_a_form_arriving_in_tiny_pieces_still_has_its_alias_resolved(
    speech_server: SpeechServer, client: aiohttp.ClientSession
) -> None:
    upstream, received, _ = speech_server
    boundary = "b0undary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        ).encode()
        + b"\r\n-\r" * 500
        + f"\r\n--{boundary}--\r\n".encode()
    )

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(form), 5):
            yield form[i : i + 5]

    async with running_broker(stt_config(upstream.url)) as server:
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        async with client.post(
            f"{server.url}/v1/audio/transcriptions", data=pieces(), headers=headers
        ) as resp:
            assert resp.status == 200
    [(fields, size, _)] = received
    assert fields == {"model": "whisper-large"} and size == 2000
