"""The demo serves what the README promises OpenAI clients: the real `openai` SDK, pointed at
the demo's registry (the package's demo.yaml, its fakes on free ports), speaks and transcribes
through the broker under the names Open WebUI asks for (`tts-1`, `whisper-1`), and
`GET /v1/audio/models` and `/v1/audio/voices` answer in the shapes Open WebUI reads
(`models[].id`, `voices[].id` and `name`) and OpenAI-style clients read (`data`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from conftest import running_broker
from mgpumanager.daemon import Server
from mgpumanager.registry import load_config
from mgpumanager.registry.paths import demo_registry
from mgpumanager.sim.cluster import start_cluster
from mgpumanager.sim.speaches import FakeSpeaches
from mgpumanager.tools.demo import ephemeral_registry, ephemeral_spec

DEMO = demo_registry()
WAV = b"RIFF" + b"\0" * 4000


@pytest.fixture
async def demo() -> AsyncIterator[tuple[Server, FakeSpeaches]]:
    spec = ephemeral_spec(load_config(DEMO)).with_timing(load_s=0, run_s=0, free_delay_s=0)
    async with await start_cluster(spec=spec) as cluster:
        async with running_broker(ephemeral_registry(DEMO, cluster)) as server:
            fake = cluster.fakes["speaches"]
            assert isinstance(fake, FakeSpeaches)
            yield server, fake


def sdk(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{server.url}/v1",
        api_key="sk-anything",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
    )


async def test_speech_and_transcription_through_the_demo(
    demo: tuple[Server, FakeSpeaches],
) -> None:
    server, fake = demo
    async with sdk(server) as client:
        speech = await client.audio.speech.create(
            model="tts-1", voice="af_heart", input="Hello from the broker"
        )
        assert speech.content.startswith(b"RIFF")
        text = await client.audio.transcriptions.create(
            model="whisper-1", file=("hello.wav", WAV, "audio/wav")
        )
        assert text.text == fake.settings.transcript
    # Each reached speaches under its own name, through the lease.
    assert fake.uploads[-1].fields["model"] == "Systran/faster-whisper-small"
    assert server.broker.lease.core.stats().completed == 2
    record = server.broker.residency.view.records["speaches"]
    assert record.state.value == "resident"


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_audio_models_and_voices_in_open_webui_shapes(
    demo: tuple[Server, FakeSpeaches],
) -> None:
    server, fake = demo
    async with aiohttp.ClientSession() as session:
        status, models = await get(session, f"{server.url}/v1/audio/models")
        assert status == 200, models
        status, voices = await get(session, f"{server.url}/v1/audio/voices")
        assert status == 200, voices
    # What Open WebUI does with them: models[].id, {voice.id: voice.name}.
    ids = [m["id"] for m in models["models"]]
    assert ids == ["speaches-ai/Kokoro-82M-v1.0-ONNX", "tts-1", "tts-1-hd"]
    assert models["object"] == "list" and models["data"] == models["models"]
    assert all(m["owned_by"] == "speaches" for m in models["data"])
    named = {v["id"]: v["name"] for v in voices["voices"]}
    assert list(named) == list(fake.settings.voices)
    assert voices["data"] == voices["voices"]
    # The LLMs are not speech models.
    assert "qwen2.5:14b" not in ids and "gpt-4o-mini" not in ids
    async with sdk(server) as client:
        listed = [m.id for m in (await client.models.list()).data]
    assert {"tts-1", "whisper-1", "qwen2.5:14b"} <= set(listed)


async def test_no_audio_consumer_is_an_openai_error() -> None:
    from mgpumanager.registry import Config

    config = Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "static", "total_mib": 24576},
            "consumers": {"tts": {"url": "http://127.0.0.1:9", "vram_resident_mib": 100}},
        }
    )
    async with running_broker(config) as server, aiohttp.ClientSession() as session:
        for path in ("/v1/audio/models", "/v1/audio/voices"):
            status, answer = await get(session, server.url + path)
            assert status == 404, answer
            assert answer["error"]["code"] == "no_consumer", answer
