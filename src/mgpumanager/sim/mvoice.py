"""A fake mVoice: the TTS/STT service this project was written for (docs/upstreams.md, "mVoice").

Mimics: ``POST /api/synthesize`` (JSON in, ``{"audio_url", "duration_s"}`` out, the WAV fetched
afterwards under ``GET /audio/...``), ``POST /api/transcribe`` (an upload of any size, read as a
stream), ``POST /api/admin/unload`` / ``/api/admin/load`` (added for the broker), ``GET /health``.

GPU behaviour: the model is allocated in the ledger (``owner``, tag ``weights``) after
``load_s``; a request that arrives while unloaded loads it first (``lazy_load``). On CUDA OOM it
answers 500 ``{"error": "CUDA out of memory. ..."}`` and stays unloaded. An unload waits for the
requests in flight, answers ``{"status": "unloaded"}``, and the memory comes back in the ledger
``free_delay_s`` later (driver lag: the broker must confirm it on the GPU reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from mgpumanager.sim._base import (
    FakeService,
    json_error,
    read_json_object,
    read_upload,
    sim_sleep,
    tiny_wav,
)
from mgpumanager.sim.activity import ActivitySink, recording
from mgpumanager.sim.gpu import CudaOutOfMemory, GpuLedger
from mgpumanager.sim.states import ModelState


@dataclass(frozen=True)
class MVoiceSettings:
    name: str = "mvoice"  # consumer name, used in the activity log
    owner: str = "mvoice"  # process name on the GPU
    vram_mib: int = 6000
    load_s: float = 1.5
    run_s: float = 0.4  # one synthesis or transcription
    free_delay_s: float = 1.0
    lazy_load: bool = True  # a job arriving while unloaded loads the model first
    preload: bool = False  # load at start-up
    audio_subdir: str = ""  # generated audio under /audio/<subdir>/<id>.wav when set
    transcript: str = "the quick brown fox jumps over the lazy dog"
    max_audio_files: int = 1000  # oldest generated files are dropped (then 404), like a cleanup


class FakeMVoice(FakeService):
    def __init__(
        self,
        settings: MVoiceSettings | None = None,
        *,
        ledger: GpuLedger,
        activity: ActivitySink | None = None,
    ) -> None:
        self.settings = settings or MVoiceSettings()
        self.state = ModelState.UNLOADED
        self.in_flight = 0
        self.bytes_received = 0
        self.upload_started = asyncio.Event()
        self.audio: dict[str, bytes] = {}  # path under /audio/ -> WAV bytes
        self._lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending_free: asyncio.Task[None] | None = None
        super().__init__(
            name=self.settings.name, owner=self.settings.owner, ledger=ledger, activity=activity
        )

    @property
    def loaded(self) -> bool:
        return self.state is ModelState.LOADED

    def _routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/health", self._health)
        router.add_post("/api/synthesize", self._synthesize)
        router.add_post("/api/transcribe", self._transcribe)
        router.add_post("/api/admin/unload", self._admin_unload)
        router.add_post("/api/admin/load", self._admin_load)
        router.add_get("/audio/{path:.+}", self._audio)  # HEAD comes with GET

    async def _on_startup(self) -> None:
        if self.settings.preload:
            self.spawn(self._preload(), name=f"{self.name}-preload")

    async def _preload(self) -> None:
        async with self._lock:
            with contextlib.suppress(CudaOutOfMemory):
                await self._load_locked()

    # -- residency ------------------------------------------------------------------------

    async def _load_locked(self) -> None:
        if self._pending_free is not None:
            await self._pending_free  # the previous unload's memory must be back first
            self._pending_free = None
        if self.state is ModelState.LOADED:
            return
        self.state = ModelState.LOADING
        try:
            await sim_sleep(self.settings.load_s)
            await self.ledger.allocate(self.owner, self.settings.vram_mib, "weights")
        except CudaOutOfMemory:
            self.oom_count += 1
            self.state = ModelState.UNLOADED
            raise
        except BaseException:
            self.state = ModelState.UNLOADED
            raise
        self.state = ModelState.LOADED
        self.load_count += 1

    async def _free_later(self) -> None:
        await sim_sleep(self.settings.free_delay_s)
        await self.ledger.release(self.owner, "weights")

    @asynccontextmanager
    async def _job(self) -> AsyncIterator[None]:
        """Load if needed (or refuse), count the job in flight, record its GPU work."""
        async with self._lock:
            if self.state is not ModelState.LOADED:
                if not self.settings.lazy_load:
                    raise json_error(503, {"error": "model not loaded"})
                try:
                    await self._load_locked()
                except CudaOutOfMemory as exc:
                    raise json_error(500, {"error": str(exc)}) from exc
            self.in_flight += 1
            self._idle.clear()
        try:
            async with recording(self.activity, self.name):
                yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    # -- handlers -------------------------------------------------------------------------

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "loaded": self.loaded})

    async def _synthesize(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        text = body.get("text")
        if not isinstance(text, str) or not text:
            return web.json_response({"error": "text must be a non-empty string"}, status=400)
        async with self._job():
            await sim_sleep(self.settings.run_s)
        subdir = self.settings.audio_subdir.strip("/")
        path = f"{subdir}/{uuid.uuid4().hex}.wav" if subdir else f"{uuid.uuid4().hex}.wav"
        self.audio[path] = tiny_wav()
        while len(self.audio) > self.settings.max_audio_files:
            del self.audio[next(iter(self.audio))]
        duration_s = round(max(0.5, 0.06 * len(text)), 2)
        return web.json_response(
            {"audio_url": f"/audio/{path}", "duration_s": duration_s, "sample_rate": 16000}
        )

    def _count_chunk(self, n: int) -> None:
        self.bytes_received += n
        self.upload_started.set()

    async def _transcribe(self, request: web.Request) -> web.Response:
        upload = await read_upload(request, self._count_chunk)
        async with self._job():
            await sim_sleep(self.settings.run_s)
        return web.json_response({"text": self.settings.transcript, "bytes": upload.file_bytes})

    async def _audio(self, request: web.Request) -> web.Response:
        data = self.audio.get(request.match_info["path"])
        if data is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.Response(body=data, content_type="audio/wav")

    async def _admin_unload(self, _request: web.Request) -> web.Response:
        async with self._lock:
            if self.state is ModelState.LOADED:
                await self._idle.wait()
                self.state = ModelState.UNLOADED
                self.unload_count += 1
                self._pending_free = self.spawn(self._free_later(), name=f"{self.name}-free")
        return web.json_response({"status": "unloaded"})

    async def _admin_load(self, _request: web.Request) -> web.Response:
        async with self._lock:
            try:
                await self._load_locked()
            except CudaOutOfMemory as exc:
                return web.json_response({"error": str(exc)}, status=500)
        return web.json_response({"status": "loaded"})
