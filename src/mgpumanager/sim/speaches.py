"""A fake speaches server (formerly faster-whisper-server; docs/upstreams.md, "speaches").

- The OpenAI audio API as speaches (and kokoro-style servers) serve it: ``GET /v1/models``,
  ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` (multipart: ``file``,
  ``model``, ``response_format`` ``json`` (default) | ``text`` | ``verbose_json``), and
  ``POST /v1/audio/speech`` (JSON ``{model, input, voice, response_format}`` → audio bytes; the
  fake always makes WAV and says so: ``audio/wav``).
- ``GET /v1/audio/models`` (its text-to-speech models: ``{"models": [...], "object": "list"}``)
  and ``GET /v1/audio/voices`` (``{"voices": [{"id", "name", "language", "gender"}],
  "object": "list"}``), as speaches serves them for Open WebUI's TTS settings.
- Models load by themselves on the first request naming them (``load_s``, then the model's MiB
  in the ledger as ``owner``, tag = model id) and unload after ``ttl_s`` idle (negative: never).
- Control endpoints: ``GET /api/ps`` → ``{"models": [ids]}``; ``POST /api/ps/{model}`` loads
  (201, 409 if already loaded, 404 for an unknown model); ``DELETE /api/ps/{model}`` unloads
  (200, 409 while a request uses it, 404 if not loaded). The memory returns ``free_delay_s``
  after the unload answered.
- ``residual_mib`` (runtime/CUDA context, tag ``cuda_context``) is allocated with the first model
  and stays after every unload, like the few hundred MiB real speaches keeps.
- CUDA OOM answers 500 ``{"detail": "CUDA out of memory. ..."}`` (FastAPI style).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

from mgpumanager.sim._base import (
    FakeService,
    Upload,
    json_error,
    read_json_object,
    read_upload,
    sim_sleep,
    tiny_wav,
)
from mgpumanager.sim.activity import ActivitySink, recording
from mgpumanager.sim.gpu import CudaOutOfMemory, GpuLedger


@dataclass(frozen=True)
class SpeachesSettings:
    name: str = "speaches"
    owner: str = "speaches"
    models: Mapping[str, int] = field(
        default_factory=lambda: {
            "Systran/faster-whisper-small": 1000,
            "speaches-ai/Kokoro-82M-v1.0-ONNX": 600,
        }
    )
    default_stt_model: str = "Systran/faster-whisper-small"
    default_tts_model: str = "speaches-ai/Kokoro-82M-v1.0-ONNX"
    # Its text-to-speech models (the rest transcribe) and their voices (Kokoro's names).
    tts_models: tuple[str, ...] = ("speaches-ai/Kokoro-82M-v1.0-ONNX",)
    voices: tuple[str, ...] = ("af_heart", "af_bella", "am_adam", "bf_emma")
    residual_mib: int = 200
    ttl_s: float = 300.0
    load_s: float = 1.0
    run_s: float = 0.4
    free_delay_s: float = 0.5
    transcript: str = "Hello from speaches."
    translation: str = "Hello from speaches, in English."


class FakeSpeaches(FakeService):
    def __init__(
        self,
        settings: SpeachesSettings | None = None,
        *,
        ledger: GpuLedger,
        activity: ActivitySink | None = None,
    ) -> None:
        self.settings = settings or SpeachesSettings()
        self.loaded: dict[str, int] = {}  # model id -> requests in flight
        self.residual_allocated = False
        self.uploads: list[Upload] = []  # what each transcription received
        self._lock = asyncio.Lock()
        self._ttl: dict[str, asyncio.Task[None]] = {}
        self._freeing: dict[str, asyncio.Task[None]] = {}
        super().__init__(
            name=self.settings.name, owner=self.settings.owner, ledger=ledger, activity=activity
        )

    def _routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/health", self._health)
        router.add_get("/v1/models", self._models)
        router.add_get("/v1/audio/models", self._audio_models)
        router.add_get("/v1/audio/voices", self._audio_voices)
        router.add_get("/api/ps", self._ps)
        router.add_post("/api/ps/{model:.+}", self._ps_load)
        router.add_delete("/api/ps/{model:.+}", self._ps_unload)
        router.add_post("/v1/audio/transcriptions", self._transcriptions)
        router.add_post("/v1/audio/translations", self._translations)
        router.add_post("/v1/audio/speech", self._speech)

    # -- residency ------------------------------------------------------------------------

    async def _load_locked(self, model: str) -> None:
        freeing = self._freeing.pop(model, None)
        if freeing is not None:
            await freeing
        try:
            if not self.residual_allocated:
                await self.ledger.allocate(self.owner, self.settings.residual_mib, "cuda_context")
                self.residual_allocated = True
            await sim_sleep(self.settings.load_s)
            await self.ledger.allocate(self.owner, self.settings.models[model], model)
        except CudaOutOfMemory:
            self.oom_count += 1
            raise
        self.loaded[model] = 0
        self.load_count += 1

    def _unload(self, model: str) -> None:
        del self.loaded[model]
        ttl = self._ttl.pop(model, None)
        if ttl is not None and ttl is not asyncio.current_task():
            ttl.cancel()
        self.unload_count += 1
        self._freeing[model] = self.spawn(self._free_later(model), name=f"speaches-free-{model}")

    async def _free_later(self, model: str) -> None:
        await sim_sleep(self.settings.free_delay_s)
        await self.ledger.release(self.owner, model)

    async def _expire(self, model: str) -> None:
        await asyncio.sleep(self.settings.ttl_s)
        if self.loaded.get(model) == 0:
            self._unload(model)

    async def _use(self, model: str) -> None:
        async with self._lock:
            if model not in self.loaded:
                try:
                    await self._load_locked(model)
                except CudaOutOfMemory as exc:
                    raise json_error(500, {"detail": str(exc)}) from exc
            self.loaded[model] += 1
            ttl = self._ttl.pop(model, None)
            if ttl is not None:
                ttl.cancel()

    def _done(self, model: str) -> None:
        if model not in self.loaded:
            return
        self.loaded[model] -= 1
        if self.loaded[model] == 0:
            if self.settings.ttl_s == 0:
                self._unload(model)
            elif self.settings.ttl_s > 0:
                self._ttl[model] = self.spawn(self._expire(model), name=f"speaches-ttl-{model}")

    async def _work(self, model: str) -> None:
        if model not in self.settings.models:
            raise json_error(404, {"detail": f"Model '{model}' not found"})
        await self._use(model)
        try:
            async with recording(self.activity, self.name):
                await sim_sleep(self.settings.run_s)
        finally:
            self._done(model)

    # -- handlers -------------------------------------------------------------------------

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _models(self, _request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": m.split("/")[0]}
            for m in self.settings.models
        ]
        return web.json_response({"data": data, "object": "list"})

    async def _audio_models(self, _request: web.Request) -> web.Response:
        models = [
            {"id": m, "object": "model", "created": 0, "owned_by": m.split("/")[0]}
            for m in self.settings.models
            if m in self.settings.tts_models
        ]
        return web.json_response({"models": models, "object": "list"})

    async def _audio_voices(self, _request: web.Request) -> web.Response:
        voices = [
            {
                "name": v,
                "language": "en-us" if v.startswith("a") else "en-gb",
                "gender": "female" if v[1] == "f" else "male",
                "id": v,
            }
            for v in self.settings.voices
        ]
        return web.json_response({"voices": voices, "object": "list"})

    async def _ps(self, _request: web.Request) -> web.Response:
        return web.json_response({"models": list(self.loaded)})

    async def _ps_load(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.settings.models:
            return web.json_response({"detail": f"Model '{model}' not found"}, status=404)
        async with self._lock:
            if model in self.loaded:
                return web.json_response(
                    {"detail": f"Model '{model}' is already loaded"}, status=409
                )
            try:
                await self._load_locked(model)
            except CudaOutOfMemory as exc:
                return web.json_response({"detail": str(exc)}, status=500)
        if self.settings.ttl_s > 0:
            self._ttl[model] = self.spawn(self._expire(model), name=f"speaches-ttl-{model}")
        return web.Response(status=201)

    async def _ps_unload(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.loaded:
            return web.json_response({"detail": f"Model '{model}' is not loaded"}, status=404)
        if self.loaded[model] > 0:
            return web.json_response({"detail": f"Model '{model}' is in use"}, status=409)
        self._unload(model)
        return web.Response(status=200)

    async def _transcriptions(self, request: web.Request) -> web.Response:
        return await self._listen(request, self.settings.transcript)

    async def _translations(self, request: web.Request) -> web.Response:
        return await self._listen(request, self.settings.translation)

    async def _listen(self, request: web.Request, text: str) -> web.Response:
        upload = await read_upload(request)
        if upload.filename is None and upload.file_bytes == 0:
            return web.json_response({"detail": "file is required"}, status=422)
        self.uploads.append(upload)
        model = upload.fields.get("model") or self.settings.default_stt_model
        await self._work(model)
        fmt = upload.fields.get("response_format", "json")
        if fmt == "text":
            return web.Response(text=text)
        if fmt == "verbose_json":
            segment = {"id": 0, "start": 0.0, "end": 0.05, "text": text}
            verbose = {"task": "transcribe", "language": "en", "duration": 0.05, "text": text}
            return web.json_response({**verbose, "segments": [segment]})
        return web.json_response({"text": text})

    async def _speech(self, request: web.Request) -> web.Response:
        body = await read_json_object(request, error_key="detail")
        text = body.get("input")
        if not isinstance(text, str) or not text:
            return web.json_response({"detail": "input must be a non-empty string"}, status=422)
        model = body.get("model") or self.settings.default_tts_model
        await self._work(str(model))
        return web.Response(body=tiny_wav(), content_type="audio/wav")
