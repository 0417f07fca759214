"""The facade against real loopback upstreams: streaming both ways, pass-through, every error
code the broker produces here, disconnects, and the statistics."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from conftest import Upstream, consumer, make_config, running_broker, wait_for
from mgpumanager.errors import ERROR_TABLE


class Answer:
    """A finished response, read whole and released."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    async def json(self) -> Any:
        return json.loads(self.body)


async def post(client: aiohttp.ClientSession, url: str, **kwargs: Any) -> Answer:
    async with client.post(url, **kwargs) as resp:
        return Answer(resp.status, dict(resp.headers), await resp.read())


async def envelope(resp: aiohttp.ClientResponse | Answer, code: str) -> dict[str, Any]:
    body: dict[str, Any] = await resp.json()
    assert set(body) == {"error", "message", "consumer", "retryable"}, body
    assert body["error"] == code, body
    assert resp.status == ERROR_TABLE[code].status  # type: ignore[index]
    assert body["message"]
    return body


async def test_llm_answer_streams_line_by_line(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()

    async def generate(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(b'{"response":"Hel","done":false}\n')
        await release.wait()
        await resp.write(b'{"response":"lo","done":true}\n')
        return resp

    upstream.route("POST", "/api/generate", generate)
    await upstream.start()
    config = make_config({"ollama": consumer(upstream.url)}, routing={"llm": "ollama"})
    async with running_broker(config) as server:
        async with client.post(f"{server.url}/v1/llm", json={"model": "m"}) as resp:
            assert resp.status == 200
            first = await asyncio.wait_for(resp.content.readline(), 10)
            assert json.loads(first) == {"response": "Hel", "done": False}
            assert not release.is_set()  # the upstream is still generating
            release.set()
            assert json.loads(await resp.content.readline())["done"] is True


async def test_an_upload_that_is_no_gpu_work_is_relayed_as_it_arrives(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """A passed-through request holds no lease: its body streams on as it comes (a GPU job's
    body is received whole first: tests/test_slow_clients.py)."""
    first_chunk_seen = asyncio.Event()
    received: list[int] = []

    async def upload(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            first_chunk_seen.set()
        received.append(total)
        return web.json_response({"bytes": total})

    upstream.route("POST", "/api/upload", upload)
    await upstream.start()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        # Only continue once the upstream has the first chunk: a broker that collected the
        # body whole would never get there, and this test would time out.
        await asyncio.wait_for(first_chunk_seen.wait(), 10)
        yield b"y" * 65536

    config = make_config({"mvoice": consumer(upstream.url)}, routing={"stt": "mvoice"})
    async with running_broker(config) as server:
        url = f"{server.url}/upstream/mvoice/api/upload"
        async with client.post(url, data=body()) as resp:
            assert resp.status == 200
            assert (await resp.json()) == {"bytes": 131072}
        assert server.broker.lease.core.stats().total_jobs == 0


async def test_query_status_headers_and_body_pass_through(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def teapot(request: web.Request) -> web.Response:
        return web.Response(
            status=418,
            body=b"short and stout " + request.rel_url.raw_query_string.encode(),
            headers={"X-Upstream": "yes", "Content-Type": "text/plain"},
        )

    upstream.route("POST", "/api/synthesize", teapot)
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, routing={"tts": "mvoice"})
    async with running_broker(config) as server:
        url = f"{server.url}/v1/tts?voice=a%20b&x=1&x=2"
        async with client.post(url, data=b"{}") as resp:
            assert resp.status == 418
            assert resp.headers["X-Upstream"] == "yes"
            assert await resp.read() == b"short and stout voice=a%20b&x=1&x=2"
        assert upstream.requests[-1].raw_path.endswith("?voice=a%20b&x=1&x=2")
        assert "Connection" not in upstream.requests[-1].headers or True


async def test_upstream_5xx_passes_through_unchanged(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def oom(request: web.Request) -> web.Response:
        return web.json_response({"error": "CUDA out of memory"}, status=500)

    upstream.route("POST", "/api/generate", oom)
    await upstream.start()
    config = make_config({"ollama": consumer(upstream.url)}, routing={"llm": "ollama"})
    async with running_broker(config) as server:
        async with client.post(f"{server.url}/v1/llm", json={}) as resp:
            assert resp.status == 500
            assert await resp.json() == {"error": "CUDA out of memory"}


async def test_payload_too_large_declared_and_streamed(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def sink(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({})

    upstream.route("POST", "/api/transcribe", sink)
    await upstream.start()
    config = make_config(
        {"mvoice": consumer(upstream.url)}, routing={"stt": "mvoice"}, max_body_mib=1
    )
    async with running_broker(config) as server:
        big = io.BytesIO(b"z" * (1024 * 1024 + 1))
        async with client.post(f"{server.url}/v1/stt", data=big) as resp:
            await envelope(resp, "payload_too_large")
        assert upstream.requests == []  # refused before anything was sent

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b"z" * 65536

        async with client.post(f"{server.url}/v1/stt", data=chunked()) as resp:
            body = await envelope(resp, "payload_too_large")
            assert body["consumer"] == "mvoice"
        status = await (await client.get(f"{server.url}/v1/status")).json()
        assert status["scheduler"]["in_flight"] == 0


async def test_audio_proxy_and_path_escapes(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def audio(request: web.Request) -> web.Response:
        return web.Response(body=b"RIFF" + request.path.encode(), content_type="audio/wav")

    upstream.route("GET", "/audio/{tail:.+}", audio)
    upstream.route("HEAD", "/audio/{tail:.+}", audio)
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, audio_proxy="mvoice")
    async with running_broker(config) as server:
        async with client.get(f"{server.url}/audio/2026/a.wav") as resp:
            assert resp.status == 200
            assert await resp.read() == b"RIFF/audio/2026/a.wav"
        async with client.head(f"{server.url}/audio/2026/a.wav") as resp:
            assert resp.status == 200
        seen = len(upstream.requests)
        for evil in (
            "/audio/%2e%2e/%2e%2e/etc/passwd",
            "/audio/a/..%2f..%2fsecret",
            "/audio/%252e%252e/x",
            "/audio/a%5c..%5cb",
        ):
            raw = URL(server.url + evil, encoded=True)  # sent as written, not normalised
            async with client.get(raw, allow_redirects=False) as resp:
                assert resp.status == 400, evil
                await envelope(resp, "bad_request")
        assert len(upstream.requests) == seen  # none of them reached the upstream


async def test_unknown_route_and_wrong_method_use_the_envelope(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, routing={"tts": "mvoice"})
    async with running_broker(config) as server:
        async with client.get(f"{server.url}/v2/nothing") as resp:
            await envelope(resp, "not_found")
        async with client.get(f"{server.url}/v1/tts") as resp:
            await envelope(resp, "method_not_allowed")
            assert "POST" in resp.headers["Allow"]
        async with client.post(f"{server.url}/v1/image", data=b"{}") as resp:
            body = await envelope(resp, "no_consumer")
            assert body["retryable"] is False
        async with client.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200


async def test_unreachable_consumer_fails_fast_and_is_never_forwarded(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    await upstream.start()
    dead = Upstream()
    await dead.start()
    dead_url = dead.url
    await dead.aclose()  # nothing listens there now
    config = make_config(
        {"mvoice": consumer(upstream.url), "whisper": consumer(dead_url)},
        routing={"tts": "mvoice", "stt": "whisper"},
    )
    async with running_broker(config) as server:
        async with client.post(f"{server.url}/v1/stt", data=b"audio") as resp:
            body = await envelope(resp, "consumer_unreachable")
            assert body["consumer"] == "whisper" and body["retryable"] is True
        assert upstream.requests == []
        status = await (await client.get(f"{server.url}/v1/status")).json()
        assert status["consumers"]["whisper"]["healthy"] is False
        assert status["consumers"]["mvoice"]["healthy"] is True


async def test_health_recovers_and_then_jobs_flow(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": 1})

    upstream.route("POST", "/api/synthesize", ok)
    upstream.healthy = False
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, routing={"tts": "mvoice"})
    async with running_broker(config) as server:
        async with client.post(f"{server.url}/v1/tts", json={}) as resp:
            await envelope(resp, "consumer_unreachable")
        upstream.healthy = True
        await wait_for(lambda: server.broker.health.states["mvoice"].ok is True, what="probe")
        async with client.post(f"{server.url}/v1/tts", json={}) as resp:
            assert resp.status == 200


class Blocker:
    """An upstream endpoint that holds each request until released."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.count = 0

    async def __call__(self, request: web.Request) -> web.Response:
        self.count += 1
        self.entered.set()
        await self.release.wait()
        return web.json_response({"n": self.count})


async def test_queue_full_and_queue_timeout(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    blocker = Blocker()
    upstream.route("POST", "/api/synthesize", blocker)
    await upstream.start()
    config = make_config(
        {"mvoice": consumer(upstream.url)},
        routing={"tts": "mvoice"},
        scheduler={"max_queue": 1, "queue_timeout_s": 0.3},
    )
    async with running_broker(config) as server:
        first = asyncio.create_task(post(client, f"{server.url}/v1/tts", json={}))
        await asyncio.wait_for(blocker.entered.wait(), 10)
        second = asyncio.create_task(post(client, f"{server.url}/v1/tts", json={}))
        await wait_for(lambda: server.broker.lease.core.queue_depth == 1, what="queued")
        async with client.post(f"{server.url}/v1/tts", json={}) as resp:
            await envelope(resp, "queue_full")
            assert int(resp.headers["Retry-After"]) >= 1
        resp2 = await second
        await envelope(resp2, "queue_timeout")
        blocker.release.set()
        resp1 = await first
        assert resp1.status == 200
        stats = server.broker.lease.core.stats()
        assert (stats.timed_out, stats.completed, stats.queue_depth) == (1, 1, 0)


async def test_run_timeout_aborts_the_upstream(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    blocker = Blocker()
    upstream.route("POST", "/api/generate", blocker)
    await upstream.start()
    config = make_config(
        {"ollama": consumer(upstream.url, run_timeout_s=0.3)}, routing={"llm": "ollama"}
    )
    async with running_broker(config) as server:
        async with client.post(f"{server.url}/v1/llm", json={}) as resp:
            await envelope(resp, "upstream_timeout")
        await wait_for(lambda: upstream.aborted == 1, what="upstream request aborted")
        assert server.broker.lease.core.in_flight == 0


async def test_garbage_from_upstream_is_upstream_error(client: aiohttp.ClientSession) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line.startswith(b"GET /health"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        else:
            writer.write(b"this is not HTTP at all\r\n\r\n")
        await writer.drain()
        writer.close()

    tcp = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    config = make_config(
        {
            "mvoice": consumer(
                f"http://127.0.0.1:{port}", health={"path": "/health", "interval_s": 60}
            )
        },
        routing={"tts": "mvoice"},
    )
    try:
        async with running_broker(config) as server:
            async with client.post(f"{server.url}/v1/tts", json={}) as resp:
                body = await envelope(resp, "upstream_error")
                assert body["consumer"] == "mvoice"
    finally:
        tcp.close()
        await tcp.wait_closed()


async def test_unauthorized_without_the_token(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, auth={"token": "s3cret"})
    async with running_broker(config) as server:
        async with client.get(f"{server.url}/v1/status") as resp:
            await envelope(resp, "unauthorized")
        headers = {"Authorization": "Bearer s3cret"}
        async with client.get(f"{server.url}/v1/status", headers=headers) as resp:
            assert resp.status == 200
            assert "s3cret" not in await resp.text()
        async with client.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200


async def test_bad_priority_header_is_bad_request(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    await upstream.start()
    config = make_config(
        {"mvoice": consumer(upstream.url)},
        routing={"tts": "mvoice"},
        scheduler={"allow_priority_header": True},
    )
    async with (
        running_broker(config) as server,
        client.post(f"{server.url}/v1/tts", json={}, headers={"X-Priority": "high"}) as resp,
    ):
        await envelope(resp, "bad_request")


async def test_queued_jobs_get_shutting_down_and_running_ones_finish(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    blocker = Blocker()
    upstream.route("POST", "/api/synthesize", blocker)
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, routing={"tts": "mvoice"})
    async with running_broker(config) as server:
        running = asyncio.create_task(post(client, f"{server.url}/v1/tts", json={}))
        await asyncio.wait_for(blocker.entered.wait(), 10)
        queued = asyncio.create_task(post(client, f"{server.url}/v1/tts", json={}))
        await wait_for(lambda: server.broker.lease.core.queue_depth == 1, what="queued")
        server.broker.lease.shutdown()
        await envelope(await queued, "shutting_down")
        async with client.post(f"{server.url}/v1/tts", json={}) as resp:
            await envelope(resp, "shutting_down")
        blocker.release.set()
        assert (await running).status == 200


async def test_disconnect_while_queued_leaves_the_queue_at_once(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    blocker = Blocker()
    upstream.route("POST", "/api/synthesize", blocker)
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, routing={"tts": "mvoice"})
    async with running_broker(config) as server:
        core = server.broker.lease.core
        holder = asyncio.create_task(post(client, f"{server.url}/v1/tts", json={}))
        await asyncio.wait_for(blocker.entered.wait(), 10)
        async with aiohttp.ClientSession() as impatient:
            leaver = asyncio.create_task(post(impatient, f"{server.url}/v1/tts", json={}))
            await wait_for(lambda: core.queue_depth == 1, what="leaver queued")
            behind = asyncio.create_task(post(client, f"{server.url}/v1/tts", json={}))
            await wait_for(lambda: core.queue_depth == 2, what="second queued")
            leaver.cancel()
        # Closing the session closed the socket: the broker notices and the job leaves.
        await wait_for(lambda: core.queue_depth == 1, what="depth drops")
        assert core.stats().cancelled == 1
        blocker.release.set()
        assert (await holder).status == 200
        assert (await behind).status == 200  # started as soon as the lease freed
        assert blocker.count == 2  # the leaver never reached the upstream


async def test_disconnect_mid_stream_aborts_upstream_and_frees_the_lease(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    never = asyncio.Event()

    async def generate(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'{"response":"a"}\n')
        await never.wait()
        return resp

    async def quick(request: web.Request) -> web.Response:
        return web.json_response({"done": True})

    upstream.route("POST", "/api/generate", generate)
    upstream.route("POST", "/api/chat", quick)
    await upstream.start()
    config = make_config(
        {
            "ollama": consumer(upstream.url, paths={"llm": {"path": "/api/generate"}}),
            "other": consumer(upstream.url, paths={"llm": {"path": "/api/chat"}}),
        },
        routing={"llm": "ollama", "tts": "other"},
    )
    async with running_broker(config) as server:
        core = server.broker.lease.core
        async with aiohttp.ClientSession() as leaving:
            async with leaving.post(f"{server.url}/v1/llm", json={}) as resp:
                assert await resp.content.readline() == b'{"response":"a"}\n'
                assert core.in_flight == 1
                resp.close()  # hang up mid-stream
        await wait_for(lambda: upstream.aborted == 1, what="upstream aborted")
        await wait_for(lambda: core.in_flight == 0, what="lease released")
        assert core.stats().cancelled == 1


async def test_status_and_metrics(upstream: Upstream, client: aiohttp.ClientSession) -> None:
    blocker = Blocker()
    upstream.route("POST", "/api/synthesize", blocker)
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, routing={"tts": "mvoice"})
    async with running_broker(config) as server:
        s = (await (await client.get(f"{server.url}/v1/status")).json())["scheduler"]
        assert (s["queue_depth"], s["in_flight"], s["total_jobs"], s["oldest_queued"]) == (
            0,
            0,
            0,
            None,
        )
        first = asyncio.create_task(post(client, f"{server.url}/v1/tts", json={}))
        await asyncio.wait_for(blocker.entered.wait(), 10)
        second = asyncio.create_task(post(client, f"{server.url}/v1/tts", json={}))
        await wait_for(lambda: server.broker.lease.core.queue_depth == 1, what="queued")
        status = await (await client.get(f"{server.url}/v1/status")).json()
        s = status["scheduler"]
        assert (s["queue_depth"], s["in_flight"], s["total_jobs"], s["holder"]) == (
            1,
            1,
            2,
            "mvoice",
        )
        assert s["oldest_queued"] >= 0
        assert status["consumers"]["mvoice"]["queue_depth"] == 1
        assert status["gpu"]["backend"] == "static" and status["gpu"]["total_mib"] == 24576
        blocker.release.set()
        await first
        await second
        await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="idle")
        s = (await (await client.get(f"{server.url}/v1/status")).json())["scheduler"]
        assert (s["queue_depth"], s["in_flight"], s["completed"], s["oldest_queued"]) == (
            0,
            0,
            2,
            None,
        )
        assert s["last_wait_ms"] >= 0 and s["last_run_ms"] >= 0
        text = await (await client.get(f"{server.url}/metrics")).text()
        assert 'mgpumanager_jobs_total{outcome="completed"} 2.0' in text
        assert 'mgpumanager_consumer_up{consumer="mvoice"} 1.0' in text


async def test_compressed_upload_and_the_brokers_token_are_relayed_correctly(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    seen: list[tuple[str | None, str | None, bytes]] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(
            (request.headers.get("Content-Encoding"), request.headers.get("Authorization"), body)
        )
        return web.json_response({"bytes": len(body)})

    upstream.route("POST", "/api/synthesize", echo)
    await upstream.start()
    config = make_config(
        {"mvoice": consumer(upstream.url)}, routing={"tts": "mvoice"}, auth={"token": "s3cret"}
    )
    text = b'{"text": "' + b"hello " * 200 + b'"}'
    async with running_broker(config) as server:
        headers = {"Authorization": "Bearer s3cret", "Content-Encoding": "gzip"}
        data = gzip.compress(text)
        async with client.post(f"{server.url}/v1/tts", data=data, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    # aiohttp's server decompressed it: the upstream gets the plain body, honestly labelled,
    # and never the broker's own bearer token.
    assert seen == [(None, None, text)]
