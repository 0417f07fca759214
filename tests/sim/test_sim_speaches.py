"""Fake speaches: auto-load, /api/ps load/unload with 201/409/404, residual memory, TTL."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from mgpumanager.sim import FakeSpeaches, LocalLedger, SimGPU, SpeachesSettings, serving, wait_until

STT, TTS = "Systran/faster-whisper-small", "speaches-ai/Kokoro-82M-v1.0-ONNX"


def make(gpu: SimGPU, **kw: Any) -> FakeSpeaches:
    base: dict[str, Any] = {
        "models": {STT: 1000, TTS: 600},
        "residual_mib": 200,
        "load_s": 0,
        "run_s": 0,
        "free_delay_s": 0,
    }
    base.update(kw)
    return FakeSpeaches(SpeachesSettings(**base), ledger=LocalLedger(gpu))


def transcription_form(model: str = STT) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("model", model)
    form.add_field("file", b"\x00" * 4096, filename="a.wav", content_type="audio/wav")
    return form


async def ps(http: aiohttp.ClientSession) -> list[str]:
    async with http.get("/api/ps") as r:
        return list((await r.json())["models"])


async def test_models_load_on_request_and_unload_leaves_a_residual() -> None:
    gpu = SimGPU(24576)
    fake = make(gpu)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/v1/audio/transcriptions", data=transcription_form()) as r:
            assert await r.json() == {"text": fake.settings.transcript}
        assert await ps(http) == [STT]
        async with http.post(
            "/v1/audio/speech", json={"model": TTS, "input": "hallo", "voice": "af"}
        ) as r:
            assert r.content_type == "audio/wav" and (await r.read())[:4] == b"RIFF"
        assert gpu.held_by("speaches") == 200 + 1000 + 600
        async with http.post(f"/api/ps/{STT}") as r:
            assert r.status == 409
        async with http.post("/api/ps/no/such-model") as r:
            assert r.status == 404
        async with http.delete(f"/api/ps/{TTS}") as r:
            assert r.status == 200
        async with http.delete(f"/api/ps/{TTS}") as r:
            assert r.status == 404
        async with http.post(f"/api/ps/{TTS}") as r:
            assert r.status == 201
        for model in (STT, TTS):
            async with http.delete(f"/api/ps/{model}") as r:
                assert r.status == 200
        await wait_until(lambda: gpu.held_by("speaches") == 200, what="only the residual left")
        assert await ps(http) == []
        async with http.get("/health") as r:
            assert r.status == 200


async def test_unload_while_in_use_is_409() -> None:
    gpu = SimGPU(24576)
    fake = make(gpu, run_s=30)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        busy = asyncio.ensure_future(
            http.post("/v1/audio/transcriptions", data=transcription_form())
        )
        try:
            await wait_until(lambda: fake.loaded.get(STT) == 1, what="in use")
            async with http.delete(f"/api/ps/{STT}") as r:
                assert r.status == 409
        finally:
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)
        await wait_until(lambda: fake.loaded.get(STT) == 0, what="released after cancel")


async def test_ttl_unloads_by_itself() -> None:
    gpu = SimGPU(24576)
    fake = make(gpu, ttl_s=0.05)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/v1/audio/transcriptions", data=transcription_form()) as r:
            assert r.status == 200
        await wait_until(lambda: gpu.held_by("speaches") == 200, what="ttl expired")
        assert await ps(http) == []


async def test_cuda_oom_is_a_500() -> None:
    gpu = SimGPU(1000)
    gpu.allocate("comfyui", 500)
    fake = make(gpu)
    async with (
        serving(fake.app) as server,
        aiohttp.ClientSession(server.url) as http,
        http.post("/v1/audio/transcriptions", data=transcription_form()) as r,
    ):
        assert r.status == 500
        assert "CUDA out of memory" in (await r.json())["detail"]
    assert gpu.oom_count == 1 and fake.loaded == {}


async def test_openai_audio_routes_and_response_formats() -> None:
    fake = make(SimGPU(24576))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.get("/v1/models") as r:
            assert {m["id"] for m in (await r.json())["data"]} == {STT, TTS}
        async with http.post("/v1/audio/translations", data=transcription_form()) as r:
            assert await r.json() == {"text": fake.settings.translation}
        form = transcription_form()
        form.add_field("response_format", "text")
        async with http.post("/v1/audio/transcriptions", data=form) as r:
            assert await r.text() == fake.settings.transcript
        form = transcription_form()
        form.add_field("response_format", "verbose_json")
        async with http.post("/v1/audio/transcriptions", data=form) as r:
            verbose = await r.json()
        assert verbose["text"] == fake.settings.transcript and verbose["segments"]
        no_file = aiohttp.FormData()
        no_file.add_field("model", STT)
        async with http.post("/v1/audio/transcriptions", data=no_file) as r:
            assert r.status == 422
    assert [u.fields["model"] for u in fake.uploads] == [STT] * 3
    assert all(u.file_bytes == 4096 for u in fake.uploads)
