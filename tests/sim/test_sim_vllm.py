"""Fake vLLM: loads before serving, completions (JSON and SSE), sleep/wake_up."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from mgpumanager.sim import FakeVLLM, LocalLedger, SimGPU, VLLMSettings, serving

MODEL = "Qwen/Qwen2.5-7B-Instruct"


def make(gpu: SimGPU) -> FakeVLLM:
    settings = VLLMSettings(
        model=MODEL, vram_mib=16000, residual_mib=500, load_s=0, wake_s=0, run_s=0
    )
    return FakeVLLM(settings, ledger=LocalLedger(gpu))


async def test_completions_and_sleep_mode() -> None:
    gpu = SimGPU(24576)
    fake = make(gpu)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        assert gpu.held_by("vllm") == 16000  # loaded before the socket opened
        async with http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}) as r:
            body = await r.json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"]
        chat: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
        async with http.post("/v1/chat/completions", json=chat) as r:
            assert r.content_type == "text/event-stream"
            events = [line.decode().strip() async for line in r.content if line.strip()]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[0][len("data: ") :])["object"] == "chat.completion.chunk"
        async with http.post("/sleep?level=1") as r:
            assert r.status == 200
        async with http.get("/is_sleeping") as r:
            assert await r.json() == {"is_sleeping": True}
        assert gpu.held_by("vllm") == 500
        async with http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}) as r:
            assert r.status == 503
        gpu.allocate("comfyui", 20000)
        async with http.post("/wake_up") as r:
            assert r.status == 500
            assert "CUDA out of memory" in (await r.json())["error"]["message"]
        gpu.release("comfyui")
        async with http.post("/wake_up") as r:
            assert r.status == 200
        async with http.get("/is_sleeping") as r:
            assert await r.json() == {"is_sleeping": False}
        assert gpu.held_by("vllm") == 16000
        async with http.post("/v1/completions", json={"model": "other", "prompt": "hi"}) as r:
            assert r.status == 404
        async with http.get("/health") as r:
            assert r.status == 200
