"""Relay between a facade request and an upstream, in both directions.

The request body is sent as the broker has it: bytes a surface rewrote, a `SpooledBody` (a job's
body is received whole before it takes the lease), or, for a request that is no GPU work, the
client's stream as it arrives. The answer is read from the upstream at the upstream's pace into
an `AnswerBuffer` (memory, then a temporary file) while a task of its own writes it to the
client at the client's pace (`Delivery`): `forward` returns once the upstream is done, so the
lease never waits for a slow reader, and a client that keeps up still gets every chunk as it
comes (the first NDJSON line of an Ollama answer while Ollama is still generating). The
facade's outermost middleware waits for the delivery (`finish_delivery`) before the handler
ends. A client that takes nothing for `client_idle_s` is dropped.

Status, headers (minus hop-by-hop) and body come back unchanged, upstream 4xx/5xx included.
aiohttp exceptions are translated here, at the boundary: before the answer has started they
become a BrokerError envelope; after it has started the only honest signal left is to cut the
client's connection (after what had arrived), which is what happens. A client that leaves is
ClientDisconnected, never an upstream failure.

Websockets are relayed too (`forward_websocket`): both directions, message by message, with the
client's query (ComfyUI's `clientId`) and close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from urllib.parse import unquote

import aiohttp
from aiohttp import StreamReader, web
from multidict import CIMultiDict
from yarl import URL

from mgpumanager.errors import BrokerError, ClientDisconnected, ErrorCode
from mgpumanager.relay.context import context
from mgpumanager.relay.spool import AnswerBuffer, SpooledBody, read_client, too_large

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
# An answer up to this size, with its length declared, is read whole and sent in one write.
SMALL_ANSWER_BYTES = 64 * 1024


def client_idle_s(request: web.Request) -> float:
    """How long `request`'s client may send or take nothing (the registry's client_idle_s)."""
    return context(request).client_idle_s


def upstream_url(base: str, path: str, raw_query: str = "") -> URL:
    """`base` + `path`, with the query string exactly as the client sent it."""
    text = base.rstrip("/") + path
    if raw_query:
        text += "?" + raw_query
    return URL(text, encoded=True)


def filter_headers(headers: Mapping[str, str], drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """`headers` without the hop-by-hop ones, those named in Connection, and `drop`."""
    out: CIMultiDict[str] = CIMultiDict(headers)
    for name in HOP_BY_HOP:
        if name in out:  # most are absent: a look-up is cheaper than popall's default
            del out[name]
    for name in drop:
        out.popall(name, None)
    connection = headers.get("Connection")
    if connection:  # a header named in Connection is hop-by-hop too
        for name in connection.split(","):
            out.popall(name.strip(), None)
    return out


def check_declared_size(request: web.Request, max_body_bytes: int, consumer: str | None) -> None:
    length = request.content_length
    if length is not None and length > max_body_bytes:
        raise too_large(max_body_bytes, consumer)


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


Body = bytes | SpooledBody


async def client_chunks(
    stream: StreamReader, idle_s: float, consumer: str | None
) -> AsyncIterator[bytes]:
    """The client's body as it arrives, each piece within `idle_s`."""
    while chunk := await read_client(stream, idle_s, consumer):
        yield chunk


