"""No client's pace reaches the lease: a job's body is received whole before it takes the GPU,
its answer is buffered (memory, then a temporary file) so the lease ends when the upstream is
done, and a client that sends or takes nothing for client_idle_s is dropped. Raw sockets play
the slow clients; every wait is on an event or a polled condition with a deadline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from conftest import Upstream, consumer, make_config, running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.relay.spool import AnswerBuffer

BIG = 32 * 1024 * 1024  # past the kernel's socket buffers and the broker's memory buffer


def two_consumers(url: str, **top: Any) -> Any:
    """`slow` (tts, stt) and `other` (llm) on the same upstream: never in one tenure."""
    return make_config(
        {
            "slow": consumer(url),
            "other": consumer(url, paths={"llm": {"path": "/api/generate"}}),
        },
        routing={"tts": "slow", "stt": "slow", "llm": "other"},
        **top,
    )


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = URL(server.url)
    assert url.host is not None and url.port is not None
    return await asyncio.open_connection(url.host, url.port)


def head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, Any]:
    """Status and JSON body of one answer with a Content-Length."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = raw.decode().split("\r\n")
    length = next(int(v) for k, _, v in (x.partition(": ") for x in lines) if k == "Content-Length")
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return int(lines[0].split()[1]), json.loads(body)


