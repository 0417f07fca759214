"""Fake Ollama's model management: pull (progress line by line over pull_s), push, create from
a model or from uploaded blobs, copy, delete, blobs, and `HEAD /`."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import aiohttp

from mgpumanager.sim import FakeOllama, LocalLedger, OllamaSettings, SimGPU, serving

MODEL = "llama3:8b"


def make(**kw: Any) -> FakeOllama:
    base: dict[str, Any] = {
        "models": {MODEL: 5000},
        "library": {"tiny:1b": 800},
        "load_s": 0,
        "run_s": 0,
        "free_delay_s": 0,
        "pull_s": 0,
        "pull_steps": 3,
    }
    return FakeOllama(OllamaSettings(**{**base, **kw}), ledger=LocalLedger(SimGPU(24576)))


async def tags(http: aiohttp.ClientSession) -> list[str]:
    async with http.get("/api/tags") as r:
        return sorted(m["name"] for m in (await r.json())["models"])


async def ndjson(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    return [json.loads(line) async for line in resp.content if line.strip()]


async def test_root_answers_head_and_get() -> None:
    async with serving(make().app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.head("/") as r:
            assert r.status == 200
        async with http.get("/") as r:
            assert await r.text() == "Ollama is running"


async def test_pull_streams_progress_then_installs() -> None:
    fake = make(pull_s=0.6)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/pull", json={"model": "tiny:1b"}) as r:
            assert r.content_type == "application/x-ndjson"
            first = json.loads(await r.content.readline())
            # The first line is out while the download is still going.
            assert first == {"status": "pulling manifest"} and fake.models_api.pulls_in_progress
            rest = await ndjson(r)
        downloads = [x for x in rest if "completed" in x]
        assert len(downloads) == 3
        assert [d["completed"] for d in downloads] == sorted(d["completed"] for d in downloads)
        assert downloads[-1]["completed"] == downloads[-1]["total"]
        assert downloads[0]["status"] == f"pulling {downloads[0]['digest'][7:19]}"
        assert [x["status"] for x in rest[-3:]] == [
            "verifying sha256 digest",
            "writing manifest",
            "success",
        ]
        assert await tags(http) == [MODEL, "tiny:1b"]
        assert fake.models_api.pulls_in_progress == 0


async def test_pull_unknown_model_and_without_streaming() -> None:
    fake = make()
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/pull", json={"model": "nope"}) as r:
            assert r.status == 200  # the stream had started
            lines = await ndjson(r)
        assert lines == [
            {"status": "pulling manifest"},
            {"error": "pull model manifest: file does not exist"},
        ]
        async with http.post("/api/pull", json={"model": "nope", "stream": False}) as r:
            assert r.status == 500 and "does not exist" in (await r.json())["error"]
        async with http.post("/api/pull", json={"name": "tiny:1b", "stream": False}) as r:
            assert await r.json() == {"status": "success"}
        async with http.post("/api/pull", json={}) as r:
            assert r.status == 400


async def test_copy_delete_push() -> None:
    fake = make()
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/copy", json={"source": MODEL, "destination": "mine"}) as r:
            assert r.status == 200 and await r.read() == b""
        assert await tags(http) == [MODEL, "mine:latest"]
        async with http.post("/api/copy", json={"source": "nope", "destination": "x"}) as r:
            assert r.status == 404 and await r.json() == {"error": "model 'nope' not found"}
        async with http.delete("/api/delete", json={"model": "mine"}) as r:
            assert r.status == 200
        async with http.delete("/api/delete", json={"model": "mine"}) as r:
            assert r.status == 404 and await r.json() == {"error": "model 'mine' not found"}
        assert await tags(http) == [MODEL]
        async with http.post("/api/push", json={"model": MODEL}) as r:
            statuses = [x["status"] for x in await ndjson(r)]
        assert statuses[0] == "retrieving manifest" and statuses[-1] == "success"


async def test_delete_unloads_a_loaded_model() -> None:
    gpu = SimGPU(24576)
    fake = FakeOllama(
        OllamaSettings(models={MODEL: 5000}, load_s=0, run_s=0, free_delay_s=0),
        ledger=LocalLedger(gpu),
    )
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        body = {"model": MODEL, "prompt": "hi", "stream": False}
        async with http.post("/api/generate", json=body) as r:
            assert r.status == 200
        assert gpu.held_by("ollama") == 5000
        async with http.delete("/api/delete", json={"model": MODEL}) as r:
            assert r.status == 200
        assert fake.unload_count == 1


async def test_blobs_and_create() -> None:
    fake = make()
    data = b"GGUF" + b"\0" * 4096
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.head(f"/api/blobs/{digest}") as r:
            assert r.status == 404
        wrong = "sha256:" + "0" * 64
        async with http.post(f"/api/blobs/{wrong}", data=data) as r:
            assert r.status == 400 and "digest mismatch" in (await r.json())["error"]
        async with http.post("/api/blobs/sha256:xyz", data=data) as r:
            assert r.status == 400
        async with http.post(f"/api/blobs/{digest}", data=data) as r:
            assert r.status == 201
        async with http.post(f"/api/blobs/{digest}", data=data) as r:
            assert r.status == 200  # already there
        async with http.head(f"/api/blobs/{digest}") as r:
            assert r.status == 200
        create = {"model": "fromfile", "files": {"model.gguf": digest}}
        async with http.post("/api/create", json=create) as r:
            lines = await ndjson(r)
        assert lines[0] == {"status": f"using existing layer {digest}"}
        assert lines[-1] == {"status": "success"}
        copy_of = {"model": "x", "from": MODEL, "stream": False}
        async with http.post("/api/create", json=copy_of) as r:
            assert await r.json() == {"status": "success"}
        async with http.post("/api/create", json={"model": "y"}) as r:
            assert r.status == 400
        async with http.post("/api/create", json={"model": "y", "from": "nope"}) as r:
            assert r.status == 404
        assert await tags(http) == ["fromfile:latest", MODEL, "x:latest"]
