"""Plumbing shared by the fakes: request recording, background tasks, streamed uploads, tiny
media files. Private; the fakes' modules are the public surface."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import struct
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict

from mgpumanager.sim.activity import ActivitySink
from mgpumanager.sim.gpu import CudaOutOfMemory, GpuLedger

log = logging.getLogger("mgpumanager.sim")

UPLOAD_CHUNK_BYTES = 64 * 1024


async def sim_sleep(seconds: float) -> None:
    """The simulated duration of loading or work. 0 still yields to the loop."""
    await asyncio.sleep(max(0.0, seconds))


async def paced(
    total_s: float,
    steps: int,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Coroutine[Any, Any, None]] = sim_sleep,
) -> AsyncIterator[int]:
    """Yield step 0..steps-1, each at its share of `total_s` from the start: a streamed answer
    whose chunks come at the GPU's pace. Each wait runs to its step's deadline rather than for
    a fixed slice, so the event loop's lateness on one step is not added again on the next (a
    slice per step made a 4-chunk generate ~1.5 ms longer than its run time, which weighs 25
    times as much in the scheduling benchmark's scaled time)."""
    n = max(1, steps)
    start = clock()
    for step in range(n):
        await sleep(start + total_s * (step + 1) / n - clock())
        yield step


def utc_now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    at: float = field(default_factory=time.monotonic)  # when it reached the fake (benchmarks)


@dataclass(frozen=True)
class Upload:
    """What a streamed upload contained: file bytes counted chunk by chunk, small text fields."""

    file_bytes: int
    filename: str | None
    fields: dict[str, str]


class FakeService:
    """Base of every fake: builds ``self.app``, records requests, owns background tasks.

    Subclasses add routes in ``_routes`` and may extend ``_on_startup`` / ``_on_shutdown``.
    """

    #: paths not recorded in ``received`` (liveness probes would drown the rest)
    quiet_paths: frozenset[str] = frozenset({"/health"})

    def __init__(
        self, *, name: str, owner: str, ledger: GpuLedger, activity: ActivitySink | None
    ) -> None:
        self.name = name
        self.owner = owner
        self.ledger = ledger
        self.activity = activity
        self.received: deque[ReceivedRequest] = deque(maxlen=10_000)  # newest last
        self.load_count = 0
        self.unload_count = 0
        self.oom_count = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.app = web.Application(
            middlewares=[self._make_middleware()], client_max_size=64 * 1024**2
        )
        self.app.on_startup.append(self._startup_signal)
        self.app.on_shutdown.append(self._shutdown_signal)
        self.app.on_cleanup.append(self._cleanup_signal)
        self._routes(self.app.router)

    @property
    def received_queries(self) -> list[str]:
        return [r.query_string for r in self.received]

    def _routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def _make_middleware(self) -> Middleware:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path not in self.quiet_paths:
                self.received.append(
                    ReceivedRequest(
                        request.method,
                        request.path,
                        request.query_string,
                        CIMultiDict(request.headers),
                    )
                )
            try:
                return await handler(request)
            except JsonError as exc:
                return web.json_response(exc.body, status=exc.status)

        return record

    # -- lifecycle ------------------------------------------------------------------------

    async def _on_startup(self) -> None:
        """Hook: runs when the app starts serving."""

    async def _on_shutdown(self) -> None:
        """Hook: runs when the server stops accepting (close websockets here)."""

    async def _startup_signal(self, _app: web.Application) -> None:
        await self._on_startup()

    async def _shutdown_signal(self, _app: web.Application) -> None:
        await self._on_shutdown()

    async def _cleanup_signal(self, _app: web.Application) -> None:
        await self.aclose_tasks()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, owned by this fake; failures are logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, CudaOutOfMemory):
            log.info("%s: %s: %s", self.name, task.get_name(), exc)  # answered to its caller
        elif exc is not None:
            log.error("%s: background task %s failed", self.name, task.get_name(), exc_info=exc)

    async def aclose_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# -- request helpers ------------------------------------------------------------------------


class JsonError(Exception):
    """Raised from a handler; the middleware answers it as ``status`` with a JSON ``body``."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


def json_error(status: int, body: dict[str, Any]) -> JsonError:
    return JsonError(status, body)


async def read_json_object(request: web.Request, *, error_key: str = "error") -> dict[str, Any]:
    """The JSON object body, or 400 ``{error_key: "..."}``."""
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError as exc:
        raise json_error(400, {error_key: f"invalid JSON body: {exc}"}) from exc
    if not isinstance(body, dict):
        raise json_error(400, {error_key: "body must be a JSON object"})
    return body


async def read_upload(
    request: web.Request, on_chunk: Callable[[int], None] | None = None, *, file_field: str = "file"
) -> Upload:
    """Consume a raw or multipart body as a stream, counting file bytes chunk by chunk.

    Never reads the whole body into memory: an audio upload of any size is fine. Text fields of
    a multipart form (parts without a filename, other than ``file_field``) are read as text.
    """
    total = 0
    filename: str | None = None
    fields: dict[str, str] = {}

    def count(chunk: bytes) -> None:
        nonlocal total
        if chunk:
            total += len(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))

    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart: not something these services accept
            if part.filename is not None or part.name == file_field:
                filename = filename or part.filename
                while chunk := await part.read_chunk(UPLOAD_CHUNK_BYTES):
                    count(chunk)
            elif part.name is not None:
                fields[part.name] = await part.text()
    elif request.content_type == "application/x-www-form-urlencoded":
        form = await request.post()  # small by nature: text fields only
        fields.update({k: v for k, v in form.items() if isinstance(v, str)})
    else:
        async for chunk in request.content.iter_chunked(UPLOAD_CHUNK_BYTES):
            count(chunk)
    return Upload(total, filename, fields)


# -- tiny media -----------------------------------------------------------------------------


def tiny_wav(duration_s: float = 0.05, sample_rate: int = 16000) -> bytes:
    """A valid RIFF/WAVE file of silence (16-bit mono PCM)."""
    frames = max(1, int(duration_s * sample_rate))
    data = b"\x00\x00" * frames
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 4 + (8 + len(fmt)) + (8 + len(data)))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x80")
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", pixels)
        + _png_chunk(b"IEND", b"")
    )
