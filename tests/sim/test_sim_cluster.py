"""The whole simulated box: without a broker, concurrent clients drive the card into CUDA OOM."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from mgpumanager.sim import (
    ComfyUISettings,
    FakeSpec,
    MVoiceSettings,
    OllamaSettings,
    SpeachesSettings,
    VLLMSettings,
    WhisperSettings,
    start_cluster,
    wait_until,
)

GRAPH = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
    "9": {"class_type": "SaveImage", "inputs": {}},
}


def hammer_spec() -> FakeSpec:
    return FakeSpec(
        mvoice=MVoiceSettings(vram_mib=6000),
        ollama=OllamaSettings(models={"llama3.3:70b-q2": 14000}),
        comfyui=ComfyUISettings(model_mib=12000),
        whisper=WhisperSettings(model_mib=3000),
    ).with_timing(load_s=0.05, run_s=0.05, free_delay_s=0)


async def test_hammering_the_fakes_directly_produces_cuda_oom() -> None:
    async with await start_cluster(total_mib=24576, spec=hammer_spec()) as cluster:
        urls = cluster.urls
        assert set(urls) == {"mvoice", "ollama", "comfyui", "whisper"}
        async with aiohttp.ClientSession() as http:
            await wait_until(lambda: cluster.gpu.held_by("whisper-server") == 3000, what="whisper")

            async def tts() -> int:
                async with http.post(urls["mvoice"] + "/api/synthesize", json={"text": "hi"}) as r:
                    await r.read()
                    return r.status

            async def llm() -> int:
                body = {"model": "llama3.3:70b-q2", "prompt": "hi"}
                async with http.post(urls["ollama"] + "/api/generate", json=body) as r:
                    await r.read()
                    return r.status

            async def image() -> int:
                async with http.post(urls["comfyui"] + "/prompt", json={"prompt": GRAPH}) as r:
                    pid = (await r.json())["prompt_id"]

                async def done() -> bool:
                    async with http.get(f"{urls['comfyui']}/history/{pid}") as h:
                        return bool(await h.json())

                await wait_until(done, what="prompt done")
                async with http.get(f"{urls['comfyui']}/history/{pid}") as h:
                    ok = (await h.json())[pid]["status"]["status_str"] == "success"
                return 200 if ok else 500

            async def stt() -> int:
                form = aiohttp.FormData()
                form.add_field("file", b"\x00" * 1024, filename="a.wav")
                async with http.post(urls["whisper"] + "/inference", data=form) as r:
                    await r.read()
                    return r.status

            jobs: list[Any] = [f() for _ in range(3) for f in (tts, llm, image, stt)]
            statuses = await asyncio.gather(*jobs)
        snapshot = cluster.gpu.snapshot()
    assert cluster.gpu.oom_count > 0, snapshot
    assert 500 in statuses
    assert snapshot["peak_used_mib"] <= 24576
    assert {p["name"] for p in snapshot["processes"]} <= {
        "mvoice",
        "ollama",
        "comfyui",
        "whisper-server",
    }


async def test_cluster_serves_the_gpu_reading_and_every_requested_fake() -> None:
    spec = FakeSpec.instant(
        speaches=None, whisper=None, mvoice=MVoiceSettings(), ollama=None, comfyui=None
    )
    cluster = await start_cluster(total_mib=8192, spec=spec, gpu_name="Sim 8G")
    try:
        assert set(cluster.urls) == {"mvoice"}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                cluster.urls["mvoice"] + "/api/synthesize", json={"text": "x"}
            ) as r:
                assert r.status == 200
            async with http.get(cluster.gpu_url + "/v1/gpu") as r:
                snap = await r.json()
        assert snap["name"] == "Sim 8G"
        assert snap["processes"] == [{"pid": None, "name": "mvoice", "used_mib": 6000}]
        assert [i.consumer for i in cluster.activity.intervals()] == ["mvoice"]
    finally:
        await cluster.aclose()


async def test_all_six_fakes_start_and_close() -> None:
    spec = FakeSpec.instant(speaches=SpeachesSettings(), vllm=VLLMSettings(vram_mib=4000))
    async with await start_cluster(total_mib=65536, spec=spec) as cluster:
        assert set(cluster.urls) == {"mvoice", "ollama", "comfyui", "whisper", "speaches", "vllm"}
        assert cluster.gpu.held_by("vllm") == 4000


def test_with_timing_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown timing"):
        FakeSpec().with_timing(sleep_s=1)
    spec = FakeSpec.instant()
    assert spec.ollama is not None and spec.ollama.load_s == 0 and spec.ollama.embed_s == 0
