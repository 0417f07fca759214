"""Every listener's connections: bounded in number and in the time to their request head, and
answered in the envelope when what arrives is not a request aiohttp can parse.

aiohttp's server has none of this by default: no deadline for a request head (a client
trickling header lines holds its descriptor for an hour), no cap on connections (enough of them
exhaust the process's descriptors; then every accept fails, and logs), and a request its parser
refuses is answered in plain text quoting the request's bytes, with an ERROR traceback each
time — a log flood anyone can cause. `guard_runner(runner, guard)` changes that for every site
of a runner, so each listener of the daemon (one `ConnectionGuard` shared by all: descriptors
are the process's) gets the same:

- **header deadline** (`header_timeout_s`): a connection must deliver a whole request head
  within that many seconds of opening, or of its previous answer; otherwise it is closed
  (aiohttp's keep-alive timer, which closes a connection still waiting for its next request);
- **connection cap** (`max_connections`, lowered to what the file limit allows): one more
  connection is answered 503 `too_many_connections` with `Retry-After` and closed, without
  reading its request;
- **protocol errors** (bad method, duplicate Content-Length, Content-Length with
  Transfer-Encoding, an over-long line, NUL in the path...): 400 `bad_request` in the envelope,
  naming the kind of fault and never quoting the bytes, and one WARNING line;
- an `Expect` other than `100-continue`: 400 `bad_request` (aiohttp's 417 quotes the header);
- a handler that ends with ConnectionError (a client that left, an answer cut off on purpose)
  ends its connection without a traceback: the place that cut it said why, in one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler

from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import Config
from mgpumanager.relay.logs import shown
from mgpumanager.relay.responses import error_response

log = logging.getLogger(__name__)

# Descriptors a connection may hold: the client's socket, the upstream's, a spooled body or
# answer. And what the process needs besides (the listening sockets, health probes, logs).
FDS_PER_CONNECTION = 3
RESERVED_FDS = 64
# How long a refused connection is kept to let its 503 reach the client before the request
# it sent makes the kernel reset the connection.
REFUSED_LINGER_S = 2.0

# What a refused request was, by parser exception (most specific first): named, never quoted.
_FAULTS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "a line of the request head is too long"),
    (BadHttpMethod, "bad method"),
    (BadStatusLine, "bad request line"),
    (InvalidURLError, "bad request target"),
    (InvalidHeader, "bad header"),
    (TransferEncodingError, "bad Transfer-Encoding"),
    (ContentLengthError, "bad Content-Length"),
    (PayloadEncodingError, "bad body encoding"),
)


# The parser's own reason for the rest ("Duplicate Content-Length", "Transfer-Encoding can't
# be present with Content-Length", "Invalid character in chunk size"): the fixed text before
# the quoted bytes, used only when it is plainly that.
_REASON = re.compile(r"[A-Za-z][A-Za-z '.-]{2,80}")


def fault_of(exc: BaseException | None) -> str:
    for kind, what in _FAULTS:
        if isinstance(exc, kind):
            return what
    if isinstance(exc, HttpProcessingError):
        reason, quoted, _ = exc.message.partition(":\n\n")  # llhttp's "reason:\n\n  bytes"
        if quoted and _REASON.fullmatch(reason.strip()):
            return reason.strip()
    return "malformed request"


def file_limit() -> int | None:
    """The process's soft limit on open files; None: unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_file_limit() -> int | None:
    """Raise the soft open-file limit to the hard one (what a daemon may use without asking):
    a shell's default of 1024 would cap the daemon at a few hundred connections. Answers the
    limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return file_limit()


class ConnectionGuard:
    """The limits of every listener of one daemon, read from the registry in force (a SIGHUP
    applies them to new connections), and the count of connections open across them."""

    def __init__(self, config: Callable[[], Config], files: int | None = None) -> None:
        self._config = config
        self.files = file_limit() if files is None else files
        self.open = 0
        self.refused = 0
        self.peak = 0

    @property
    def max_connections(self) -> int:
        """`max_connections`, or fewer where the open-file limit could not serve that many."""
        cap = self._config().max_connections
        if self.files is not None:
            cap = min(cap, max(1, (self.files - RESERVED_FDS) // FDS_PER_CONNECTION))
        return cap

    @property
    def header_timeout_s(self) -> float:
        return self._config().header_timeout_s

    def refusal(self) -> bytes:
        cap = self.max_connections
        err = BrokerError(
            ErrorCode.TOO_MANY_CONNECTIONS,
            f"{cap} client connections are open already (max_connections); try again shortly",
        )
        body = json.dumps(err.envelope()).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Retry-After: 1\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode() + body


class GuardedHandler(RequestHandler):
    """aiohttp's connection protocol with the guard's cap, and its errors in the envelope."""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._refused: asyncio.Transport | None = None
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open >= guard.max_connections:
            guard.refused += 1
            log.warning(
                "connection refused: %d open already (max_connections)", guard.max_connections
            )
            refused = cast(asyncio.Transport, transport)
            refused.write(guard.refusal())
            self._refused = refused
            self._linger = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, refused.abort)
            # Its request, or its end, closes it (the 503 goes first). Set on this connection
            # only: every other one keeps aiohttp's own methods, with no check in between.
            self.data_received = self._close_refused  # type: ignore[method-assign]
            self.eof_received = self._close_refused  # type: ignore[method-assign]
            return
        guard.open += 1
        guard.peak = max(guard.peak, guard.open)
        super().connection_made(transport)

    def _close_refused(self, data: bytes = b"") -> None:
        assert self._refused is not None
        self._refused.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused is not None:
            if self._linger is not None:
                self._linger.cancel()
            self._refused = None
            return
        self._guard.open -= 1
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's own "Unhandled exception" (a body it cannot decode, found while it drains
        one the handler did not read): one line, the traceback only at DEBUG."""
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError | HttpProcessingError | ConnectionError):
            log.warning(
                "dropped a connection: its request body was malformed (%s)",
                fault_of(exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc),
            )
        else:
            name = type(exc).__name__ if isinstance(exc, BaseException) else "error"
            log.error("connection failed: %s: %s", name, shown(str(exc)))
        log.debug("traceback", exc_info=exc if isinstance(exc, BaseException) else None)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):
            # A client that left, or an answer cut off on purpose: nothing can be answered,
            # and the place that cut it has logged why. Ends the connection quietly.
            raise ConnectionResetError("connection ended") from None
        if status == 400 or isinstance(exc, HttpProcessingError):
            fault = fault_of(exc)
            log.warning("refused a malformed request from %s: %s", request.remote, fault)
            err = BrokerError(ErrorCode.BAD_REQUEST, f"malformed HTTP request: {fault}")
        else:
            # A handler that raised what nothing translated: a bug. One line, its type and
            # text; the traceback only at DEBUG.
            log.error(
                "%s %s failed: %s: %s",
                request.method,
                shown(request.path),
                type(exc).__name__,
                shown(str(exc)),
            )
            log.debug("traceback", exc_info=exc)
            err = BrokerError(ErrorCode.SCHEDULER_ERROR, "internal error (a bug: please report)")
        if request.writer.output_size > 0:
            raise ConnectionResetError("the answer had started") from None
        response = error_response(err)
        response.force_close()
        return response


