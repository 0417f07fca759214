"""A fake Ollama server (docs/upstreams.md, "Ollama"), faithful in the parts a broker trips over.

- ``/api/generate`` and ``/api/chat`` stream NDJSON chunks over ``run_s`` (the last with
  ``"done": true, "done_reason": "stop"``) unless ``"stream": false``; ``/api/embed``.
- A model loads lazily on the first request that names it (``load_s``, then allocated in the
  ledger as owner ``owner``, tag = the model name) and stays for its ``keep_alive`` (default
  ``"5m"``; a request's own overrides; negative = forever; numbers are seconds, strings are Go
  durations).
- Unload, ``{"model": M, "keep_alive": 0}`` without a prompt, answers 200 AT ONCE with
  ``"done_reason": "unload"``. The model leaves ``/api/ps`` only once its requests in flight have
  finished, and its memory returns to the ledger ``free_delay_s`` after that.
- Its own eviction only sees its own models: before loading it unloads its own idle models when
  more than ``max_loaded_models`` would be loaded or its own total would pass
  ``vram_budget_mib`` (its belief about the card). It knows nothing of other services, so a full
  card means CUDA OOM: 500
  ``{"error": "llama runner process has terminated: CUDA out of memory..."}``.
- ``OLLAMA_NUM_PARALLEL`` (``num_parallel``) requests per model at once, ``OLLAMA_MAX_QUEUE``
  (``max_queue``) waiting, then 503 "server busy".
- Its OpenAI-compatible routes (``sim/ollama_openai.py``) and model management: pull, push,
  create, copy, delete, blobs (``sim/ollama_models.py``). ``HEAD /`` and ``GET /`` answer
  "Ollama is running".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from typing import Any

from aiohttp import web

from mgpumanager.sim._base import (
    FakeService,
    json_error,
    paced,
    read_json_object,
    sim_sleep,
    utc_now_iso,
)
from mgpumanager.sim.activity import ActivitySink, recording
from mgpumanager.sim.gpu import MIB, CudaOutOfMemory, GpuLedger
from mgpumanager.sim.ollama_models import OllamaModels
from mgpumanager.sim.ollama_openai import OllamaOpenAI
from mgpumanager.sim.ollama_runner import (
    FOREVER_ISO,
    WORDS,
    ModelRunner,
    OllamaSettings,
    parse_keep_alive,
)
from mgpumanager.sim.states import ModelState


class FakeOllama(FakeService):
    def __init__(
        self,
        settings: OllamaSettings | None = None,
        *,
        ledger: GpuLedger,
        activity: ActivitySink | None = None,
    ) -> None:
        self.settings = settings or OllamaSettings()
        self.default_keep_alive_s = parse_keep_alive(self.settings.default_keep_alive)
        self._models = {
            n: ModelRunner(n, mib, self.settings.num_parallel)
            for n, mib in self.settings.models.items()
        }
        self._sched = asyncio.Lock()  # one load/evict decision at a time, like Ollama's scheduler
        self.active_requests = 0
        self.aborted_requests = 0
        self.completed_requests = 0
        self.models_api = OllamaModels(self)
        super().__init__(
            name=self.settings.name, owner=self.settings.owner, ledger=ledger, activity=activity
        )

    def _routes(self, router: web.UrlDispatcher) -> None:
        OllamaOpenAI(self).routes(router)
        self.models_api.routes(router)
        router.add_get("/", self._root)  # GET also answers HEAD
        router.add_get("/api/version", self._version)
        router.add_get("/api/tags", self._tags)
        router.add_get("/api/ps", self._ps)
        router.add_post("/api/show", self._show)
        router.add_post("/api/generate", self._generate)
        router.add_post("/api/chat", self._chat)
        router.add_post("/api/embed", self._embed)
        router.add_post("/api/embeddings", self._embeddings_legacy)

    # -- views for tests ------------------------------------------------------------------

    def model_state(self, model: str) -> ModelState:
        return self._models[model].state

    @property
    def queued_requests(self) -> int:
        """Requests waiting for a parallel slot (Ollama's own queue)."""
        return sum(m.waiting for m in self._models.values())

    def resident_models(self) -> list[str]:
        return [m.name for m in self._models.values() if m.state is ModelState.LOADED]

    def installed(self) -> list[str]:
        return list(self._models)

    def model(self, name: str) -> ModelRunner | None:
        """An installed model by name (``x`` also finds ``x:latest``)."""
        return self._models.get(name) or self._models.get(f"{name}:latest")

    def install(self, name: str, size_mib: int) -> None:
        if name not in self._models:
            self._models[name] = ModelRunner(name, size_mib, self.settings.num_parallel)

    def remove(self, name: str) -> None:
        """Delete an installed model; a loaded one is unloaded (once its requests end)."""
        model = self._models.pop(name)
        model.unload_pending = True
        self._maybe_unload(model)

    def words(self) -> list[str]:
        """The words of one answer, one per streamed chunk."""
        return [WORDS[i % len(WORDS)] + " " for i in range(max(1, self.settings.chunks))]

    # -- scheduler ------------------------------------------------------------------------

    def lookup(self, body: dict[str, Any]) -> ModelRunner:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise json_error(400, {"error": "model is required"})
        model = self.model(name)
        if model is None:
            raise json_error(404, {"error": f'model "{name}" not found, try pulling it first'})
        return model

    def keep_alive(self, body: dict[str, Any]) -> float | None:
        if "keep_alive" not in body or body["keep_alive"] is None:
            return self.default_keep_alive_s
        try:
            return parse_keep_alive(body["keep_alive"])
        except ValueError as exc:
            raise json_error(400, {"error": str(exc)}) from exc

    async def acquire(self, model: ModelRunner, keep_alive_s: float | None) -> float:
        """Wait for a parallel slot, load the model if needed; return the load time spent."""
        if self.queued_requests >= self.settings.max_queue:
            raise json_error(
                503, {"error": "server busy, please try again.  maximum pending requests exceeded"}
            )
        model.waiting += 1
        try:
            await model.parallel.acquire()
        finally:
            model.waiting -= 1
        started = time.monotonic()
        try:
            async with self._sched:
                await self._ensure_loaded_locked(model)
                model.in_flight += 1
                model.keep_alive_s = keep_alive_s  # the newest request's keep_alive wins
                self._cancel_expiry(model)
        except CudaOutOfMemory as exc:
            model.parallel.release()
            raise json_error(500, {"error": f"llama runner process has terminated: {exc}"}) from exc
        except BaseException:
            model.parallel.release()
            raise
        return time.monotonic() - started

    def release(self, model: ModelRunner) -> None:
        model.in_flight -= 1
        model.last_used = time.monotonic()
        model.parallel.release()
        if model.in_flight > 0:
            return
        keep = model.keep_alive_s
        if keep == 0:
            model.unload_pending = True
        elif keep is None:
            model.expires_at = None
        else:
            model.expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=keep)
            model.expiry = self.spawn(
                self._expire_after(model, keep), name=f"ollama-expire-{model.name}"
            )
        self._maybe_unload(model)

    async def _expire_after(self, model: ModelRunner, seconds: float) -> None:
        await asyncio.sleep(seconds)
        model.expiry = None
        if model.in_flight == 0:
            model.unload_pending = True
            self._maybe_unload(model)

    def _cancel_expiry(self, model: ModelRunner) -> None:
        if model.expiry is not None:
            model.expiry.cancel()
            model.expiry = None

    def _maybe_unload(self, model: ModelRunner) -> None:
        if model.state is ModelState.LOADED and model.in_flight == 0 and model.unload_pending:
            model.unload_pending = False
            self._cancel_expiry(model)
            model.state = ModelState.UNLOADING  # gone from /api/ps now; memory follows later
            model.expires_at = None
            self.unload_count += 1
            model.free_task = self.spawn(self._free(model), name=f"ollama-free-{model.name}")

    async def _free(self, model: ModelRunner) -> None:
        try:
            await sim_sleep(self.settings.free_delay_s)
            await self.ledger.release(self.owner, model.name)
        finally:
            model.state = ModelState.UNLOADED

    async def _ensure_loaded_locked(self, model: ModelRunner) -> None:
        while True:
            if model.state is ModelState.LOADED:
                return
            if model.state is ModelState.UNLOADING and model.free_task is not None:
                await asyncio.shield(model.free_task)
            elif model.state is ModelState.LOADING and model.load_task is not None:
                await asyncio.shield(model.load_task)
            else:
                await self._make_room_locked(model)
                # A load is not abandoned when the client that caused it goes away.
                model.load_task = self.spawn(self._load(model), name=f"ollama-load-{model.name}")
                await asyncio.shield(model.load_task)

    async def _load(self, model: ModelRunner) -> None:
        model.state = ModelState.LOADING
        try:
            await sim_sleep(self.settings.load_s)
            await self.ledger.allocate(self.owner, model.size_mib, model.name)
        except CudaOutOfMemory:
            self.oom_count += 1
            model.state = ModelState.UNLOADED
            raise
        except BaseException:
            model.state = ModelState.UNLOADED
            raise
        model.state = ModelState.LOADED
        model.last_used = time.monotonic()
        self.load_count += 1

    async def _make_room_locked(self, target: ModelRunner) -> None:
        """Ollama's own eviction: only its own idle models, by its own accounting."""
        budget = self.settings.vram_budget_mib
        while True:
            others = [m for m in self._models.values() if m is not target]
            loaded = [m for m in others if m.state is ModelState.LOADED]
            held = [m for m in others if m.state in (ModelState.LOADED, ModelState.UNLOADING)]
            over_count = len(loaded) >= self.settings.max_loaded_models
            over_budget = (
                budget is not None and sum(m.size_mib for m in held) + target.size_mib > budget
            )
            if not (over_count or over_budget):
                return
            freeing = [m.free_task for m in held if m.state is ModelState.UNLOADING and m.free_task]
            if freeing and over_budget:
                await asyncio.shield(freeing[0])  # Ollama waits for VRAM to recover
                continue
            idle = sorted((m for m in loaded if m.in_flight == 0), key=lambda m: m.last_used)
            if not idle:
                return  # busy models in the way: try anyway, the card decides
            victim = idle[0]
            victim.unload_pending = True
            self._maybe_unload(victim)
            if victim.free_task is not None:
                await asyncio.shield(victim.free_task)

    # -- handlers -------------------------------------------------------------------------

    async def _root(self, _request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, _request: web.Request) -> web.Response:
        return web.json_response({"version": self.settings.version})

    async def _tags(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "models": [
                    {
                        "name": m.name,
                        "model": m.name,
                        "modified_at": "2025-06-01T12:00:00Z",
                        "size": int(m.size_mib * MIB * 0.85),
                        "digest": m.digest,
                        "details": m.details,
                    }
                    for m in self._models.values()
                ]
            }
        )

    async def _ps(self, _request: web.Request) -> web.Response:
        out = []
        for m in self._models.values():
            if m.state is not ModelState.LOADED:
                continue
            expires = (
                m.expires_at.isoformat().replace("+00:00", "Z") if m.expires_at else FOREVER_ISO
            )
            if m.in_flight > 0 and m.keep_alive_s is not None:
                expires = (
                    dt.datetime.now(dt.UTC) + dt.timedelta(seconds=m.keep_alive_s)
                ).isoformat()
            out.append(
                {
                    "name": m.name,
                    "model": m.name,
                    "size": m.size_mib * MIB,
                    "digest": m.digest,
                    "details": m.details,
                    "expires_at": expires,
                    "size_vram": m.size_mib * MIB,
                    "context_length": 4096,
                }
            )
        return web.json_response({"models": out})

    async def _show(self, request: web.Request) -> web.Response:
        model = self.lookup(await read_json_object(request))
        return web.json_response(
            {
                "modelfile": f"FROM {model.name}\n",
                "parameters": "stop <|eot_id|>",
                "template": "{{ .Prompt }}",
                "details": model.details,
                "model_info": {
                    "general.architecture": model.details["family"],
                    "general.parameter_count": 8e9,
                },
                "capabilities": ["completion"],
                "modified_at": "2025-06-01T12:00:00Z",
            }
        )

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=True)

    def _reply(self, model: ModelRunner, chat: bool, text: str, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model.name, "created_at": utc_now_iso()}
        if chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out.update(extra)
        return out

    async def _completion(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await read_json_object(request)
        model = self.lookup(body)
        keep_alive_s = self.keep_alive(body)
        stream = body.get("stream", True) is not False
        empty = (
            not body.get("messages") if chat else not body.get("prompt") and not body.get("images")
        )
        if empty and keep_alive_s == 0:
            # Unload: answer now; the runner goes when its requests finish, the memory after that.
            model.unload_pending = True
            model.keep_alive_s = 0
            self._maybe_unload(model)
            return self._one(self._reply(model, chat, "", done=True, done_reason="unload"))
        model.unload_pending = False  # a request after an unload keeps the model
        if empty:
            await self.acquire(model, keep_alive_s)
            self.release(model)
            return self._one(self._reply(model, chat, "", done=True, done_reason="load"))

        load_s = await self.acquire(model, keep_alive_s)
        self.active_requests += 1
        started = time.monotonic()
        words = self.words()
        n = len(words)
        prompt_tokens = len(
            json.dumps(body.get("messages") if chat else body.get("prompt", "")).split()
        )
        resp: web.StreamResponse | None = None
        try:
            if stream:
                resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await resp.prepare(request)
            async with recording(self.activity, self.name):
                async for i in paced(self.settings.run_s, n):
                    word = words[i]
                    if resp is not None:
                        await resp.write(self._line(self._reply(model, chat, word, done=False)))
            elapsed_ns = int((time.monotonic() - started) * 1e9)
            final = self._reply(
                model,
                chat,
                "" if stream else "".join(words),
                done=True,
                done_reason="stop",
                total_duration=elapsed_ns + int(load_s * 1e9),
                load_duration=int(load_s * 1e9),
                prompt_eval_count=prompt_tokens,
                prompt_eval_duration=elapsed_ns // 10,
                eval_count=n,
                eval_duration=elapsed_ns,
            )
            if not chat:
                final["context"] = list(range(1, prompt_tokens + n + 1))
            if resp is None:
                self.completed_requests += 1
                return web.json_response(final)
            await resp.write(self._line(final))
            await resp.write_eof()
            self.completed_requests += 1
            return resp
        except ConnectionResetError:
            self.aborted_requests += 1  # the client went away mid-stream (no handler_cancellation)
            return resp if resp is not None else web.Response(status=499)
        except asyncio.CancelledError:
            self.aborted_requests += 1  # the client went away (handler_cancellation=True)
            raise
        finally:
            self.active_requests -= 1
            self.release(model)

    @staticmethod
    def _line(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj).encode() + b"\n"

    @staticmethod
    def _one(obj: dict[str, Any]) -> web.Response:
        # Load and unload answers are plain JSON even when "stream" is true (gin's c.JSON).
        return web.json_response(obj)

    @staticmethod
    def vector(text: str) -> list[float]:
        digest = hashlib.sha256(text.encode()).digest()
        return [round((b - 128) / 128, 4) for b in digest[:16]]

    async def embed_work(self, body: dict[str, Any]) -> tuple[ModelRunner, float]:
        model = self.lookup(body)
        keep_alive_s = self.keep_alive(body)
        model.unload_pending = False
        load_s = await self.acquire(model, keep_alive_s)
        self.active_requests += 1
        try:
            async with recording(self.activity, self.name):
                await sim_sleep(self.settings.embed_s)
        finally:
            self.active_requests -= 1
            self.release(model)
        return model, load_s

    async def _embed(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        raw = body.get("input", "")
        inputs = (
            [raw]
            if isinstance(raw, str)
            else [str(x) for x in raw]
            if isinstance(raw, list)
            else None
        )
        if inputs is None:
            return web.json_response({"error": "invalid input type"}, status=400)
        model, load_s = await self.embed_work(body)
        return web.json_response(
            {
                "model": model.name,
                "embeddings": [self.vector(t) for t in inputs],
                "total_duration": int((load_s + self.settings.embed_s) * 1e9),
                "load_duration": int(load_s * 1e9),
                "prompt_eval_count": sum(len(t.split()) for t in inputs),
            }
        )

    async def _embeddings_legacy(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        await self.embed_work(body)
        return web.json_response({"embedding": self.vector(str(body.get("prompt", "")))})


__all__ = ["FakeOllama", "ModelRunner", "OllamaSettings", "parse_keep_alive"]