class _ClientBody:
    """Counts a body sent upstream as it goes. aiohttp wraps an exception raised inside a
    request body in its own ClientConnectionError, so the verdict (too large, the client went
    quiet or away) is kept here, where the caller can read it."""

    def __init__(self, max_body_bytes: int | None, consumer: str) -> None:
        self.max_body_bytes = max_body_bytes
        self.consumer = consumer
        self.error: BrokerError | ClientDisconnected | None = None

    async def relay(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        seen = 0
        try:
            async for chunk in chunks:
                seen += len(chunk)
                if self.max_body_bytes is not None and seen > self.max_body_bytes:
                    raise too_large(self.max_body_bytes, self.consumer)
                yield chunk
        except (BrokerError, ClientDisconnected) as exc:
            self.error = exc
            raise


class Delivery:
    """Writes an answer to the client from its AnswerBuffer, in a task of its own, each write
    within `idle_s`: a client that takes nothing for that long is dropped."""

    def __init__(
        self, request: web.Request, response: web.StreamResponse, idle_s: float, consumer: str
    ) -> None:
        self.request = request
        self.response = response
        self.idle_s = idle_s
        self.consumer = consumer
        self.buffer = AnswerBuffer()
        self.task = asyncio.create_task(self._write(), name=f"answer of {consumer}")
        self.task.add_done_callback(_retrieve)

    @classmethod
    async def start(
        cls, request: web.Request, response: web.StreamResponse, idle_s: float, consumer: str
    ) -> Delivery:
        """Send the status line and headers, then deliver the body as it is put."""
        try:
            async with asyncio.timeout(idle_s):
                await response.prepare(request)
        except TimeoutError:
            raise _dropped(request, consumer, idle_s) from None
        except ConnectionError as exc:
            raise ClientDisconnected(f"the client of {consumer} went away") from exc
        state = context(request)
        state.prepared = True
        delivery = state.delivery = cls(request, response, idle_s, consumer)
        return delivery

    async def _write(self) -> None:
        try:
            while (chunk := await self.buffer.get()) is not None:
                async with asyncio.timeout(self.idle_s):
                    await self.response.write(chunk)
            if not self.buffer.failed:  # a failed answer is cut off by the handler
                async with asyncio.timeout(self.idle_s):
                    await self.response.write_eof()
        except TimeoutError:
            raise _dropped(self.request, self.consumer, self.idle_s) from None
        except ConnectionError as exc:
            log.info("the client of %s went away before its answer ended", self.consumer)
            raise ClientDisconnected(f"the client of {self.consumer} went away") from exc
        finally:
            self.buffer.close()


def _dropped(request: web.Request, consumer: str, idle_s: float) -> ClientDisconnected:
    """Drop a client that took nothing for `idle_s`: abort its connection (closing would wait
    for it to read what is queued)."""
    log.info("the client of %s took nothing for client_idle_s (%g s): dropped", consumer, idle_s)
    if request.transport is not None:
        request.transport.abort()
    return ClientDisconnected(f"the client of {consumer} took nothing for {idle_s:g} s")


def _retrieve(task: asyncio.Task[None]) -> None:
    """A delivery's failure is read by finish_delivery, or by nobody when the handler was
    cancelled: never reported as an exception nobody retrieved."""
    if not task.cancelled():
        task.exception()


async def finish_delivery(request: web.Request) -> None:
    """Wait until the answer `forward` started has been written (or cut off after what had
    arrived, where the upstream broke off). ClientDisconnected if the client went away or was
    dropped. Cancelling the caller cancels the delivery."""
    delivery = context(request).delivery
    if delivery is not None:
        await delivery.task


def abandon_delivery(request: web.Request) -> None:
    """Stop writing an answer whose client is gone."""
    delivery = context(request).delivery
    if delivery is not None:
        delivery.task.cancel()


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    *,
    base_url: str,
    method: str,
    path: str,
    consumer: str,
    max_body_bytes: int | None,
    body: Body | None = None,
) -> web.StreamResponse:
    """Relay `request` to `base_url + path`; return once the upstream's answer has been read
    to its end (the client may still be taking it: `finish_delivery`).

    `body`, when given, replaces the client's body: bytes (a surface or adapter that rewrote
    it: a ComfyUI prompt_id, an alias resolved) or a SpooledBody (received whole, or its head
    read already); otherwise the client's body is streamed through as it arrives.

    `max_body_bytes` bounds what is still read from the client (its declared size is checked
    here, where that reading starts); None: the body was received whole before (a job's).
    """
    if body is None and request.body_exists:
        if max_body_bytes is None:
            raise RuntimeError("a job's body is received whole before it is relayed")
        check_declared_size(request, max_body_bytes, consumer)
    idle_s = client_idle_s(request)
    url = upstream_url(base_url, path, request.rel_url.raw_query_string)
    state = context(request)
    drop = list(state.consumed)
    whole = isinstance(body, SpooledBody) and body.rest is None
    rewritten = isinstance(body, bytes) or (isinstance(body, SpooledBody) and not body.exact)
    if whole or rewritten or "Content-Encoding" in request.headers:
        # A body held or rewritten has its own length; and aiohttp's server has already
        # decompressed a gzip/deflate body, so its encoding and length no longer describe
        # what is sent.
        drop += ["content-length", "content-encoding"]
    headers = filter_headers(request.headers, drop=drop)
    headers.update(state.overrides)
    source = _ClientBody(max_body_bytes, consumer)
    data: bytes | AsyncIterator[bytes] | None
    if isinstance(body, bytes):
        data = body
    elif body is not None:
        if whole:
            headers["Content-Length"] = str(body.size)  # upstreams need not take chunked
        data = source.relay(body.chunks(idle_s, consumer))
    elif request.body_exists:
        data = source.relay(client_chunks(request.content, idle_s, consumer))
    else:
        data = None
    delivery: Delivery | None = None
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
            if _small(request, upstream):
                # Read whole and sent with its headers in one write once the handler returns:
                # it fits in the socket's buffer, so no reader's pace can hold the lease (a
                # write that waits lets the job's deferred finish run), and no delivery task
                # is needed.
                return web.Response(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers=filter_headers(upstream.headers),
                    body=await upstream.read(),
                )
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.update(filter_headers(upstream.headers))
            delivery = await Delivery.start(request, response, idle_s, consumer)
            try:
                async for chunk in upstream.content.iter_any():
                    delivery.buffer.put(chunk)
                    if delivery.task.done() and not delivery.task.cancelled():
                        delivery.task.result()  # the client went away or was dropped
                    if delivery.buffer.spilling:
                        # The client's writer is behind: give it its turn before reading on
                        # (reading what is already here never yields). A client that keeps up
                        # then takes the answer from memory; one that does not costs the
                        # upstream one loop turn per piece, never a wait.
                        await asyncio.sleep(0)
            except BaseException:
                # Leaving the `async with` closes the upstream connection (a cancelled job
                # aborts the upstream request); the client gets what came, then is cut off.
                delivery.buffer.fail()
                raise
            delivery.buffer.end()
            return response
    except (ClientDisconnected, asyncio.CancelledError):
        raise
    except UPSTREAM_FAILURES as exc:
        if source.error is not None and delivery is None:
            raise source.error from None
        # ValueError: aiohttp's answer to a malformed upstream status line or header.
        error = translate_client_error(exc, consumer)
        if delivery is None:
            raise error from exc
        log.warning("%s: upstream failed mid-answer, cutting the client off: %s", consumer, exc)
        raise ConnectionResetError(error.message) from exc


