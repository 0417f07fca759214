"""Secrets stay out of /v1/status, /metrics and the log; hostile Authorization headers get the
envelope; named tokens say who called and cap the X-Priority they may ask for. A real broker
on a loopback port 0 in front of real upstreams; raw sockets where a client library would
refuse to send the bytes."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import HttpRequestParser
from aiohttp.test_utils import make_mocked_request
from yarl import URL

from conftest import Upstream, consumer, make_config, running_broker, wait_for
from mgpumanager.api.jobs import requested_priority
from mgpumanager.broker import BROKER, Broker
from mgpumanager.registry import Caller
from mgpumanager.relay.context import context
from mgpumanager.relay.redaction import RedactSecrets, redact_text

TOKEN = "s3cret-T0ken"


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback port bound (so no one else takes it) but never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def raw_exchange(base_url: str, request: bytes) -> tuple[int, bytes]:
    """Send `request` as it is on a fresh connection; the status and body of the answer."""
    url = URL(base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the log handlers would write, tracebacks included."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


# -- credentials in consumer URLs --------------------------------------------------------------


async def test_url_credentials_never_reach_status_metrics_or_logs(
    upstream: Upstream,
    client: aiohttp.ClientSession,
    refused_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str | None] = []

    async def synthesize(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"ok": True})

    upstream.route("POST", "/api/synthesize", synthesize)
    await upstream.start()
    with_credentials = upstream.url.replace("http://", "http://ops:pa55w0rd@")
    dead = refused_url.replace("http://", "http://ops:pa55w0rd@")
    config = make_config(
        {"mvoice": consumer(with_credentials), "dead": consumer(dead)},
        routing={"tts": "mvoice", "stt": "dead"},
    )
    async with running_broker(config) as server:
        await wait_for(lambda: not server.broker.health.states["dead"].ok, what="dead probed")
        async with client.post(f"{server.url}/v1/tts", json={}) as resp:
            assert resp.status == 200
        async with client.post(f"{server.url}/v1/stt", data=b"x") as resp:
            failed = await resp.text()
            assert resp.status >= 500
        async with client.get(f"{server.url}/v1/status") as resp:
            status = await resp.text()
        async with client.get(f"{server.url}/metrics") as resp:
            metrics = await resp.text()
    shown = json.loads(status)["consumers"]
    assert shown["mvoice"]["url"] == upstream.url.replace("http://", "http://***@")
    assert shown["dead"]["url"] == refused_url.replace("http://", "http://***@")
    assert seen and seen[0] is not None and seen[0].startswith("Basic ")  # still used upstream
    for text in (status, metrics, failed, logged(caplog)):
        assert "pa55w0rd" not in text
        assert "ops:" not in text


# -- hostile Authorization headers -------------------------------------------------------------


async def test_non_ascii_bearer_bytes_get_the_401_envelope(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, auth={"token": TOKEN})
    async with running_broker(config) as server:
        for value in (b"Bearer \xff\xfe", f"Bearer {TOKEN}\xe9".encode("latin-1")):
            status, body = await raw_exchange(
                server.url,
                b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                b"Authorization: " + value + b"\r\n\r\n",
            )
            assert status == 401
            assert json.loads(body)["error"] == "unauthorized"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], logged(caplog)


async def test_a_token_followed_by_a_nul_byte_never_reaches_the_log(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, auth={"token": TOKEN})
    async with running_broker(config) as server:
        status, _ = await raw_exchange(
            server.url,
            b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\x00\r\n\r\n",
        )
    assert status == 400
    assert TOKEN not in logged(caplog)


async def test_the_filter_redacts_what_aiohttps_parser_quotes() -> None:
    """The record aiohttp writes for that request, built from the parser's own exception: the
    filter leaves the log line, less the token."""
    parser = HttpRequestParser(None, asyncio.get_running_loop(), 2**16)
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\x00\r\n\r\n"
    with pytest.raises(BadHttpMessage) as info:
        parser.feed_data(raw)
    assert TOKEN in str(info.value)  # what would have been logged
    record = logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("127.0.0.1",),
        (BadHttpMessage, info.value, info.value.__traceback__),
    )
    assert RedactSecrets().filter(record)
    text = logging.Formatter().format(record)
    assert TOKEN not in text
    assert "Error handling request from 127.0.0.1" in text
    assert "Authorization: <redacted>" in text


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("b'Authorization: Bearer abc\\x00'", "b'Authorization: <redacted>"),
        ("proxy-authorization:Basic dXNlcjpwdw==", "proxy-authorization:<redacted>"),
        ("Cookie: session=1; token=2", "Cookie: <redacted>"),
        ("got bearer abc.def-ghi here", "got bearer <redacted> here"),
        ("GET http://ops:pw@host/x", "GET http://<redacted>@host/x"),
        ("Authorization\\x00: Bearer abc", "Authorization\\x00: Bearer <redacted>"),
        ("nothing secret: /v1/tts 200", "nothing secret: /v1/tts 200"),
    ],
)
def test_redact_text(text: str, clean: str) -> None:
    assert redact_text(text) == clean


# -- named tokens ------------------------------------------------------------------------------

TOKENS = {
    "tokens": [
        {"name": "ops", "token": "ops-t0ken"},
        {"name": "batch", "token": "batch-t0ken", "max_priority": 1},
    ]
}


async def test_named_tokens_each_open_the_door(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    await upstream.start()
    config = make_config(
        {"mvoice": consumer(upstream.url)}, auth={**TOKENS, "token": "single-t0ken"}
    )
    async with running_broker(config) as server:
        for token, expected in (
            ("ops-t0ken", 200),
            ("batch-t0ken", 200),
            ("single-t0ken", 200),
            ("ops-t0ke", 401),
            ("ops-t0kenX", 401),
            ("", 401),
        ):
            headers = {"Authorization": f"Bearer {token}"}
            async with client.get(f"{server.url}/v1/status", headers=headers) as resp:
                assert resp.status == expected, token
        async with client.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200


def test_x_priority_is_capped_by_the_callers_max_priority() -> None:
    config = make_config(
        {"mvoice": consumer("http://127.0.0.1:1")},
        scheduler={"allow_priority_header": True},
        auth=TOKENS,
    )
    app = web.Application()
    app[BROKER] = Broker(config)

    def asked(value: str | None, caller: Caller | None) -> int | None:
        headers = {} if value is None else {"X-Priority": value}
        request = make_mocked_request("POST", "/v1/tts", headers=headers, app=app)
        if caller is not None:
            context(request).caller = caller
        return requested_priority(request)

    batch, ops = Caller("batch", 1), Caller("ops", 4)
    assert asked("4", batch) == 1
    assert asked("0", batch) == 0
    assert asked("9", ops) == 4
    assert asked("3", None) == 3  # no tokens configured: clamped only
    assert asked(None, batch) is None  # no header: the consumer's own priority


async def test_a_capped_token_cannot_jump_the_queue(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """batch asks for 4 but may have 1; ops asks for 2. Queued behind a running job, ops's job
    runs first although batch's came first."""
    entered, release = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    async def synthesize(request: web.Request) -> web.Response:
        who = (await request.json())["who"]
        order.append(who)
        if who == "first":
            entered.set()
            await release.wait()
        return web.json_response({"who": who})

    upstream.route("POST", "/api/synthesize", synthesize)
    await upstream.start()
    config = make_config(
        {"mvoice": consumer(upstream.url)},
        routing={"tts": "mvoice"},
        scheduler={"allow_priority_header": True},
        auth=TOKENS,
    )

    async def job(who: str, token: str, priority: str) -> int:
        headers = {"Authorization": f"Bearer {token}", "X-Priority": priority}
        async with client.post(f"{server.url}/v1/tts", json={"who": who}, headers=headers) as r:
            return r.status

    async with running_broker(config) as server:
        first = asyncio.create_task(job("first", "ops-t0ken", "2"))
        await asyncio.wait_for(entered.wait(), 10)
        batch = asyncio.create_task(job("batch", "batch-t0ken", "4"))
        await wait_for(lambda: server.broker.lease.core.queue_depth == 1, what="batch queued")
        ops = asyncio.create_task(job("ops", "ops-t0ken", "2"))
        await wait_for(lambda: server.broker.lease.core.queue_depth == 2, what="ops queued")
        # The queue says who sent each job (the token's name), as /v1/status and events do.
        waiting = [j.label for j in server.broker.status().scheduler.waiting]
        assert waiting == ["/v1/tts (batch)", "/v1/tts (ops)"], waiting
        release.set()
        assert list(await asyncio.gather(first, batch, ops)) == [200, 200, 200]
    assert order == ["first", "ops", "batch"]


