"""A job's body past the broker's memory is spooled to a file and sent upstream from it: the
upstream gets exactly the client's bytes, with the body's own Content-Length (never chunked),
whether the kernel sends the file (sendfile) or the broker reads it back in pieces."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import Upstream, consumer, make_config, running_broker, wait_for
from mgpumanager.relay.spool import (
    RELEASE_AFTER_BYTES,
    SPOOL_RESERVE_BYTES,
    SpooledBody,
)

MIB = 1024 * 1024
# Past one reserve step and no multiple of any piece size: a reserve left on the file would
# show as trailing zeros.
ODD = SPOOL_RESERVE_BYTES + 12_345


def pattern(size: int) -> bytes:
    """Bytes that differ from block to block (an offset error changes the hash) yet gzip well."""
    block = os.urandom(4096)
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
async def sink(upstream: Upstream) -> AsyncIterator[Upstream]:
    """/api/transcribe streams the body (no client_max_size applies) and answers its size,
    hash and how it was framed."""

    async def transcribe(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for part in request.content.iter_chunked(MIB):
            digest.update(part)
            size += len(part)
        return web.json_response(
            {
                "size": size,
                "sha256": digest.hexdigest(),
                "length": request.headers.get("Content-Length"),
                "chunked": "Transfer-Encoding" in request.headers,
            }
        )

    upstream.route("POST", "/api/transcribe", transcribe)
    await upstream.start()
    yield upstream


def stt_config(url: str, **top: Any) -> Any:
    return make_config({"mvoice": consumer(url)}, routing={"stt": "mvoice"}, **top)


def expected(data: bytes) -> dict[str, Any]:
    return {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "length": str(len(data)),
        "chunked": False,
    }


async def test_a_spooled_upload_arrives_exact_with_its_length(
    sink: Upstream, client: aiohttp.ClientSession
) -> None:
    data = pattern(ODD)

    async def pieces() -> AsyncIterator[bytes]:
        for at in range(0, len(data), 300_000):
            yield data[at : at + 300_000]

    async with running_broker(stt_config(sink.url)) as server:
        url = f"{server.url}/v1/stt"
        async with client.post(url, data=io.BytesIO(data)) as resp:  # a Content-Length
            assert resp.status == 200 and await resp.json() == expected(data)
        async with client.post(url, data=pieces()) as resp:  # chunked: its length found here
            assert resp.status == 200 and await resp.json() == expected(data)
        # Compressed: aiohttp's server decodes it, so the file outgrows the declared length.
        headers = {"Content-Encoding": "gzip"}
        packed = io.BytesIO(gzip.compress(data))
        async with client.post(url, data=packed, headers=headers) as resp:
            assert resp.status == 200 and await resp.json() == expected(data)


async def test_a_file_system_that_reserves_nothing_still_gets_the_whole_body(
    sink: Upstream, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused: list[int] = []

    def full(fd: int, offset: int, length: int) -> None:
        refused.append(length)
        raise OSError(errno.ENOSPC, "no space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    data = pattern(ODD)
    async with running_broker(stt_config(sink.url)) as server:
        async with client.post(f"{server.url}/v1/stt", data=io.BytesIO(data)) as resp:
            assert resp.status == 200 and await resp.json() == expected(data)
    assert len(refused) == 1  # asked once, then the writes allocate as they go


async def test_a_spooled_upload_past_max_body_is_refused_before_the_upstream(
    sink: Upstream, client: aiohttp.ClientSession
) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(3 * 16):
            yield b"z" * (MIB // 16)

    async with running_broker(stt_config(sink.url, max_body_mib=2)) as server:
        async with client.post(f"{server.url}/v1/stt", data=pieces()) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "payload_too_large"
        assert sink.requests == []


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("size", [MIB, RELEASE_AFTER_BYTES])
async def test_a_closed_spool_file_lets_its_descriptor_go(size: int) -> None:
    """Closed at once to its owner; a large one's last descriptor goes in a worker thread
    (where the kernel frees its pages), never left open."""
    before = open_fds()
    file = tempfile.TemporaryFile()  # noqa: SIM115 (the SpooledBody closes it)
    file.truncate(size)  # sparse: the size without the writing
    body = SpooledBody(file)
    body.close()
    assert file.closed
    body.close()  # twice is harmless
    await wait_for(lambda: open_fds() <= before, what="the spool file's descriptors closed")