@pytest.fixture
async def echo_upstream(upstream: Upstream) -> AsyncIterator[Upstream]:
    """/api/transcribe counts the body it got; /api/generate answers at once; /api/synthesize
    answers BIG bytes."""

    async def transcribe(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"bytes": len(body), "length": request.headers.get("Content-Length")}
        )

    async def generate(request: web.Request) -> web.Response:
        return web.json_response({"response": "ok", "done": True})

    async def synthesize(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        resp.content_length = BIG
        await resp.prepare(request)
        block = b"\x07" * (1024 * 1024)
        for _ in range(BIG // len(block)):
            await resp.write(block)
        await resp.write_eof()
        return resp

    upstream.route("POST", "/api/transcribe", transcribe)
    upstream.route("POST", "/api/generate", generate)
    upstream.route("POST", "/api/synthesize", synthesize)
    await upstream.start()
    yield upstream


async def test_a_trickling_body_holds_no_lease(
    echo_upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """Content-Length 200, a byte at a time: another consumer's job runs to its end while the
    body still trickles; then the slow job runs with the whole body."""
    async with running_broker(two_consumers(echo_upstream.url)) as server:
        reader, writer = await connect(server)
        writer.write(head("/v1/stt", 200))
        other_done = asyncio.Event()
        sent = 0

        async def trickle() -> None:
            nonlocal sent
            while not other_done.is_set() and sent < 199:
                writer.write(b"a")
                sent += 1
                await writer.drain()
                await asyncio.sleep(0.05)  # the slow client's pace, not a wait for anything

        trickling = asyncio.create_task(trickle())
        try:
            async with client.post(f"{server.url}/v1/llm", json={}) as resp:
                assert resp.status == 200 and (await resp.json())["done"] is True
            assert not trickling.done() and sent < 199  # still trickling, and it ran anyway
            assert [r.path for r in echo_upstream.requests] == ["/api/generate"]
            other_done.set()
            await trickling
        finally:
            trickling.cancel()
        writer.write(b"b" * (200 - sent))
        await writer.drain()
        status, answer = await read_answer(reader)
        assert status == 200 and answer == {"bytes": 200, "length": "200"}
        writer.close()
        stats = server.broker.lease.core.stats()
        assert stats.completed == 2 and stats.failed == 0


async def test_a_client_that_reads_nothing_holds_no_lease(
    echo_upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """A 32 MiB answer nobody reads: the upstream is drained into the buffer, the lease ends,
    another consumer's job runs; the reader, when it reads at last, gets every byte."""
    async with running_broker(two_consumers(echo_upstream.url)) as server:
        core = server.broker.lease.core
        reader, writer = await connect(server)
        writer.write(head("/v1/tts", 2) + b"{}")
        await writer.drain()
        await wait_for(lambda: core.stats().completed == 1, timeout_s=20, what="upstream done")
        async with client.post(f"{server.url}/v1/llm", json={}) as resp:
            assert resp.status == 200
        assert core.stats().completed == 2 and core.in_flight == 0
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert raw.startswith(b"HTTP/1.1 200") and f"Content-Length: {BIG}".encode() in raw
        body = await asyncio.wait_for(reader.readexactly(BIG), 30)
        assert body == b"\x07" * BIG
        writer.close()


async def test_a_client_that_sends_or_takes_nothing_is_dropped(
    echo_upstream: Upstream,
) -> None:
    config = two_consumers(echo_upstream.url, client_idle_s=0.3)
    async with running_broker(config) as server:
        # Sends 5 of 10 body bytes, then nothing: client_timeout, and the job never queued.
        reader, writer = await connect(server)
        writer.write(head("/v1/stt", 10) + b"12345")
        await writer.drain()
        status, body = await read_answer(reader)
        assert status == 408 and body["error"] == "client_timeout"
        writer.close()
        # Takes nothing of a 32 MiB answer: dropped (its job cancelled if the upstream was
        # still at it when the client's 0.3 s ran out, else complete).
        reader, writer = await connect(server)
        writer.write(head("/v1/tts", 2) + b"{}")
        await writer.drain()

        async def dropped() -> bool:
            try:
                while await reader.read(1):  # what sits in the socket buffers, then the end
                    pass
            except ConnectionError:
                pass
            return True

        assert await asyncio.wait_for(dropped(), 30)
        writer.close()
        core = server.broker.lease.core
        await wait_for(lambda: core.in_flight == 0, what="lease released")
        stats = core.stats()
        assert stats.total_jobs == 1 and stats.completed + stats.cancelled == 1


async def test_a_fast_reader_gets_each_chunk_while_the_upstream_generates(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """The buffer never holds a chunk back from a client that keeps up."""
    more = asyncio.Event()

    async def generate(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'{"response":"a","done":false}\n')
        await more.wait()
        await resp.write(b'{"response":"b","done":true}\n')
        return resp

    upstream.route("POST", "/api/generate", generate)
    await upstream.start()
    config = make_config({"ollama": consumer(upstream.url)}, routing={"llm": "ollama"})
    async with running_broker(config) as server:
        async with client.post(f"{server.url}/v1/llm", json={}) as resp:
            first = await asyncio.wait_for(resp.content.readline(), 10)
            assert json.loads(first)["response"] == "a"
            assert server.broker.lease.core.in_flight == 1  # the upstream is still at it
            more.set()
            assert json.loads(await resp.content.readline())["done"] is True


async def test_the_answer_buffer_spills_to_a_file_and_keeps_the_order() -> None:
    buffer = AnswerBuffer(memory_bytes=10)
    pieces = [bytes([i]) * n for i, n in enumerate([4, 4, 5, 1, 30, 2, 3])]
    for piece in pieces[:5]:
        buffer.put(piece)
    assert buffer.spilled > 0 and buffer.pending == sum(map(len, pieces[:5]))
    got = [await buffer.get(), await buffer.get()]
    buffer.put(pieces[5])  # after spilled bytes not read yet: to the file, behind them
    buffer.put(pieces[6])
    buffer.end()
    while (chunk := await buffer.get()) is not None:
        got.append(chunk)
    assert b"".join(c for c in got if c is not None) == b"".join(pieces)
    buffer.close()


async def test_a_piece_larger_than_memory_is_kept_in_memory_when_nothing_waits() -> None:
    """The event loop may read more at once than the buffer's memory (uvloop: 750 KB against
    256 KiB): a client that keeps up takes such pieces from memory, never through the file."""
    buffer = AnswerBuffer(memory_bytes=10)
    assert not buffer.spilling
    buffer.put(b"a" * 30)  # empty memory: kept, however large
    assert buffer.spilled == 0 and buffer.spilling  # memory is full now
    assert await buffer.get() == b"a" * 30
    assert not buffer.spilling
    buffer.put(b"b" * 30)
    buffer.put(b"c" * 5)  # memory holds a piece already: this one goes to the file
    assert buffer.spilled == 5
    buffer.end()
    assert [await buffer.get(), await buffer.get(), await buffer.get()] == [
        b"b" * 30,
        b"c" * 5,
        None,
    ]
    buffer.close()


@asynccontextmanager
async def an_answer_that_dies(
    upstream: Upstream, declared: int, sent: int
) -> AsyncIterator[aiohttp.ClientResponse]:
    """POST /v1/tts through a broker to an upstream that declares `declared` bytes, sends
    `sent` and dies: the caller reads the answer; afterwards the job has failed and the lease
    is free."""

    async def half(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = declared
        await resp.prepare(request)
        await resp.write(b"x" * sent)
        assert request.transport is not None
        request.transport.abort()  # dies mid-answer
        return resp

    upstream.route("POST", "/api/synthesize", half)
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, routing={"tts": "mvoice"})
    async with running_broker(config) as server:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}/v1/tts", json={}) as resp:
                yield resp
        await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="released")
        assert server.broker.lease.core.stats().failed == 1


async def test_an_upstream_that_breaks_off_cuts_the_client_after_what_came(
    upstream: Upstream,
) -> None:
    async with an_answer_that_dies(upstream, declared=1_000_000, sent=400_000) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_a_small_answer_that_breaks_off_is_an_error_before_anything_is_sent(
    upstream: Upstream,
) -> None:
    """An answer that declares at most 64 KiB is read whole before the client gets any of it:
    when the upstream dies in it, the client gets the envelope, not a truncated 200."""
    async with an_answer_that_dies(upstream, declared=1000, sent=400) as resp:
        assert resp.status == 502
        body = await resp.json()
        assert body["error"] == "upstream_error" and body["consumer"] == "mvoice"
