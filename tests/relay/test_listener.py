"""Every listener's connections: malformed HTTP answered in the envelope without quoting the
request or logging a traceback, a deadline for the request head, a cap on open connections,
and quiet ends for clients that leave. Raw sockets against a real broker on port 0."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from conftest import Upstream, consumer, make_config, running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.relay.listener import ConnectionGuard, fault_of

# Each is refused by aiohttp's parser or before routing; the secret must never come back.
SECRET = b"s3cr3t-token"
MALFORMED = {
    "bad method": b"G@T / HTTP/1.1\r\nHost: localhost\r\nX-T: " + SECRET + b"\r\n\r\n",
    "duplicate Content-Length": (
        b"POST /v1/tts HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 3\r\n"
        b"X-T: " + SECRET + b"\r\n\r\n{}"
    ),
    "Content-Length with Transfer-Encoding": (
        b"POST /v1/tts HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\nX-T: " + SECRET + b"\r\n\r\n0\r\n\r\n"
    ),
    "a line over 8 KB": b"GET /" + SECRET + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "NUL in the path": b"GET /v1/" + SECRET + b"\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "unknown Expect": (
        b"POST /v1/tts HTTP/1.1\r\nHost: localhost\r\nExpect: " + SECRET + b"\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    ),
    "TLS on the HTTP port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET,
    "bad chunk size": (
        b"POST /v1/tts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + SECRET + b"\r\n"
    ),
}
CLOSE_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = URL(server.url)
    assert url.host is not None and url.port is not None
    return await asyncio.open_connection(url.host, url.port)


async def exchange(server: Server, raw: bytes) -> bytes:
    reader, writer = await connect(server)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
async def broker(upstream: Upstream) -> AsyncIterator[Server]:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    upstream.route("POST", "/api/synthesize", ok)
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, routing={"tts": "mvoice"})
    async with running_broker(config) as server:
        yield server


async def test_malformed_http_gets_the_envelope_and_one_warning(
    broker: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name, raw in MALFORMED.items():
        caplog.clear()
        try:
            answer = await exchange(broker, raw)
        except TimeoutError:
            raise AssertionError(f"{name}: the connection stayed open") from None
        status, headers, body = parse(answer)
        assert status == 400, (name, answer)
        assert headers["Content-Type"].startswith("application/json"), name
        envelope = json.loads(body)
        assert envelope["error"] == "bad_request" and envelope["retryable"] is False, name
        assert SECRET not in answer, name
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(records) == 1, (name, [r.getMessage() for r in records])
        assert records[0].levelno == logging.WARNING
        assert all(r.exc_info is None and r.exc_text is None for r in caplog.records), name
        assert SECRET.decode() not in caplog.text, name
    # ... and the broker still answers
    status, _, body = parse(await exchange(broker, CLOSE_HEALTHZ))
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_each_parser_fault_is_named_never_quoted() -> None:
    from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong

    assert fault_of(LineTooLong(b"x" * 100, 8190)) == "a line of the request head is too long"
    assert fault_of(BadStatusLine("GARBAGE secret")) == "bad request line"
    quoted = BadHttpMessage("Duplicate Content-Length:\n\n  b'Content-Length: 3 secret'\n  ^")
    assert fault_of(quoted) == "Duplicate Content-Length"
    assert fault_of(BadHttpMessage("b'secret'")) == "malformed request"
    assert fault_of(None) == "malformed request"


async def test_a_trickled_request_head_is_cut_at_the_deadline(upstream: Upstream) -> None:
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, header_timeout_s=0.5)
    async with running_broker(config) as server:
        reader, writer = await connect(server)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        closed = asyncio.Event()

        async def trickle() -> None:
            try:
                while not closed.is_set():
                    writer.write(b"X-A: b\r\n")  # a header line now and then, never the end
                    await writer.drain()
                    await asyncio.sleep(0.1)  # the trickling client's pace
            except ConnectionError:
                pass

        trickling = asyncio.create_task(trickle())
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing answered
        closed.set()
        await trickling
        writer.close()
        # An idle keep-alive connection gets the same deadline after its answer.
        reader, writer = await connect(server)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert status.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.read(), 10) == b'{"status": "ok"}'
        writer.close()


async def test_connections_past_the_cap_are_refused_in_the_envelope(upstream: Upstream) -> None:
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, max_connections=3)
    async with running_broker(config) as server:
        assert server.guard.max_connections == 3
        idle = [await connect(server) for _ in range(3)]
        await wait_for(lambda: server.guard.open == 3, what="three connections open")
        status, headers, body = parse(await exchange(server, CLOSE_HEALTHZ))
        assert status == 503 and headers["Retry-After"] == "1"
        assert json.loads(body)["error"] == "too_many_connections"
        assert server.guard.refused == 1
        _, writer = idle.pop()
        writer.close()
        await wait_for(lambda: server.guard.open == 2, what="one closed")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/healthz") as resp:
                assert resp.status == 200
        for _, writer in idle:
            writer.close()


def test_the_cap_follows_the_open_file_limit() -> None:
    config = make_config({"mvoice": consumer("http://127.0.0.1:1")}, max_connections=4096)
    assert ConnectionGuard(lambda: config, files=1024).max_connections == (1024 - 64) // 3
    assert ConnectionGuard(lambda: config, files=1 << 20).max_connections == 4096
    assert ConnectionGuard(lambda: config, files=None).max_connections == 4096


async def test_clients_that_leave_end_quietly_and_count_as_cancelled(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    release = asyncio.Event()

    async def generate(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'{"response":"a"}\n')
        await release.wait()
        await resp.write(b'{"response":"b"}\n')
        return resp

    upstream.route("POST", "/api/generate", generate)
    await upstream.start()
    config = make_config({"ollama": consumer(upstream.url)}, routing={"llm": "ollama"})
    async with running_broker(config) as server:
        core = server.broker.lease.core
        for _ in range(3):  # mid-answer, three times
            reader, writer = await connect(server)
            writer.write(b"POST /v1/llm HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}")
            await reader.readuntil(b'{"response":"a"}\n')
            writer.transport.abort()
        await wait_for(lambda: core.stats().cancelled == 3, what="three cancelled")
        await wait_for(lambda: core.in_flight == 0, what="lease released")
        assert core.stats().failed == 0
        assert server.broker.health.states["ollama"].ok
        release.set()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(r.exc_info is None for r in caplog.records if r.name.startswith(("aiohttp", "mg")))
