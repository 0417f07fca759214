"""The dashboard's web side: the page (static files shipped in the package, served at `/ui/`
and, for browsers, at `/`), and the `GET /v1/events` stream it and other tools follow.

`/` is also Ollama's root ("Ollama is running", which Ollama clients probe): `root(fallback)`
answers the page only to a request whose Accept header names text/html (a browser), and hands
every other request to `fallback`.

The page needs no token to load; its data does. A browser's EventSource cannot send an
Authorization header, so the page reads `/v1/events` with fetch() and parses the stream itself:
one way to authenticate for every route, and no token in any URL or log.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import socket
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath

from aiohttp import web

from mgpumanager.events import EventBus
from mgpumanager.status import Status

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
# The page talks to the broker that served it, and nowhere else (the browser enforces it too).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The kernel's send buffer of an event stream. Left alone it grows to megabytes (tcp_wmem)
# before a client that reads nothing is noticed; a stream needs little, so it is capped: a
# stalled client then holds this, the transport's 64 KiB and its CLIENT_BUFFER events at most.
SEND_BUFFER_BYTES = 64 * 1024
KEEPALIVE_S = 15.0  # a comment line this often keeps idle streams (and proxies) open
RETRY_MS = 1000  # how soon an EventSource reconnects after the broker went away


def _load_files() -> dict[str, bytes]:
    root = importlib.resources.files("mgpumanager") / "ui"
    return {
        f.name: f.read_bytes()
        for f in root.iterdir()
        if f.is_file() and PurePosixPath(f.name).suffix in CONTENT_TYPES
    }


FILES = _load_files()


def wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def needs_no_token(request: web.Request) -> bool:
    """/healthz, and the page's own files (not its data): a browser loads them before it can
    ask for the token."""
    path = request.path
    if path == "/healthz" or path == "/ui" or path.startswith("/ui/"):
        return True
    return path == "/" and request.method in ("GET", "HEAD") and wants_html(request)


def _file(name: str) -> web.Response:
    body = FILES.get(name)
    if body is None:
        raise web.HTTPNotFound()
    return web.Response(
        body=body,
        content_type=CONTENT_TYPES[PurePosixPath(name).suffix],
        charset="utf-8",
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


async def page(request: web.Request) -> web.Response:
    return _file("index.html")


async def asset(request: web.Request) -> web.Response:
    return _file(request.match_info["name"])


async def to_page(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


async def stream_events(
    request: web.Request, bus: EventBus, snapshot: Callable[[], Status]
) -> web.StreamResponse:
    """`GET /v1/events`: the status document first (event `snapshot`), then every event as it
    happens. A client that falls `bus.buffer` events behind is dropped: its connection is cut,
    and it reconnects to a fresh snapshot."""
    # Subscribed and snapshot taken with no await between: no event falls in between.
    sub = bus.subscribe()
    first = snapshot().model_dump_json()
    transport = request.transport
    if transport is not None:
        # Its handler may be stuck writing to a client that reads nothing: cut the connection.
        sub.on_drop = transport.abort
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass events on at once
        }
    )
    try:
        await response.prepare(request)
        await response.write(
            f"retry: {RETRY_MS}\nid: {bus.seq}\nevent: snapshot\ndata: {first}\n\n".encode()
        )
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    frame = await sub.get()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if frame is None:  # dropped, or the broker stops
                break
            await response.write(frame)
    except ConnectionResetError:
        pass  # the client left, or was dropped
    finally:
        bus.unsubscribe(sub)
    return response