class _GuardedServer(web.Server):
    """aiohttp's web.Server whose connections are GuardedHandlers."""

    guard: ConnectionGuard

    def __call__(self) -> RequestHandler:
        kwargs = {**self._kwargs, "keepalive_timeout": self.guard.header_timeout_s}
        return GuardedHandler(self, guard=self.guard, loop=self._loop, **kwargs)


def guard_runner(runner: web.BaseRunner, guard: ConnectionGuard) -> None:
    """Apply `guard` to every site of `runner` (after `runner.setup()`, before its sites
    start): aiohttp builds its web.Server inside setup(), so that server's class becomes one
    whose protocol factory makes GuardedHandlers."""
    server = runner.server
    if server is None:
        raise RuntimeError("guard_runner needs runner.setup() first")
    server.__class__ = _GuardedServer
    guarded = cast(_GuardedServer, server)
    guarded.guard = guard
    guarded.request_handler = _plain_expect(guarded.request_handler)


def _plain_expect(
    handler: Callable[[web.BaseRequest], Any],
) -> Callable[[web.BaseRequest], Any]:
    """Refuse an Expect other than 100-continue before routing: aiohttp's own refusal is a
    plain-text 417 that quotes the header, raised outside every middleware."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            log.warning("refused a request from %s: unsupported Expect", request.remote)
            response = error_response(
                BrokerError(ErrorCode.BAD_REQUEST, "Expect may only be 100-continue")
            )
            response.force_close()  # its body, if any, is not read
            return response
        result: web.StreamResponse = await handler(request)
        return result

    return handle
