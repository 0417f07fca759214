"""The fake Ollama's model management, answered as Ollama's API documents it. None of it runs
on the GPU: it changes what is installed (what ``/api/tags`` lists and a generate may load).

- ``POST /api/pull {"model"}``: NDJSON progress over ``pull_s``: ``pulling manifest``, then
  ``pulling <digest12>`` lines with ``digest``, ``total`` and a growing ``completed``, then
  ``verifying sha256 digest``, ``writing manifest``, ``success``; the model is installed at the
  end. A name that is neither in ``library`` nor installed ends the stream with
  ``{"error": "pull model manifest: file does not exist"}`` (still HTTP 200: the stream had
  started). With ``"stream": false`` one object: ``{"status": "success"}``, or 500
  ``{"error": ...}``.
- ``POST /api/push {"model"}``: ``retrieving manifest``, ``starting upload``, upload progress,
  ``pushing manifest``, ``success``.
- ``POST /api/create {"model", "from" | "files", ...}``: ``using existing layer ...``,
  ``writing manifest``, ``success``. ``files`` name blobs uploaded before (``/api/blobs``).
- ``POST /api/copy {"source", "destination"}`` and ``DELETE /api/delete {"model"}``: 200 with
  an empty body, 404 ``{"error": "model '<name>' not found"}``.
- ``HEAD /api/blobs/sha256:<hex>``: 200 or 404; ``POST`` uploads it, checking the digest while
  it streams in: 201 (200 if it existed), 400 on a mismatch or a malformed digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mgpumanager.sim._base import UPLOAD_CHUNK_BYTES, json_error, read_json_object, sim_sleep
from mgpumanager.sim.gpu import MIB

if TYPE_CHECKING:
    from mgpumanager.sim.ollama import FakeOllama

DIGEST = re.compile(r"sha256[:-][0-9a-f]{64}")
Progress = AsyncIterator[dict[str, Any]]


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class OllamaModels:
    """Model management routes of `fake`; ``pulls_in_progress`` counts pulls not yet done."""

    def __init__(self, fake: FakeOllama) -> None:
        self.fake = fake
        self.blobs: dict[str, int] = {}  # digest -> bytes
        self.pulls_in_progress = 0

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/api/pull", self._pull)
        router.add_post("/api/push", self._push)
        router.add_post("/api/create", self._create)
        router.add_post("/api/copy", self._copy)
        router.add_delete("/api/delete", self._delete)
        router.add_route("HEAD", "/api/blobs/{digest}", self._blob_exists)
        router.add_post("/api/blobs/{digest}", self._blob_upload)

    # -- streamed progress ------------------------------------------------------------------

    @staticmethod
    async def _answer(request: web.Request, stream: bool, progress: Progress) -> web.StreamResponse:
        """NDJSON line by line, or (``"stream": false``) only the end: the last status, or the
        error as a 500."""
        if not stream:
            last: dict[str, Any] = {}
            async for item in progress:
                last = item
                if "error" in item:
                    return web.json_response({"error": item["error"]}, status=500)
            return web.json_response(last)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        async for item in progress:
            await resp.write(json.dumps(item).encode() + b"\n")
        await resp.write_eof()
        return resp

    @staticmethod
    def _name(body: dict[str, Any]) -> str:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise json_error(400, {"error": "model is required"})
        return name

    # -- handlers ---------------------------------------------------------------------------

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        name = self._name(body)
        stream = body.get("stream", True) is not False
        return await self._answer(request, stream, self._pulling(name))

    async def _pulling(self, name: str) -> Progress:
        fake, settings = self.fake, self.fake.settings
        self.pulls_in_progress += 1
        try:
            yield {"status": "pulling manifest"}
            canonical = name if ":" in name else f"{name}:latest"
            installed = fake.model(name)
            size_mib = settings.library.get(name) or settings.library.get(canonical)
            if size_mib is None and installed is not None:
                size_mib, canonical = installed.size_mib, installed.name
            if size_mib is None:
                yield {"error": "pull model manifest: file does not exist"}
                return
            digest = _digest(canonical)
            total = int(size_mib * MIB * 0.85)
            steps = max(1, settings.pull_steps)
            for step in range(1, steps + 1):
                await sim_sleep(settings.pull_s / steps)
                yield {
                    "status": f"pulling {digest[7:19]}",
                    "digest": digest,
                    "total": total,
                    "completed": total * step // steps,
                }
            for status in ("verifying sha256 digest", "writing manifest"):
                yield {"status": status}
            fake.install(canonical, size_mib)
            yield {"status": "success"}
        finally:
            self.pulls_in_progress -= 1

    async def _push(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        model = self.fake.model(self._name(body))
        if model is None:
            raise json_error(404, {"error": f"model '{self._name(body)}' not found"})
        total = int(model.size_mib * MIB * 0.85)

        async def pushing() -> Progress:
            yield {"status": "retrieving manifest"}
            digest = f"sha256:{model.digest}"
            yield {"status": "starting upload", "digest": digest, "total": total}
            await sim_sleep(self.fake.settings.pull_s)
            done = {"status": "starting upload", "digest": digest, "total": total}
            yield {**done, "completed": total}
            yield {"status": "pushing manifest"}
            yield {"status": "success"}

        return await self._answer(request, body.get("stream", True) is not False, pushing())

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        name = self._name(body)
        base_name, files = body.get("from"), body.get("files")
        if base_name:
            base = self.fake.model(str(base_name))
            if base is None:
                raise json_error(404, {"error": f"model '{base_name}' not found"})
            layers, size_mib = [f"sha256:{base.digest}"], base.size_mib
        elif isinstance(files, dict) and files:
            missing = [d for d in files.values() if d not in self.blobs]
            if missing:
                raise json_error(400, {"error": f"blob {missing[0]} not found"})
            layers = [str(d) for d in files.values()]
            size_mib = max(1, sum(self.blobs[d] for d in layers) // MIB)
        else:
            raise json_error(400, {"error": "neither 'from' or 'files' was specified"})
        canonical = name if ":" in name else f"{name}:latest"

        async def creating() -> Progress:
            for layer in layers:
                yield {"status": f"using existing layer {layer}"}
            yield {"status": "writing manifest"}
            self.fake.install(canonical, size_mib)
            yield {"status": "success"}

        return await self._answer(request, body.get("stream", True) is not False, creating())

    async def _copy(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(destination, str) or not destination:
            raise json_error(400, {"error": "destination is required"})
        model = self.fake.model(str(source))
        if model is None:
            raise json_error(404, {"error": f"model '{source}' not found"})
        target = destination if ":" in destination else f"{destination}:latest"
        self.fake.install(target, model.size_mib)
        return web.Response(status=200)

    async def _delete(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        name = self._name(body)
        model = self.fake.model(name)
        if model is None:
            raise json_error(404, {"error": f"model '{name}' not found"})
        self.fake.remove(model.name)
        return web.Response(status=200)

    async def _blob_exists(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if request.match_info["digest"] in self.blobs else 404)

    async def _blob_upload(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        if not DIGEST.fullmatch(digest):
            raise json_error(400, {"error": "invalid digest format"})
        if digest in self.blobs:
            return web.Response(status=200)
        hasher, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(UPLOAD_CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
        got = "sha256:" + hasher.hexdigest()
        if got != digest.replace("-", ":", 1):
            raise json_error(400, {"error": f'digest mismatch, expected "{digest}", got "{got}"'})
        self.blobs[digest] = size
        return web.Response(status=201)
