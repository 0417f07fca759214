"""Running an app on a real loopback socket, and waiting for a condition without sleeping blind.

The one place the fakes, the tests, the benchmarks and the scripts get these from.

``serve_app`` binds (port 0 by default) and reads the real port back from the runner, so nothing
ever guesses a free port. Apps run with ``handler_cancellation=True`` by default: a client that
disconnects cancels its handler, as with a production aiohttp/uvicorn server. A server in
another process gets its socket from ``bind_loopback`` in the parent (bound to port 0 and kept
open, so the port is known before the child starts and nobody else can take it meanwhile).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web


class RunningApp:
    """An aiohttp app serving on ``url`` until :meth:`aclose`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def aclose(self) -> None:
        await self.runner.cleanup()


def bind_loopback(host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on ``host``, port 0 (any free port): read the port with
    ``getsockname()``, hand the socket to ``serve_app(sock=...)`` or to a child process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_app(
    app: web.Application,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    sock: socket.socket | None = None,
    handler_cancellation: bool = True,
    shutdown_timeout_s: float = 2.0,
) -> RunningApp:
    """Start ``app`` on ``host:port`` (0 = any free port), or on ``sock`` (bound already), and
    return it running."""
    runner = web.AppRunner(
        app,
        handler_cancellation=handler_cancellation,
        shutdown_timeout=shutdown_timeout_s,
        access_log=None,
    )
    await runner.setup()
    try:
        site: web.BaseSite = (
            web.TCPSite(runner, host, port) if sock is None else web.SockSite(runner, sock)
        )
        await site.start()
        addresses = runner.addresses
        if not addresses:
            raise RuntimeError(f"no listening socket for {host}:{port}")
        bound_host, bound_port = str(addresses[0][0]), int(addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return RunningApp(runner, host if sock is None else bound_host, bound_port)


@asynccontextmanager
async def serving(
    app: web.Application, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningApp]:
    """``async with serving(fake.app) as server:`` ... ``server.url``; closed on exit."""
    server = await serve_app(app, host=host, port=port)
    try:
        yield server
    finally:
        await server.aclose()


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.005,
    what: str = "",
) -> None:
    """Poll ``condition`` (sync or async) until it holds; raise TimeoutError naming ``what``
    after ``timeout_s``. Waiting on a condition with a deadline, never a bare sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what or condition}")
        await asyncio.sleep(interval_s)
