"""The fake ComfyUI's files: the images its prompts save (named as ComfyUI names them), the
inputs clients upload (`POST /upload/image`, renamed on a clash unless `overwrite`), `GET /view`
to fetch either, and `GET /object_info`, whose `LoadImage` lists the uploaded inputs."""

from __future__ import annotations

import itertools
from typing import Any

from aiohttp import BodyPartReader, web

from mgpumanager.sim._base import UPLOAD_CHUNK_BYTES, tiny_png
from mgpumanager.sim.comfyui_nodes import object_info as describe_nodes


class ComfyFiles:
    def __init__(self) -> None:
        self.files: dict[tuple[str, str, str], bytes] = {}  # (type, subfolder, filename) -> bytes
        self._counters: dict[str, itertools.count[int]] = {}

    def save_image(self, node: dict[str, Any]) -> dict[str, str]:
        """Store one generated image as ComfyUI names it; its `images` entry."""
        preview = str(node.get("class_type", "")).startswith("Preview")
        inputs = node.get("inputs")
        prefix = inputs.get("filename_prefix") if isinstance(inputs, dict) else None
        if not isinstance(prefix, str) or not prefix or preview:
            prefix = "ComfyUI_temp" if preview else "ComfyUI"
        counter = self._counters.setdefault(prefix, itertools.count(1))
        name = f"{prefix}_{next(counter):05d}_.png"
        kind = "temp" if preview else "output"
        self.files[(kind, "", name)] = tiny_png()
        return {"filename": name, "subfolder": "", "type": kind}

    async def view(self, request: web.Request) -> web.Response:
        q = request.query
        key = (q.get("type", "output"), q.get("subfolder", ""), q.get("filename", ""))
        data = self.files.get(key)
        if data is None:
            return web.Response(status=404)
        ctype = "image/png" if key[2].endswith(".png") else "application/octet-stream"
        return web.Response(body=data, content_type=ctype)

    async def upload_image(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return web.Response(status=400)
        fields: dict[str, str] = {}
        filename: str | None = None
        data = b""
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "image":
                filename = part.filename
                chunks = []
                while chunk := await part.read_chunk(UPLOAD_CHUNK_BYTES):
                    chunks.append(chunk)
                data = b"".join(chunks)
            elif part.name is not None:
                fields[part.name] = await part.text()
        kind = fields.get("type") or "input"
        subfolder = fields.get("subfolder", "")
        if not filename or kind not in ("input", "output", "temp") or ".." in subfolder:
            return web.Response(status=400)
        if fields.get("overwrite") not in ("true", "1"):
            stem, dot, ext = filename.rpartition(".")
            stem, ext = (stem, dot + ext) if dot else (filename, "")
            i = 1
            while (existing := self.files.get((kind, subfolder, filename))) is not None:
                if existing == data:
                    break  # the same image again: the same name
                filename = f"{stem} ({i}){ext}"
                i += 1
        self.files[(kind, subfolder, filename)] = data
        return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})

    def nodes(self) -> dict[str, Any]:
        inputs = sorted(name for kind, sub, name in self.files if kind == "input" and not sub)
        return describe_nodes(inputs)

    async def object_info(self, _request: web.Request) -> web.Response:
        return web.json_response(self.nodes())

    async def object_info_one(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        nodes = self.nodes()
        return web.json_response({name: nodes[name]} if name in nodes else {})
