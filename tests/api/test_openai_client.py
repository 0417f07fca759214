"""The real `openai` Python SDK pointed at the broker's /v1, in front of the fake Ollama and the
fake speaches server: every call is routed by its model, generation routes are scheduled
through the lease, streams arrive chunk by chunk, and an alias reaches the upstream under the
upstream's own name."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import cast

import openai
import pytest

from conftest import running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.ollama import FakeOllama, OllamaSettings
from mgpumanager.sim.speaches import FakeSpeaches, SpeachesSettings

LLM = "llama3.1:8b"
EMBED = "nomic-embed-text:latest"
STT, TTS = "Systran/faster-whisper-small", "speaches-ai/Kokoro-82M-v1.0-ONNX"
CHUNKS = 4
WAV = b"RIFF" + b"\0" * 8000


@dataclasses.dataclass
class Box:
    cluster: SimCluster
    server: Server
    ollama: FakeOllama
    speaches: FakeSpeaches
    client: openai.AsyncOpenAI

    def jobs(self) -> int:
        return self.server.broker.lease.core.stats().total_jobs


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    spec = FakeSpec(
        mvoice=None,
        comfyui=None,
        whisper=None,
        ollama=OllamaSettings(models={LLM: 6200, EMBED: 300}, chunks=CHUNKS),
        speaches=SpeachesSettings(models={STT: 1000, TTS: 600}),
    ).with_timing(load_s=0, run_s=0, free_delay_s=0, embed_s=0)
    async with await start_cluster(spec=spec) as cluster:
        health = {"interval_s": 0.05}
        config = Config.model_validate(
            {
                "listen": "127.0.0.1:0",
                "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
                "consumers": {
                    "ollama": {
                        "type": "ollama",
                        "url": cluster.urls["ollama"],
                        "health": {"path": "/api/version", **health},
                        "vram_resident_mib": 6500,
                        "models": [{"name": LLM, "vram_mib": 6200}],
                        "aliases": {"gpt-4o-mini": LLM},
                    },
                    "speaches": {
                        "type": "speaches",
                        "url": cluster.urls["speaches"],
                        "health": health,
                        "vram_resident_mib": 1800,
                        "aliases": {"whisper-1": STT, "tts-1": TTS},
                    },
                },
            }
        )
        async with running_broker(config) as server:
            client = openai.AsyncOpenAI(
                base_url=f"{server.url}/v1",
                api_key="sk-anything",
                max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
            )
            async with client:
                yield Box(
                    cluster,
                    server,
                    cast(FakeOllama, cluster.fakes["ollama"]),
                    cast(FakeSpeaches, cluster.fakes["speaches"]),
                    client,
                )


async def test_models_list_names_every_model_and_its_owner(box: Box) -> None:
    models = {m.id: m.owned_by async for m in box.client.models.list()}
    assert models == {
        LLM: "ollama",
        "gpt-4o-mini": "ollama",
        EMBED: "ollama",
        "whisper-1": "speaches",
        "tts-1": "speaches",
        STT: "speaches",
        TTS: "speaches",
    }
    one = await box.client.models.retrieve("gpt-4o-mini")
    assert one.owned_by == "ollama"
    assert box.jobs() == 0  # listing is no GPU work


async def test_chat_streams_chunk_by_chunk_through_the_lease(box: Box) -> None:
    box.ollama.settings = dataclasses.replace(box.ollama.settings, run_s=0.4, chunks=8)
    stream = await box.client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Why is the sky blue?"}], stream=True
    )
    texts = []
    first_seen_while_generating = None
    async for chunk in stream:
        if first_seen_while_generating is None:
            # The first chunk is here; the fake is still generating the others.
            first_seen_while_generating = box.ollama.active_requests == 1
            assert box.server.broker.lease.core.in_flight == 1
        if chunk.choices:
            texts.append(chunk.choices[0].delta.content or "")
    assert first_seen_while_generating is True
    assert "".join(texts).startswith("The sky appears blue")
    assert box.jobs() == 1 and box.ollama.completed_requests == 1


async def test_an_alias_reaches_ollama_under_its_own_name(box: Box) -> None:
    answer = await box.client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.model == LLM and answer.choices[0].message.content
    assert box.ollama.resident_models() == [LLM]
    assert box.jobs() == 1


async def test_embeddings(box: Box) -> None:
    # The SDK asks for base64 and decodes it; the fake encodes float32 as Ollama does.
    answer = await box.client.embeddings.create(model=EMBED, input=["first", "second"])
    assert [d.index for d in answer.data] == [0, 1]
    assert len(answer.data[0].embedding) == 16
    assert answer.data[0].embedding != answer.data[1].embedding
    assert box.jobs() == 1


async def test_speech_and_transcription_go_to_speaches(box: Box) -> None:
    speech = await box.client.audio.speech.create(model="tts-1", voice="af", input="Hello")
    assert (await speech.aread())[:4] == b"RIFF"
    text = await box.client.audio.transcriptions.create(
        model="whisper-1", file=("hello.wav", WAV, "audio/wav")
    )
    assert text.text == box.speaches.settings.transcript
    # The alias was resolved inside the multipart form; the upload arrived whole.
    [upload] = box.speaches.uploads
    assert (upload.fields["model"], upload.filename, upload.file_bytes) == (
        STT,
        "hello.wav",
        len(WAV),
    )
    assert box.jobs() == 2


async def test_unknown_model_is_a_404_that_names_it(box: Box) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await box.client.chat.completions.create(
            model="gpt-5-turbo", messages=[{"role": "user", "content": "hi"}]
        )
    error = caught.value
    assert "gpt-5-turbo" in str(error) and LLM in str(error)
    assert error.code == "model_not_found" and error.param == "model"
    assert error.type == "invalid_request_error"
    assert box.jobs() == 0


async def test_a_model_pulled_a_moment_ago_is_found(box: Box) -> None:
    """The catalog refreshes in the background; a miss re-reads the lists once."""
    box.ollama.install("fresh:1b", 500)
    answer = await box.client.chat.completions.create(
        model="fresh:1b", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.model == "fresh:1b"
    await wait_for(lambda: box.ollama.active_requests == 0, what="answer done")
