"""A fake vLLM OpenAI-compatible server with sleep mode (docs/upstreams.md, "vLLM").

- ``POST /v1/completions`` and ``/v1/chat/completions``: JSON by default, SSE
  (``data: {...}`` lines, then ``data: [DONE]``) with ``"stream": true``.
- Start-up loads the model before serving, like vLLM (``load_s``, then ``vram_mib`` in the
  ledger as ``owner``: ``residual_mib`` under tag ``cuda_context`` and the rest under
  ``weights``). If that OOMs the fake stays up but answers 503 (the real process would die).
- ``POST /sleep?level=1|2`` waits for requests in flight, frees ``weights`` (after
  ``free_delay_s``) and answers 200; ``residual_mib`` stays. ``POST /wake_up`` reallocates after
  ``wake_s`` (500 on CUDA OOM, still asleep). ``GET /is_sleeping``, ``GET /health``.
- A completion while asleep answers 503 (the broker must wake it first).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mgpumanager.sim._base import FakeService, paced, read_json_object, sim_sleep
from mgpumanager.sim.activity import ActivitySink, recording
from mgpumanager.sim.gpu import CudaOutOfMemory, GpuLedger
from mgpumanager.sim.states import ModelState

_WORDS = ["vLLM", "serves", "this", "simulated", "answer", "one", "token", "at", "a", "time"]


@dataclass(frozen=True)
class VLLMSettings:
    name: str = "vllm"
    owner: str = "vllm"
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    vram_mib: int = 16000  # weights + KV cache while awake
    residual_mib: int = 500  # kept while asleep
    load_s: float = 5.0
    wake_s: float = 0.3
    run_s: float = 1.0
    free_delay_s: float = 0.0
    chunks: int = 8


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}, status=status
    )


class FakeVLLM(FakeService):
    def __init__(
        self,
        settings: VLLMSettings | None = None,
        *,
        ledger: GpuLedger,
        activity: ActivitySink | None = None,
    ) -> None:
        self.settings = settings or VLLMSettings()
        self.state = ModelState.LOADING
        self.sleep_level = 0
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()
        super().__init__(
            name=self.settings.name, owner=self.settings.owner, ledger=ledger, activity=activity
        )

    @property
    def is_sleeping(self) -> bool:
        return self.state is ModelState.UNLOADED

    def _routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/health", self._health)
        router.add_get("/v1/models", self._models)
        router.add_post("/v1/completions", self._completions)
        router.add_post("/v1/chat/completions", self._chat)
        router.add_post("/sleep", self._sleep)
        router.add_post("/wake_up", self._wake_up)
        router.add_get("/is_sleeping", self._is_sleeping)

    async def _on_startup(self) -> None:
        # vLLM listens only once the model is in memory: this runs before the socket opens.
        try:
            await self.ledger.allocate(self.owner, self.settings.residual_mib, "cuda_context")
            await sim_sleep(self.settings.load_s)
            await self._allocate_weights()
        except CudaOutOfMemory:
            self.oom_count += 1
            self.state = ModelState.FAILED
            return
        self.state = ModelState.LOADED
        self.load_count += 1

    async def _allocate_weights(self) -> None:
        await self.ledger.allocate(
            self.owner, max(0, self.settings.vram_mib - self.settings.residual_mib), "weights"
        )

    async def _health(self, _request: web.Request) -> web.Response:
        if self.state is ModelState.FAILED:
            return web.Response(status=503)
        return web.Response(status=200)

    async def _is_sleeping(self, _request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.is_sleeping})

    async def _models(self, _request: web.Request) -> web.Response:
        model = {
            "id": self.settings.model,
            "object": "model",
            "created": 0,
            "owned_by": "vllm",
            "root": self.settings.model,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def _sleep(self, request: web.Request) -> web.Response:
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            return _error(400, f"invalid sleep level {level}", "BadRequestError")
        async with self._lock:
            if self.state is ModelState.LOADED:
                self.state = ModelState.UNLOADING
                await self._idle.wait()
                await sim_sleep(self.settings.free_delay_s)
                await self.ledger.release(self.owner, "weights")
                self.state = ModelState.UNLOADED
                self.sleep_level = int(level)
                self.unload_count += 1
        return web.Response(status=200)

    async def _wake_up(self, _request: web.Request) -> web.Response:
        async with self._lock:
            if self.state is ModelState.UNLOADED:
                await sim_sleep(self.settings.wake_s)
                try:
                    await self._allocate_weights()
                except CudaOutOfMemory as exc:
                    self.oom_count += 1
                    return _error(500, str(exc), "InternalServerError")
                self.state = ModelState.LOADED
                self.sleep_level = 0
                self.load_count += 1
        return web.Response(status=200)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    def _chunk(self, cid: str, chat: bool, text: str, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = {"role": "assistant", "content": text} if text else {}
        else:
            choice["text"] = text
        obj = "chat.completion.chunk" if chat else "text_completion"
        return {
            "id": cid,
            "object": obj,
            "created": int(time.time()),
            "model": self.settings.model,
            "choices": [choice],
        }

    async def _complete(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await read_json_object(request)
        if self.state is not ModelState.LOADED:
            return _error(503, f"model is {self.state}", "ServiceUnavailableError")
        model = body.get("model", self.settings.model)
        if model != self.settings.model:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        self.in_flight += 1
        self._idle.clear()
        try:
            cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            n = max(1, self.settings.chunks)
            words = [_WORDS[i % len(_WORDS)] + " " for i in range(n)]
            if body.get("stream"):
                resp = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await resp.prepare(request)
                async with recording(self.activity, self.name):
                    async for i in paced(self.settings.run_s, n):
                        word = words[i]
                        await resp.write(
                            b"data: "
                            + json.dumps(self._chunk(cid, chat, word, None)).encode()
                            + b"\n\n"
                        )
                await resp.write(
                    b"data: " + json.dumps(self._chunk(cid, chat, "", "stop")).encode() + b"\n\n"
                )
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            async with recording(self.activity, self.name):
                await sim_sleep(self.settings.run_s)
            text = "".join(words)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return web.json_response(
                {
                    "id": cid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": self.settings.model,
                    "choices": [choice],
                    "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n},
                }
            )
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
