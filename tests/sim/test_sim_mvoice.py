"""Fake mVoice: synthesize + audio fetch, streamed transcribe uploads, admin unload/load, OOM."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from mgpumanager.sim import FakeMVoice, LocalLedger, MVoiceSettings, SimGPU, serving, wait_until

FAST = MVoiceSettings(vram_mib=6000, load_s=0, run_s=0, free_delay_s=0)


async def test_synthesize_loads_lazily_and_serves_the_wav() -> None:
    gpu = SimGPU(24576)
    fake = FakeMVoice(FAST, ledger=LocalLedger(gpu))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.get("/health") as r:
            assert await r.json() == {"status": "ok", "loaded": False}
        async with http.post(
            "/api/synthesize?voice=anna&speed=1.2", json={"text": "Hallo Welt"}
        ) as r:
            assert r.status == 200
            body = await r.json()
        assert body["audio_url"].startswith("/audio/") and body["audio_url"].endswith(".wav")
        assert body["duration_s"] > 0
        assert gpu.held_by("mvoice") == 6000
        async with http.get(body["audio_url"]) as r:
            wav = await r.read()
            assert r.content_type == "audio/wav"
        assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
        async with http.head(body["audio_url"]) as r:
            assert r.status == 200
        async with http.get("/audio/nope.wav") as r:
            assert r.status == 404
        async with http.post("/api/synthesize", json={"text": ""}) as r:
            assert r.status == 400
    assert "voice=anna&speed=1.2" in fake.received_queries
    assert fake.load_count == 1


async def test_nested_audio_paths() -> None:
    fake = FakeMVoice(
        MVoiceSettings(load_s=0, run_s=0, audio_subdir="2026/06"), ledger=LocalLedger(SimGPU(8000))
    )
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/synthesize", json={"text": "x"}) as r:
            url = (await r.json())["audio_url"]
        assert url.startswith("/audio/2026/06/")
        async with http.get(url) as r:
            assert r.status == 200


async def test_transcribe_reads_the_upload_as_a_stream() -> None:
    fake = FakeMVoice(FAST, ledger=LocalLedger(SimGPU(24576)))
    chunk = b"\x01" * 256 * 1024
    second_half = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield chunk
        await fake.upload_started.wait()  # the fake has bytes before the client sent the rest
        second_half.set()
        for _ in range(19):
            yield chunk

    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post(
            "/api/transcribe", data=body(), headers={"Content-Type": "audio/wav"}
        ) as r:
            assert r.status == 200
            result = await r.json()
        assert second_half.is_set()
        assert result == {"text": fake.settings.transcript, "bytes": 20 * len(chunk)}
        form = aiohttp.FormData()
        form.add_field("language", "de")
        form.add_field("file", b"\x02" * 3000, filename="a.wav", content_type="audio/wav")
        async with http.post("/api/transcribe?lang=de", data=form) as r:
            assert (await r.json())["bytes"] == 3000
    assert fake.bytes_received == 20 * len(chunk) + 3000


async def test_unload_answers_then_memory_returns_after_the_free_delay() -> None:
    gpu = SimGPU(24576)
    fake = FakeMVoice(MVoiceSettings(load_s=0, run_s=0, free_delay_s=0.3), ledger=LocalLedger(gpu))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/admin/load") as r:
            assert await r.json() == {"status": "loaded"}
        assert gpu.held_by("mvoice") == 6000
        async with http.post("/api/admin/unload", json={}) as r:
            assert await r.json() == {"status": "unloaded"}
        assert not fake.loaded
        assert gpu.held_by("mvoice") == 6000  # driver lag: still shown as used
        await wait_until(lambda: gpu.held_by("mvoice") == 0, what="memory back")
        async with http.post("/api/admin/unload") as r:  # idempotent
            assert r.status == 200
        async with http.get("/health") as r:
            assert (await r.json())["loaded"] is False
    assert (fake.load_count, fake.unload_count) == (1, 1)


async def test_cuda_oom_answers_500_and_stays_unloaded() -> None:
    gpu = SimGPU(8000)
    gpu.allocate("ollama", 4000)
    fake = FakeMVoice(FAST, ledger=LocalLedger(gpu))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/synthesize", json={"text": "hi"}) as r:
            assert r.status == 500
            assert "CUDA out of memory" in (await r.json())["error"]
        async with http.post("/api/admin/load") as r:
            assert r.status == 500
        assert not fake.loaded
        assert gpu.oom_count == 2 and fake.oom_count == 2
        gpu.release("ollama")
        async with http.post("/api/synthesize", json={"text": "hi"}) as r:
            assert r.status == 200


async def test_without_lazy_load_a_job_on_an_unloaded_model_is_refused() -> None:
    fake = FakeMVoice(
        MVoiceSettings(load_s=0, run_s=0, lazy_load=False), ledger=LocalLedger(SimGPU(8000))
    )
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/synthesize", json={"text": "hi"}) as r:
            assert r.status == 503
        async with http.post("/api/admin/load") as r:
            assert r.status == 200
        async with http.post("/api/synthesize", json={"text": "hi"}) as r:
            assert r.status == 200
