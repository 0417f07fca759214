"""The fake Ollama's OpenAI-compatible routes, as Ollama serves them (its `openai` middleware
over the native handlers): same scheduler, same lazy load, same keep_alive.

- ``GET /v1/models`` (``owned_by: "library"``), ``GET /v1/models/{model}``.
- ``POST /v1/chat/completions`` and ``/v1/completions``: one JSON answer, or with
  ``"stream": true`` server-sent events (``data: {...}`` chunks, the last with a
  ``finish_reason``, a usage chunk when ``stream_options.include_usage``, then
  ``data: [DONE]``).
- ``POST /v1/embeddings``: ``input`` a string or a list of strings; ``encoding_format``
  ``"float"`` or ``"base64"`` (little-endian float32, what the OpenAI SDKs ask for by default).
- Errors in OpenAI's shape, ``type`` from the status as Ollama picks it:
  ``{"error": {"message", "type": "invalid_request_error" | "not_found_error" | "api_error",
  "param": null, "code": null}}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mgpumanager.sim._base import JsonError, read_json_object, sim_sleep
from mgpumanager.sim.activity import recording

if TYPE_CHECKING:
    from mgpumanager.sim.ollama import FakeOllama, ModelRunner


def openai_error(status: int, message: str) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status)


class OllamaOpenAI:
    """Routes of `fake` under /v1."""

    def __init__(self, fake: FakeOllama) -> None:
        self.fake = fake

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/models", self._models)
        router.add_get("/v1/models/{model:.+}", self._model)
        router.add_post("/v1/chat/completions", self._chat)
        router.add_post("/v1/completions", self._completions)
        router.add_post("/v1/embeddings", self._embeddings)

    @staticmethod
    def _entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 1748779200, "owned_by": "library"}

    async def _models(self, _request: web.Request) -> web.Response:
        data = [self._entry(name) for name in self.fake.installed()]
        return web.json_response({"object": "list", "data": data})

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            model = self.fake.lookup({"model": name})
        except JsonError as exc:
            return openai_error(exc.status, str(exc.body.get("error")))
        return web.json_response(self._entry(model.name))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _body_and_model(self, request: web.Request) -> tuple[dict[str, Any], ModelRunner]:
        body = await read_json_object(request)
        return body, self.fake.lookup(body)

    async def _complete(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body, model = await self._body_and_model(request)
            if chat and not isinstance(body.get("messages"), list):
                return openai_error(400, "invalid message content type")
            await self.fake.acquire(model, self.fake.keep_alive(body))
        except JsonError as exc:
            return openai_error(exc.status, str(exc.body.get("error")))
        fake = self.fake
        fake.active_requests += 1
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:12]
        created = int(time.time())
        words = fake.words()
        prompt = body.get("messages") if chat else body.get("prompt")
        prompt_tokens = len(json.dumps(prompt).split())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return {
                "id": cid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model.name,
                "system_fingerprint": "fp_ollama",
                "choices": [choice],
            }

        try:
            if not body.get("stream"):
                async with recording(fake.activity, fake.name):
                    await sim_sleep(fake.settings.run_s)
                text = "".join(words)
                choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                fake.completed_requests += 1
                return web.json_response(
                    {
                        "id": cid,
                        "object": "chat.completion" if chat else "text_completion",
                        "created": created,
                        "model": model.name,
                        "system_fingerprint": "fp_ollama",
                        "choices": [choice],
                        "usage": usage,
                    }
                )
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            async with recording(fake.activity, fake.name):
                for word in words:
                    await sim_sleep(fake.settings.run_s / len(words))
                    await resp.write(_event(chunk(word, None)))
            await resp.write(_event(chunk("", "stop")))
            options = body.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                await resp.write(_event({**chunk("", None), "choices": [], "usage": usage}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            fake.completed_requests += 1
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            fake.aborted_requests += 1
            raise
        finally:
            fake.active_requests -= 1
            fake.release(model)

    async def _embeddings(self, request: web.Request) -> web.Response:
        try:
            body, model = await self._body_and_model(request)
        except JsonError as exc:
            return openai_error(exc.status, str(exc.body.get("error")))
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not (isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs)):
            return openai_error(400, "invalid input type")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return openai_error(400, f"invalid encoding format: {fmt}")
        try:
            await self.fake.embed_work(body)
        except JsonError as exc:
            return openai_error(exc.status, str(exc.body.get("error")))
        data = []
        for i, text in enumerate(inputs):
            vector = self.fake.vector(text)
            encoded: Any = vector
            if fmt == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": encoded, "index": i})
        tokens = sum(len(t.split()) for t in inputs)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": model.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"