def _small(request: web.Request, upstream: aiohttp.ClientResponse) -> bool:
    """An answer short enough to read whole: its length declared and at most
    SMALL_ANSWER_BYTES, with a body to send (never to HEAD, never a 1xx/204/304)."""
    length = upstream.content_length
    return (
        length is not None
        and length <= SMALL_ANSWER_BYTES
        and request.method != "HEAD"
        and upstream.status >= 200
        and upstream.status not in (204, 304)
    )


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
    state = context(request)
    headers = filter_headers(request.headers, drop=[*state.consumed, *_WS_HANDSHAKE])
    headers.update(state.overrides)
    protocols = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    with map_upstream_errors(consumer):
        try:
            upstream = await session.ws_connect(
                url, headers=headers, protocols=protocols, max_msg_size=0, autoping=True
            )
        except aiohttp.WSServerHandshakeError as exc:
            # The upstream refused the upgrade (404, 403...): the client gets that status.
            return web.Response(status=exc.status, text=exc.message or "")
    try:
        chosen = [upstream.protocol] if upstream.protocol else []
        client = web.WebSocketResponse(protocols=chosen, max_msg_size=0, autoping=True)
        await client.prepare(request)
        state.prepared = True
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


# What aiohttp raises for an upstream that cannot be reached, breaks off or answers garbage
# (ValueError: a malformed status line or header; TimeoutError is an OSError).
UPSTREAM_FAILURES = (aiohttp.ClientError, OSError, ValueError)


@contextlib.contextmanager
def map_upstream_errors(consumer: str) -> Iterator[None]:
    """Inside: a failure of the upstream `consumer` leaves as the BrokerError that says so."""
    try:
        yield
    except UPSTREAM_FAILURES as exc:
        raise translate_client_error(exc, consumer) from exc


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
