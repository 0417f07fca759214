"""Fake Ollama's OpenAI-compatible routes: models, chat and completions (JSON and SSE),
embeddings (float and base64), errors in OpenAI's shape."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import aiohttp

from mgpumanager.sim import FakeOllama, LocalLedger, OllamaSettings, SimGPU, serving

MODEL = "llama3:8b"


def make(**kw: Any) -> FakeOllama:
    base: dict[str, Any] = {
        "models": {MODEL: 5000, "qwen:14b": 9000},
        "load_s": 0,
        "run_s": 0,
        "embed_s": 0,
        "free_delay_s": 0,
        "chunks": 3,
    }
    return FakeOllama(OllamaSettings(**{**base, **kw}), ledger=LocalLedger(SimGPU(24576)))


async def sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """The `data:` payloads of an event stream, `[DONE]` kept as the string."""
    out: list[Any] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def test_models_list_and_one_model() -> None:
    fake = make()
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.get("/v1/models") as r:
            listed = await r.json()
        assert listed["object"] == "list"
        assert [m["id"] for m in listed["data"]] == [MODEL, "qwen:14b"]
        assert all(m["object"] == "model" and m["owned_by"] == "library" for m in listed["data"])
        async with http.get(f"/v1/models/{MODEL}") as r:
            assert (await r.json())["id"] == MODEL
        async with http.get("/v1/models/nope") as r:
            assert r.status == 404
            assert (await r.json())["error"]["type"] == "not_found_error"


async def test_chat_completion_json_and_stream() -> None:
    fake = make()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/v1/chat/completions", json=body) as r:
            answer = await r.json()
        assert answer["object"] == "chat.completion" and answer["model"] == MODEL
        [choice] = answer["choices"]
        assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
        assert choice["message"]["content"].startswith("The sky")
        assert answer["usage"]["completion_tokens"] == 3
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post("/v1/chat/completions", json=stream_body) as r:
            assert r.content_type == "text/event-stream"
            events = await sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "stop"]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[:3]).startswith("The sky")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert fake.completed_requests == 2 and fake.load_count == 1


async def test_text_completion_and_errors_in_openai_shape() -> None:
    fake = make()
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/v1/completions", json={"model": MODEL, "prompt": "Why"}) as r:
            answer = await r.json()
        assert answer["object"] == "text_completion" and answer["choices"][0]["text"]
        async with http.post("/v1/chat/completions", json={"model": "nope", "messages": []}) as r:
            assert r.status == 404
            error = (await r.json())["error"]
        assert error["type"] == "not_found_error" and "nope" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        async with http.post("/v1/chat/completions", json={"messages": []}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_embeddings_float_and_base64() -> None:
    fake = make()
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        body = {"model": MODEL, "input": ["one", "two"]}
        async with http.post("/v1/embeddings", json=body) as r:
            floats = await r.json()
        assert [d["index"] for d in floats["data"]] == [0, 1]
        first = floats["data"][0]["embedding"]
        assert len(first) == 16 and first != floats["data"][1]["embedding"]
        async with http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}) as r:
            packed = await r.json()
        raw = base64.b64decode(packed["data"][0]["embedding"])
        assert list(struct.unpack("<16f", raw)) == [
            struct.unpack("<f", struct.pack("<f", x))[0] for x in first
        ]
        async with http.post("/v1/embeddings", json={"model": MODEL, "input": 3}) as r:
            assert r.status == 400