# -- serving beyond loopback -------------------------------------------------------------------


def test_serve_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    registry = tmp_path / "open.yaml"
    registry.write_text(
        "listen: 0.0.0.0:0\n"
        "gpu: {backend: static, total_mib: 24576}\n"
        "consumers:\n"
        "  mvoice: {url: 'http://127.0.0.1:1', vram_resident_mib: 1000}\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mgpumanager.cli", "serve", "--config", str(registry)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert run.returncode == 2
    assert "listen (line 1)" in run.stderr
    assert "auth.allow_unauthenticated: true" in run.stderr
    assert "Traceback" not in run.stderr


# -- identifiers from clients in upstream URLs -------------------------------------------------


def test_a_model_id_never_leaves_its_route_on_speaches() -> None:
    from mgpumanager.errors import BrokerError
    from mgpumanager.upstreams.adapters.speaches import model_path

    assert model_path("Systran/faster-whisper-small", "s") == "Systran/faster-whisper-small"
    assert model_path("a b?c#d%", "s") == "a%20b%3Fc%23d%25"
    for hostile in ("../../free", "a/./b", "a//b", "/abs", ".."):
        with pytest.raises(BrokerError) as refused:
            model_path(hostile, "s")
        assert refused.value.status == 400


async def test_a_blob_digest_may_not_leave_its_route(upstream: Upstream) -> None:
    async def blob(request: web.Request) -> web.Response:
        return web.Response(status=201)

    upstream.route("POST", "/api/blobs/{digest}", blob)
    await upstream.start()
    config = make_config({"ollama": consumer(upstream.url, type="ollama")})
    async with running_broker(config) as server:
        async with aiohttp.ClientSession() as session:
            ok = URL(f"{server.url}/api/blobs/sha256:abc", encoded=True)
            async with session.post(ok, data=b"x") as resp:
                assert resp.status == 201
            for hostile in ("%2e%2e", "%252e%252e", "..%2fdelete"):
                url = URL(f"{server.url}/api/blobs/{hostile}", encoded=True)
                async with session.post(url, data=b"x") as resp:
                    assert resp.status == 400, hostile
                    assert (await resp.json())["code"] == "bad_request"
        assert [r.path for r in upstream.requests] == ["/api/blobs/sha256:abc"]
