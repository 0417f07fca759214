"""Hostile and slow clients against a real `mgpumanager serve` process, each a reproduction
that once held the card, crashed or flooded the log:

- a body trickled one byte every half second, and a 64 MiB answer nobody reads: another
  consumer's job still runs at once (the lease ends when the upstream is done);
- 1,500 connections trickling header lines: a normal job still answers, they are closed at
  the header deadline, and the log stays under 1 MiB;
- malformed HTTP, a deeply nested JSON body, hostile Authorization bytes, clients that leave
  mid-answer: the envelope or a quiet close, never a traceback; a flood of them is rate
  limited in the log.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from harness import (
    Daemon,
    assert_clean_log,
    daemon,
    figure,
    raise_open_file_limit,
    scaled,
    write_registry,
)
from yarl import URL

from conftest import Upstream, consumer, make_config, wait_for

pytestmark = pytest.mark.slow

BIG = 64 * 1024 * 1024


class Timeline:
    """When the upstream saw what (monotonic seconds)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def mark(self, what: str) -> None:
        self.at.setdefault(what, time.monotonic())


@pytest.fixture
async def slow_box(upstream: Upstream, tmp_path: Path) -> AsyncIterator[tuple[Daemon, Timeline]]:
    timeline = Timeline()

    async def transcribe(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"bytes": len(body)})

    async def synthesize(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        resp.content_length = BIG
        await resp.prepare(request)
        block = b"\x07" * (1024 * 1024)
        for _ in range(BIG // len(block)):
            await resp.write(block)
        await resp.write_eof()
        timeline.mark("big answer sent")
        return resp

    async def generate(request: web.Request) -> web.Response:
        timeline.mark("other job started")
        return web.json_response({"response": "ok", "done": True})

    upstream.route("POST", "/api/transcribe", transcribe)
    upstream.route("POST", "/api/synthesize", synthesize)
    upstream.route("POST", "/api/generate", generate)
    await upstream.start()
    config = make_config(
        {
            "slow": consumer(upstream.url),
            "other": consumer(upstream.url, paths={"llm": {"path": "/api/generate"}}),
        },
        routing={"tts": "slow", "stt": "slow", "llm": "other"},
    )
    registry = write_registry(tmp_path / "registry.yaml", config)
    async with daemon(registry, tmp_path / "daemon.log") as d:
        yield d, timeline
    assert_clean_log(d.log())


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    u = URL(url)
    assert u.host is not None and u.port is not None
    return await asyncio.open_connection(u.host, u.port)


@pytest.mark.timeout(120)
async def test_a_trickled_body_and_an_unread_answer_hold_no_lease(
    slow_box: tuple[Daemon, Timeline],
) -> None:
    box, timeline = slow_box
    async with aiohttp.ClientSession() as session:
        # Content-Length 200, one byte every 0.5 s (the reproduction, as observed).
        reader, writer = await open_raw(box.url)
        writer.write(b"POST /v1/stt HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200\r\n\r\n")
        sent = 0
        other_done = asyncio.Event()

        async def trickle() -> None:
            nonlocal sent
            while not other_done.is_set():
                writer.write(b"x")
                sent += 1
                await writer.drain()
                await asyncio.sleep(0.5)  # the slow client's pace

        trickling = asyncio.create_task(trickle())
        started = time.monotonic()
        async with session.post(f"{box.url}/v1/llm", json={}) as resp:
            assert resp.status == 200
        figure(
            "trickled body: other consumer's job answered after (s)",
            round(time.monotonic() - started, 3),
        )
        assert not trickling.done() and 0 < sent < 200  # still trickling meanwhile
        other_done.set()
        await trickling
        writer.write(b"y" * (200 - sent))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()

        # A 64 MiB answer nobody reads; the other consumer's job queued right behind it.
        timeline.at.clear()
        reader, writer = await open_raw(box.url)
        writer.write(b"POST /v1/tts HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await wait_for(lambda: "big answer sent" in timeline.at, timeout_s=60, what="upstream")
        async with session.post(f"{box.url}/v1/llm", json={}) as resp:
            assert resp.status == 200
        gap = timeline.at["other job started"] - timeline.at["big answer sent"]
        figure(
            "unread 64 MiB answer: other job started after the upstream finished (s)", round(gap, 3)
        )
        assert gap < 5.0  # generous: the lease went when the upstream was done
        # The reader, reading at last, gets every byte from the buffer.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert f"Content-Length: {BIG}".encode() in head
        got = 0
        while got < BIG:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
            assert chunk
            got += len(chunk)
        assert got == BIG
        writer.close()
        status = await (await session.get(f"{box.url}/v1/status")).json()
        assert status["scheduler"]["in_flight"] == 0
        assert status["scheduler"]["failed"] == 0


@pytest.fixture
async def plain_box(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Daemon]:
    async def ok(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(3):
            await resp.write(json.dumps({"response": str(i), "done": i == 2}).encode() + b"\n")
        return resp

    async def prompt(request: web.Request) -> web.Response:
        return web.json_response({"prompt_id": "x", "number": 1, "node_errors": {}})

    upstream.route("POST", "/api/generate", ok)
    upstream.route("POST", "/prompt", prompt)
    await upstream.start()
    config = make_config(
        {
            "ollama": consumer(upstream.url, paths={"llm": {"path": "/api/generate"}}),
            "comfyui": consumer(upstream.url, type="comfyui"),
        },
        routing={"llm": "ollama", "image": "comfyui"},
        header_timeout_s=3,
        auth={"token": "s3cret-T0ken"},
    )
    registry = write_registry(tmp_path / "registry.yaml", config)
    async with daemon(registry, tmp_path / "daemon.log") as d:
        yield d


AUTH = b"Authorization: Bearer s3cret-T0ken\r\n"


@pytest.mark.timeout(180)
async def test_slowloris_leaves_the_broker_serving_and_the_log_small(plain_box: Daemon) -> None:
    raise_open_file_limit()
    n = 1500
    u = URL(plain_box.url)
    assert u.host is not None and u.port is not None
    host, port = u.host, u.port
    log_before = plain_box.log_size()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n")
        conns.append((reader, writer))
    stop = asyncio.Event()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        try:
            while not stop.is_set():
                writer.write(b"X-Slow: 1\r\n")  # a header line now and then, never the end
                await writer.drain()
                await asyncio.sleep(1.0)  # the attacker's pace
        except ConnectionError:
            pass

    trickles = [asyncio.create_task(trickle(w)) for _, w in conns]
    await wait_for(lambda: plain_box.open_fds() > n, timeout_s=30, what="connections open")
    figure("slowloris: daemon descriptors with 1500 trickling connections", plain_box.open_fds())
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{plain_box.url}/v1/llm",
            json={},
            headers={"Authorization": "Bearer s3cret-T0ken"},
        ) as resp:
            assert resp.status == 200
            lines = (await resp.read()).splitlines()
            assert json.loads(lines[-1])["done"] is True
    figure("slowloris: a normal job answered in (s)", round(time.monotonic() - started, 3))

    async def closed(reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass

    # The header deadline (3 s here) closes every one of them.
    await asyncio.wait_for(asyncio.gather(*(closed(r) for r, _ in conns)), 60)
    stop.set()
    await asyncio.gather(*trickles)
    for _, writer in conns:
        writer.close()
    grown = plain_box.log_size() - log_before
    figure("slowloris: log growth (bytes)", grown)
    assert grown < 1024 * 1024
    assert_clean_log(plain_box.log())


MALFORMED = [
    b"G@T / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"POST /v1/llm HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v1/llm HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /v1/st\x00atus HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"POST /v1/llm HTTP/1.1\r\nHost: localhost\r\nExpect: tea\r\nContent-Length: 2\r\n\r\n{}",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer s3cret-T0ken\x00\r\n\r\n",
]


async def exchange(url: str, raw: bytes) -> bytes:
    reader, writer = await open_raw(url)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 20)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


@pytest.mark.timeout(180)
async def test_hostile_requests_get_answers_and_a_small_clean_log(plain_box: Daemon) -> None:
    url = plain_box.url
    before = plain_box.log_size()
    for raw in MALFORMED:
        answer = await exchange(url, raw)
        assert status_of(answer) in (400, 401), answer[:300]
        assert b"s3cret" not in answer and b"Traceback" not in answer
        assert b"application/json" in answer.split(b"\r\n\r\n")[0]
    # A 10 KB deeply nested JSON prompt: 400, not a RecursionError.
    nested = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    answer = await exchange(
        url,
        b"POST /v1/image HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + AUTH
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(nested)
        + nested,
    )  # fmt: skip
    assert status_of(answer) == 400 and b'"bad_request"' in answer, answer[:300]
    # Clients that leave mid-answer or before it: quiet, cancelled, never upstream failures.
    for _ in range(20):
        _, writer = await open_raw(url)
        writer.write(
            b"POST /v1/llm HTTP/1.1\r\nHost: localhost\r\n" + AUTH + b"Content-Length: 2\r\n\r\n{}"
        )
        await writer.drain()
        writer.transport.abort()
    # A flood: the log grows by the rate limit's burst and trickle, not per request.
    flood = scaled(300, 3000)
    flood_before = plain_box.log_size()
    for i in range(flood):
        await exchange(url, MALFORMED[i % 7])
    flood_growth = plain_box.log_size() - flood_before
    figure(f"malformed flood: {flood} requests, log growth (bytes)", flood_growth)
    assert flood_growth < 40 * 200  # a few dozen lines, whatever the flood's size
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret-T0ken"}) as s:
        status = await (await s.get(f"{url}/v1/status")).json()
        assert status["scheduler"]["in_flight"] == 0
        assert status["scheduler"]["failed"] == 0
        assert status["consumers"]["ollama"]["healthy"] is True
    text = plain_box.log()
    assert_clean_log(text)
    assert "s3cret" not in text
    assert plain_box.log_size() - before < 1024 * 1024
