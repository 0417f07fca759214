"""Streaming relay between a facade request and an upstream, in both directions.

The request body is relayed as it arrives (an audio upload is never collected whole) and the
answer is written back chunk by chunk (the first NDJSON line of an Ollama answer reaches the
client while Ollama is still generating). Status, headers (minus hop-by-hop) and body come back
unchanged, upstream 4xx/5xx included. aiohttp exceptions are translated here, at the boundary:
before the answer has started they become a BrokerError envelope; after it has started the
only honest signal left is to cut the client's connection, which is what happens.

Websockets are relayed too (`forward_websocket`): both directions, message by message, with the
client's query (ComfyUI's `clientId`) and close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import IO
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .errors import BrokerError, ClientDisconnected, ErrorCode

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 connection-specific fields, plus Host (set by the client library).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
CHUNK_BYTES = 64 * 1024
# Request headers the broker consumed itself (its own bearer token): never sent upstream.
CONSUMED: web.RequestKey[tuple[str, ...]] = web.RequestKey("mgpumanager.consumed", tuple)
# Set on the request once the answer has started: from then on an error can only cut it off.
PREPARED: web.RequestKey[bool] = web.RequestKey("mgpumanager.prepared", bool)
# Headers sent upstream in place of the client's (a same-site Origin made the upstream's own).
OVERRIDES: web.RequestKey[dict[str, str]] = web.RequestKey("mgpumanager.overrides", dict)


def upstream_url(base: str, path: str, raw_query: str = "") -> URL:
    """`base` + `path`, with the query string exactly as the client sent it."""
    text = base.rstrip("/") + path
    if raw_query:
        text += "?" + raw_query
    return URL(text, encoded=True)


def filter_headers(headers: Mapping[str, str], drop: Iterable[str] = ()) -> CIMultiDict[str]:
    dropped = HOP_BY_HOP | {d.lower() for d in drop}
    # A header named in Connection is hop-by-hop too.
    connection = headers.get("Connection", "")
    dropped |= {h.strip().lower() for h in connection.split(",") if h.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    items = headers.items()
    for name, value in items:
        if name.lower() not in dropped:
            out.add(name, value)
    return out


def check_declared_size(request: web.Request, max_body_bytes: int, consumer: str | None) -> None:
    length = request.content_length
    if length is not None and length > max_body_bytes:
        raise too_large(max_body_bytes, consumer)


def too_large(max_body_bytes: int, consumer: str | None) -> BrokerError:
    return BrokerError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"request body is larger than max_body_mib ({max_body_bytes // (1024 * 1024)} MiB)",
        consumer=consumer,
    )


def safe_path(raw_tail: str, below: str) -> str:
    """The raw (still percent-encoded) path below `below`, refused if any segment, decoded
    however many times, is `.`/`..` or hides a separator. It is forwarded exactly as sent."""
    for segment in raw_tail.split("/"):
        decoded, previous = segment, None
        while decoded != previous:  # %252e%252e decodes twice
            previous, decoded = decoded, unquote(decoded)
        if decoded in (".", "..") or any(c in decoded for c in "/\\\x00"):
            raise BrokerError(ErrorCode.BAD_REQUEST, f"path may not leave {below}")
    return raw_tail


class ReplayBody:
    """A request body whose head was read already (to find the model a multipart upload
    names): the head, spooled, then the rest of the client's stream as it arrives. `exact`:
    the head is sent byte for byte, so the client's Content-Length still holds (False once a
    field in it was rewritten)."""

    def __init__(self, head: IO[bytes], rest: aiohttp.StreamReader, *, exact: bool = True) -> None:
        self.head = head
        self.rest = rest
        self.exact = exact

    async def chunks(self) -> AsyncIterator[bytes]:
        self.head.seek(0)
        while chunk := self.head.read(CHUNK_BYTES):
            yield chunk
        async for chunk in self.rest.iter_chunked(CHUNK_BYTES):
            yield chunk

    def close(self) -> None:
        self.head.close()


Body = bytes | ReplayBody


class _BodyLimit:
    """Counts a streamed body. aiohttp wraps an exception raised inside a request body in its
    own ClientConnectionError, so the verdict is kept here, where the caller can read it."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self.exceeded = False

    async def relay(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in chunks:
            seen += len(chunk)
            if seen > self.max_body_bytes:
                self.exceeded = True
                raise ValueError("request body too large")
            yield chunk


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    *,
    base_url: str,
    method: str,
    path: str,
    consumer: str,
    max_body_bytes: int,
    body: Body | None = None,
) -> web.StreamResponse:
    """Relay `request` to `base_url + path` and stream the answer back to the client.

    `body`, when given, replaces the client's body: bytes (a surface or adapter that rewrote
    it: a ComfyUI prompt_id, an alias resolved) or a ReplayBody (its head read already);
    otherwise the client's body is streamed through as it arrives.
    """
    check_declared_size(request, max_body_bytes, consumer)
    url = upstream_url(base_url, path, request.rel_url.raw_query_string)
    drop = list(request.get(CONSUMED, ()))
    rewritten = isinstance(body, bytes) or (isinstance(body, ReplayBody) and not body.exact)
    if rewritten or "Content-Encoding" in request.headers:
        # A rewritten body has its own length; and aiohttp's server has already decompressed
        # a gzip/deflate body, so its encoding and length no longer describe what is sent.
        drop += ["content-length", "content-encoding"]
    headers = filter_headers(request.headers, drop=drop)
    headers.update(request.get(OVERRIDES, {}))
    limit = _BodyLimit(max_body_bytes)
    data: bytes | AsyncIterator[bytes] | None
    if isinstance(body, bytes):
        data = body
    elif body is not None:
        data = limit.relay(body.chunks())
    elif request.body_exists:
        data = limit.relay(request.content.iter_chunked(CHUNK_BYTES))
    else:
        data = None
    response: web.StreamResponse | None = None
    try:
        async with session.request(
            method,
            url,
            data=data,
            headers=headers,
            allow_redirects=False,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.update(filter_headers(upstream.headers))
            await response.prepare(request)
            request[PREPARED] = True
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError as exc:
                # Leaving the `async with` closes the upstream connection: the upstream request
                # is aborted, and the lease layer counts the job as cancelled.
                raise ClientDisconnected(f"client of {consumer} went away") from exc
            return response
    except ClientDisconnected:
        raise
    except asyncio.CancelledError:
        raise
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        if limit.exceeded and response is None:
            raise too_large(max_body_bytes, consumer) from None
        # ValueError: aiohttp's answer to a malformed upstream status line or header.
        error = translate_client_error(exc, consumer)
        if response is None:
            raise error from exc
        log.warning("%s: upstream failed mid-answer, cutting the client off: %s", consumer, exc)
        raise ConnectionResetError(error.message) from exc


# Handshake headers of the client's websocket: the upstream socket makes its own.
_WS_HANDSHAKE = (
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
    "sec-websocket-protocol",
)


def is_websocket(request: web.Request) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


async def forward_websocket(
    request: web.Request,
    session: aiohttp.ClientSession,
    *,
    base_url: str,
    path: str,
    consumer: str,
) -> web.StreamResponse:
    """Relay a websocket: connect upstream first (with the client's query, so ComfyUI's
    `clientId` reaches it), then accept the client and pass messages both ways until either
    side closes; the close code travels to the other side. Not GPU work: no lease."""
    url = upstream_url(base_url, path, request.rel_url.raw_query_string)
    headers = filter_headers(request.headers, drop=[*request.get(CONSUMED, ()), *_WS_HANDSHAKE])
    headers.update(request.get(OVERRIDES, {}))
    protocols = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    try:
        upstream = await session.ws_connect(
            url, headers=headers, protocols=protocols, max_msg_size=0, autoping=True
        )
    except aiohttp.WSServerHandshakeError as exc:
        # The upstream refused the upgrade (404, 403...): the client gets that status.
        return web.Response(status=exc.status, text=exc.message or "")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise translate_client_error(exc, consumer) from exc
    try:
        chosen = [upstream.protocol] if upstream.protocol else []
        client = web.WebSocketResponse(protocols=chosen, max_msg_size=0, autoping=True)
        await client.prepare(request)
        request[PREPARED] = True
        to_upstream = asyncio.ensure_future(_pump(client, upstream))
        to_client = asyncio.ensure_future(_pump(upstream, client))
        try:
            done, _ = await asyncio.wait(
                [to_upstream, to_client], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (to_upstream, to_client):
                task.cancel()
            await asyncio.gather(to_upstream, to_client, return_exceptions=True)
        # Whoever closed first: the other side gets its close code.
        closer, other = (client, upstream) if to_upstream in done else (upstream, client)
        code = closer.close_code or aiohttp.WSCloseCode.OK
        if code in (1005, 1006, 1015):
            code = aiohttp.WSCloseCode.GOING_AWAY  # reserved codes may not be sent
        with contextlib.suppress(ConnectionError, RuntimeError):
            await other.close(code=code)
        return client
    finally:
        await upstream.close()


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    """Copy messages from `source` to `sink` until `source` closes."""
    async for msg in source:
        if msg.type is aiohttp.WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is aiohttp.WSMsgType.ERROR:
            return


def translate_client_error(exc: BaseException, consumer: str) -> BrokerError:
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return BrokerError(
            ErrorCode.CONSUMER_UNREACHABLE,
            f"cannot connect to {consumer}: {exc}",
            consumer=consumer,
        )
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return BrokerError(
            ErrorCode.UPSTREAM_TIMEOUT, f"{consumer} timed out: {exc}", consumer=consumer
        )
    return BrokerError(
        ErrorCode.UPSTREAM_ERROR,
        f"{consumer} broke off or answered garbage: {type(exc).__name__}: {exc}",
        consumer=consumer,
    )
