"""Running a fake on a real loopback socket, and waiting for a condition without sleeping blind.

``serve_app`` binds (port 0 by default) and reads the real port back from the runner, so nothing
ever guesses a free port. Apps run with ``handler_cancellation=True``: a client that disconnects
cancels its handler, as with a production aiohttp/uvicorn server.
"""

from __future__ import annotations

import asyncio
import inspect
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


async def serve_app(
    app: web.Application, *, host: str = "127.0.0.1", port: int = 0, shutdown_timeout_s: float = 2.0
) -> RunningApp:
    """Start ``app`` on ``host:port`` (0 = any free port) and return it running."""
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=shutdown_timeout_s, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        addresses = runner.addresses
        if not addresses:
            raise RuntimeError(f"no listening socket for {host}:{port}")
        bound_port = int(addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return RunningApp(runner, host, bound_port)


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
    timeout_s: float = 5.0,
    interval_s: float = 0.01,
    message: str = "condition",
) -> None:
    """Poll ``condition`` (sync or async) until true; raise TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout_s} s")
        await asyncio.sleep(interval_s)
