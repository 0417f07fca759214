"""Streaming relay between a facade request and an upstream, in both directions.

The request body is relayed as it arrives (an audio upload is never collected whole) and the
answer is written back chunk by chunk (the first NDJSON line of an Ollama answer reaches the
client while Ollama is still generating). Status, headers (minus hop-by-hop) and body come back
unchanged, upstream 4xx/5xx included. aiohttp exceptions are translated here, at the boundary:
before the answer has started they become a BrokerError envelope; after it has started the
only honest signal left is to cut the client's connection, which is what happens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping

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


class _BodyLimit:
    """Counts a streamed body. aiohttp wraps an exception raised inside a request body in its
    own ClientConnectionError, so the verdict is kept here, where the caller can read it."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self.exceeded = False

    async def relay(self, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in content.iter_chunked(CHUNK_BYTES):
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
    body: bytes | None = None,
) -> web.StreamResponse:
    """Relay `request` to `base_url + path` and stream the answer back to the client.

    `body`, when given, replaces the client's body (adapters that must rewrite it, e.g. a
    ComfyUI prompt_id); otherwise the client's body is streamed through as it arrives.
    """
    check_declared_size(request, max_body_bytes, consumer)
    url = upstream_url(base_url, path, request.rel_url.raw_query_string)
    drop = list(request.get(CONSUMED, ()))
    if body is not None or "Content-Encoding" in request.headers:
        # A rewritten body has its own length; and aiohttp's server has already decompressed
        # a gzip/deflate body, so its encoding and length no longer describe what is sent.
        drop += ["content-length", "content-encoding"]
    headers = filter_headers(request.headers, drop=drop)
    limit = _BodyLimit(max_body_bytes)
    data: bytes | AsyncIterator[bytes] | None
    if body is not None:
        data = body
    elif request.body_exists:
        data = limit.relay(request.content)
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
