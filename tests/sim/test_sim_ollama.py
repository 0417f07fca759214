"""Fake Ollama: lazy load, NDJSON streaming, keep_alive, unload semantics, own eviction, OOM."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import ollama
import pytest

from mgpumanager.sim import (
    FakeOllama,
    LocalLedger,
    OllamaSettings,
    SimGPU,
    parse_keep_alive,
    serve_app,
    serving,
    wait_until,
)
from mgpumanager.sim.gpu import MIB


def settings(**kw: Any) -> OllamaSettings:
    base: dict[str, Any] = {
        "models": {"llama3:8b": 5000, "qwen:14b": 9000},
        "load_s": 0,
        "run_s": 0,
        "free_delay_s": 0,
        "chunks": 4,
    }
    base.update(kw)
    return OllamaSettings(**base)


async def ps(http: aiohttp.ClientSession) -> list[str]:
    async with http.get("/api/ps") as r:
        return [m["name"] for m in (await r.json())["models"]]


def test_parse_keep_alive() -> None:
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("10s") == 10
    assert parse_keep_alive("250ms") == 0.25
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive("0") == 0
    assert parse_keep_alive("300") == 300
    assert parse_keep_alive(-1) is None
    assert parse_keep_alive("-1") is None
    assert parse_keep_alive("-1m") is None
    for bad in ("soon", "5 minutes", True, None, "m5"):
        with pytest.raises(ValueError):
            parse_keep_alive(bad)


async def test_generate_streams_ndjson_and_loads_lazily() -> None:
    gpu = SimGPU(24576)
    fake = FakeOllama(settings(run_s=0.04), ledger=LocalLedger(gpu))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        assert await ps(http) == []
        async with http.post("/api/generate", json={"model": "llama3:8b", "prompt": "why?"}) as r:
            assert r.status == 200
            assert r.content_type == "application/x-ndjson"
            lines = [json.loads(line) async for line in r.content if line.strip()]
        assert len(lines) == 5
        assert all(not x["done"] and x["response"] for x in lines[:-1])
        last = lines[-1]
        assert (last["done"], last["done_reason"], last["model"]) == (True, "stop", "llama3:8b")
        assert {"created_at", "eval_count", "total_duration", "load_duration", "context"} <= set(
            last
        )
        assert gpu.held_by("ollama") == 5000
        async with http.get("/api/ps") as r:
            [entry] = (await r.json())["models"]
        assert entry["size_vram"] == 5000 * MIB and entry["model"] == "llama3:8b"
        assert {"name", "size", "expires_at", "digest", "details"} <= set(entry)
        body = {
            "model": "llama3:8b",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
        }
        async with http.post("/api/chat", json=body) as r:
            chat = await r.json()
        assert (
            chat["done"] and chat["message"]["role"] == "assistant" and chat["message"]["content"]
        )
    assert fake.load_count == 1 and fake.completed_requests == 2


async def test_unknown_model_and_bad_bodies() -> None:
    fake = FakeOllama(settings(), ledger=LocalLedger(SimGPU(24576)))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/generate", json={"model": "x", "prompt": "p"}) as r:
            assert r.status == 404
            assert await r.json() == {"error": 'model "x" not found, try pulling it first'}
        async with http.post("/api/generate", json={"prompt": "p"}) as r:
            assert r.status == 400
        async with http.post(
            "/api/generate", json={"model": "llama3:8b", "keep_alive": "soon"}
        ) as r:
            assert r.status == 400
        async with http.get("/api/version") as r:
            assert "version" in await r.json()
        async with http.get("/api/tags") as r:
            assert {m["name"] for m in (await r.json())["models"]} == {"llama3:8b", "qwen:14b"}
        async with http.post("/api/show", json={"model": "qwen:14b"}) as r:
            assert r.status == 200 and "details" in await r.json()
        async with http.post("/api/embed", json={"model": "llama3:8b", "input": ["a", "b"]}) as r:
            assert len((await r.json())["embeddings"]) == 2


async def test_unload_answers_at_once_and_waits_for_the_request_in_flight() -> None:
    gpu = SimGPU(24576)
    fake = FakeOllama(settings(run_s=0.6, chunks=6, free_delay_s=0.5), ledger=LocalLedger(gpu))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        r = await http.post("/api/generate", json={"model": "llama3:8b", "prompt": "long"})
        try:
            first = json.loads(await r.content.readline())
            assert first["done"] is False
            async with http.post(
                "/api/generate", json={"model": "llama3:8b", "keep_alive": 0}
            ) as u:
                unload = await u.json()
            assert u.status == 200
            assert (unload["done"], unload["done_reason"]) == (True, "unload")
            # Answered before anything was freed: the request in flight keeps the model.
            assert await ps(http) == ["llama3:8b"] and gpu.held_by("ollama") == 5000
            rest = [json.loads(line) async for line in r.content if line.strip()]
            assert rest[-1]["done_reason"] == "stop"
        finally:
            r.release()
        await wait_until(lambda: fake.model_state("llama3:8b") != "loaded", what="runner gone")
        assert await ps(http) == []
        assert gpu.held_by("ollama") == 5000  # gone from /api/ps, memory not back yet
        await wait_until(lambda: gpu.held_by("ollama") == 0, what="memory back")
    assert fake.unload_count == 1


async def test_unload_of_an_idle_model_and_load_with_an_empty_prompt() -> None:
    gpu = SimGPU(24576)
    fake = FakeOllama(settings(), ledger=LocalLedger(gpu))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/generate", json={"model": "qwen:14b"}) as r:
            assert (await r.json())["done_reason"] == "load"
        assert await ps(http) == ["qwen:14b"]
        body = {"model": "qwen:14b", "messages": [], "keep_alive": "0s", "stream": False}
        async with http.post("/api/chat", json=body) as r:
            assert (await r.json())["done_reason"] == "unload"
        await wait_until(lambda: gpu.held_by("ollama") == 0, what="memory back")


async def test_keep_alive_expiry_and_forever() -> None:
    gpu = SimGPU(24576)
    fake = FakeOllama(settings(), ledger=LocalLedger(gpu))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        body = {"model": "llama3:8b", "prompt": "x", "keep_alive": "50ms", "stream": False}
        async with http.post("/api/generate", json=body) as r:
            assert r.status == 200
        await wait_until(lambda: gpu.held_by("ollama") == 0, what="expired")
        body = {"model": "llama3:8b", "prompt": "x", "keep_alive": -1, "stream": False}
        async with http.post("/api/generate", json=body) as r:
            assert r.status == 200
        async with http.get("/api/ps") as r:
            assert (await r.json())["models"][0]["expires_at"].startswith("2318")


async def test_client_disconnect_mid_stream_is_seen_as_aborted() -> None:
    fake = FakeOllama(settings(run_s=5, chunks=50), ledger=LocalLedger(SimGPU(24576)))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        r = await http.post("/api/generate", json={"model": "llama3:8b", "prompt": "long"})
        await r.content.readline()
        assert fake.active_requests == 1
        r.close()
        await wait_until(lambda: fake.aborted_requests == 1, what="abort seen")
        await wait_until(lambda: fake.active_requests == 0, what="slot released")


async def test_own_eviction_sees_only_its_own_models() -> None:
    gpu = SimGPU(24576)
    fake = FakeOllama(settings(max_loaded_models=1), ledger=LocalLedger(gpu))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        for model in ("llama3:8b", "qwen:14b"):
            async with http.post("/api/generate", json={"model": model, "prompt": "x"}) as r:
                await r.read()
        assert await ps(http) == ["qwen:14b"]
        assert gpu.allocations() == {("ollama", "qwen:14b"): 9000}
        assert gpu.oom_count == 0
        async with http.post("/api/generate", json={"model": "qwen:14b", "keep_alive": 0}) as r:
            assert r.status == 200
        await wait_until(lambda: gpu.held_by("ollama") == 0, what="memory back")
        # Someone else fills the card: Ollama cannot know, and runs into CUDA OOM.
        gpu.allocate("comfyui", 20000)
        async with http.post("/api/generate", json={"model": "llama3:8b", "prompt": "x"}) as r:
            assert r.status == 500
            assert "CUDA out of memory" in (await r.json())["error"]
        assert gpu.oom_count == 1 and await ps(http) == []


async def test_server_busy_when_its_queue_is_full() -> None:
    fake = FakeOllama(settings(run_s=5, chunks=50, max_queue=1), ledger=LocalLedger(SimGPU(24576)))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        body = {"model": "llama3:8b", "prompt": "x"}
        running = await http.post("/api/generate", json=body)
        waiting = asyncio.ensure_future(http.post("/api/generate", json=body))
        try:
            await wait_until(lambda: fake.queued_requests == 1, what="one queued")
            async with http.post("/api/generate", json=body) as r:
                assert r.status == 503
                assert "server busy" in (await r.json())["error"]
        finally:
            running.close()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting


async def test_the_real_ollama_client_works_against_the_fake() -> None:
    fake = FakeOllama(settings(), ledger=LocalLedger(SimGPU(24576)))
    async with serving(fake.app) as server:
        client = ollama.AsyncClient(host=server.url)
        try:
            parts = [
                p async for p in await client.generate(model="llama3:8b", prompt="hi", stream=True)
            ]
            assert parts[-1].done and parts[-1].done_reason == "stop"
            listed = await client.ps()
            assert [m.model for m in listed.models] == ["llama3:8b"]
            unload = await client.generate(model="llama3:8b", prompt="", keep_alive=0)
            assert unload.done_reason == "unload"
            await wait_until(lambda: fake.resident_models() == [], what="unloaded")
        finally:
            await client.close()  # type: ignore[no-untyped-call]


async def test_abort_is_detected_without_handler_cancellation_too() -> None:
    fake = FakeOllama(settings(run_s=5, chunks=50), ledger=LocalLedger(SimGPU(24576)))
    server = await serve_app(fake.app, handler_cancellation=False, shutdown_timeout_s=1)
    try:
        async with aiohttp.ClientSession(server.url) as http:
            r = await http.post("/api/generate", json={"model": "llama3:8b", "prompt": "long"})
            await r.content.readline()
            r.close()
            await wait_until(lambda: fake.aborted_requests == 1, what="abort seen")
            await wait_until(lambda: fake.active_requests == 0, what="slot released")
    finally:
        await server.aclose()
