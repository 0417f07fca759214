"""The real `ollama` Python client pointed at the broker, which serves Ollama's whole API in
front of the fake Ollama: generate, chat and embed are scheduled through the lease and stream
as they are produced; tags, ps, show, version and model management (pull, create, copy,
delete, blobs) pass straight through, a pull's progress line by line."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import ollama
import pytest

from conftest import running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.ollama import FakeOllama, OllamaSettings

MODEL = "llama3.1:8b"
OTHER = "qwen2.5:14b"
PULLABLE = "tiny:1b"
CHUNKS = 4


@dataclasses.dataclass
class Box:
    cluster: SimCluster
    server: Server
    fake: FakeOllama
    client: ollama.AsyncClient

    def jobs(self) -> int:
        """Jobs the broker scheduled through its lease."""
        return self.server.broker.lease.core.stats().total_jobs


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    settings = OllamaSettings(
        models={MODEL: 6200, OTHER: 10400},
        load_s=0,
        run_s=0,
        embed_s=0,
        free_delay_s=0,
        chunks=CHUNKS,
        library={PULLABLE: 800},
        pull_s=0,
        pull_steps=3,
    )
    spec = FakeSpec(mvoice=None, ollama=settings, comfyui=None, whisper=None)
    async with await start_cluster(spec=spec) as cluster:
        config = Config.model_validate(
            {
                "listen": "127.0.0.1:0",
                "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
                "routing": {"llm": "ollama"},
                "scheduler": {"allow_priority_header": True},
                "consumers": {
                    "ollama": {
                        "type": "ollama",
                        "url": cluster.urls["ollama"],
                        "health": {"path": "/api/version", "interval_s": 0.05},
                        "vram_resident_mib": 10400,
                        "gpu_processes": ["ollama"],
                    }
                },
            }
        )
        async with (
            running_broker(config) as server,
            ollama.AsyncClient(host=server.url, trust_env=False) as client,
        ):
            yield Box(cluster, server, cast(FakeOllama, cluster.fakes["ollama"]), client)


async def test_generate_without_streaming(box: Box) -> None:
    answer = await box.client.generate(model=MODEL, prompt="Why is the sky blue?", stream=False)
    assert answer.done is True and answer.done_reason == "stop"
    assert answer.model == MODEL and (answer.response or "").startswith("The sky")
    assert answer.eval_count == CHUNKS
    assert box.jobs() == 1 and box.fake.completed_requests == 1


async def test_generate_streams_chunk_by_chunk(box: Box) -> None:
    stream = await box.client.generate(model=MODEL, prompt="Why is the sky blue?", stream=True)
    parts = [part async for part in stream]
    assert len(parts) == CHUNKS + 1
    assert [p.done for p in parts] == [False] * CHUNKS + [True]
    assert parts[-1].done_reason == "stop"
    assert "".join(p.response or "" for p in parts).startswith("The sky appears")
    assert box.jobs() == 1


async def test_chat_streams(box: Box) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    stream = await box.client.chat(model=MODEL, messages=messages, stream=True)
    parts = [part async for part in stream]
    assert len(parts) == CHUNKS + 1 and parts[-1].done is True
    assert all(p.message.role == "assistant" for p in parts)
    assert "".join(p.message.content or "" for p in parts).startswith("The sky")
    assert box.jobs() == 1


async def test_embed(box: Box) -> None:
    answer = await box.client.embed(model=MODEL, input=["first text", "second text"])
    assert answer.model == MODEL
    assert len(answer.embeddings) == 2 and answer.embeddings[0] != answer.embeddings[1]
    assert box.jobs() == 1


async def test_list_ps_show_and_version_pass_through_unscheduled(box: Box) -> None:
    listed = await box.client.list()
    assert {m.model for m in listed.models} == {MODEL, OTHER}
    assert (await box.client.ps()).models == []
    await box.client.generate(model=MODEL, prompt="hi", stream=False)
    [running] = (await box.client.ps()).models
    assert running.model == MODEL and running.size_vram == 6200 * 1024 * 1024
    shown = await box.client.show(MODEL)
    assert shown.details is not None and shown.details.format == "gguf"
    assert shown.modelfile == f"FROM {MODEL}\n"
    # This client version has no version(); any Ollama client calls the same endpoint.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{box.server.url}/api/version") as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["version"] == box.fake.settings.version
    assert box.jobs() == 1  # only the generate went through the lease


async def test_unknown_model_error_reaches_the_client(box: Box) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        await box.client.generate(model="nope:1b", prompt="hi", stream=False)
    assert caught.value.status_code == 404 and "not found" in caught.value.error


async def test_chunks_reach_the_client_while_ollama_is_still_generating(box: Box) -> None:
    box.fake.settings = dataclasses.replace(box.fake.settings, run_s=0.4, chunks=8)
    stream = await box.client.generate(model=MODEL, prompt="Why is the sky blue?", stream=True)
    first: Any = None
    rest = []
    async for part in stream:
        if first is None:
            first = part
            # The first line is here; the fake is still generating the others.
            assert box.fake.active_requests == 1 and box.fake.completed_requests == 0
            assert box.server.broker.lease.core.in_flight == 1
        else:
            rest.append(part)
    assert first is not None and first.done is False
    assert len(rest) == 8 and rest[-1].done is True
    await wait_for(lambda: box.fake.active_requests == 0, what="generate finished")
    assert box.fake.completed_requests == 1


async def test_heartbeat_head_and_get_root(box: Box) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.head(box.server.url + "/") as resp:
            assert resp.status == 200  # the `ollama` CLI's first call
        async with http.get(box.server.url + "/") as resp:
            assert await resp.text() == "Ollama is running"


async def test_pull_progress_reaches_the_client_before_the_pull_ends(box: Box) -> None:
    box.fake.settings = dataclasses.replace(box.fake.settings, pull_s=1.0, pull_steps=4)
    stream = await box.client.pull(PULLABLE, stream=True)
    statuses: list[ollama.ProgressResponse] = []
    async for progress in stream:
        if not statuses:
            # The first line is here; the fake is still downloading.
            assert progress.status == "pulling manifest"
            assert box.fake.models_api.pulls_in_progress == 1
        statuses.append(progress)
    downloads = [p for p in statuses if p.completed is not None]
    assert len(downloads) == 4 and downloads[-1].completed == downloads[-1].total
    assert statuses[-1].status == "success"
    assert box.fake.models_api.pulls_in_progress == 0
    assert PULLABLE in {m.model for m in (await box.client.list()).models}
    assert box.jobs() == 0  # a download is no GPU work


async def test_pull_without_streaming_and_a_pull_that_fails(box: Box) -> None:
    assert (await box.client.pull(PULLABLE)).status == "success"
    with pytest.raises(ollama.ResponseError) as caught:
        await box.client.pull("no-such-model")
    assert caught.value.error == "pull model manifest: file does not exist"


async def test_copy_create_and_delete(box: Box) -> None:
    assert (await box.client.copy(MODEL, "backup")).status == "success"
    progress = [p.status async for p in await box.client.create("mine", from_=MODEL, stream=True)]
    assert progress[-1] == "success"
    assert {"backup:latest", "mine:latest"} <= {m.model for m in (await box.client.list()).models}
    assert (await box.client.delete("backup")).status == "success"
    with pytest.raises(ollama.ResponseError) as caught:
        await box.client.delete("backup")
    assert caught.value.status_code == 404 and caught.value.error == "model 'backup' not found"
    assert "backup:latest" not in {m.model for m in (await box.client.list()).models}
    assert box.jobs() == 0


async def test_a_blob_upload_streams_through(box: Box, tmp_path: Any) -> None:
    path = tmp_path / "adapter.bin"
    path.write_bytes(b"\x01" * 200_000)
    digest = await box.client.create_blob(path)
    async with aiohttp.ClientSession() as http:
        async with http.head(f"{box.server.url}/api/blobs/{digest}") as resp:
            assert resp.status == 200
    assert box.fake.models_api.blobs == {digest: 200_000}


async def test_a_broker_error_shows_its_message(box: Box) -> None:
    async with ollama.AsyncClient(
        host=box.server.url, trust_env=False, headers={"X-Priority": "urgent"}
    ) as client:
        with pytest.raises(ollama.ResponseError) as caught:
            await client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 400
    assert caught.value.error == "X-Priority must be an integer 0..4, got 'urgent'"
