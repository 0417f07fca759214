"""Per-model residency through a real broker on the simulated GPU (24 GiB): with FLUX (ComfyUI,
12 GiB) resident, a chat on a resident 7B model and a small embedding call each evict nothing —
the consumer's declared cost (its largest model, 14 GiB) would not have fitted beside FLUX.
When room is needed inside Ollama, its other models go one by one, least recently used first.
(A model Ollama does not have: test_model_names.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from conftest import running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.ollama import OllamaSettings

CHAT = "qwen2.5:7b"
EMBED = "nomic-embed-text:latest"
BIG = "qwen2.5:14b"
GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}
SPEC = FakeSpec(
    mvoice=None,
    whisper=None,
    ollama=OllamaSettings(
        models={CHAT: 4700, EMBED: 600, BIG: 11000},
        load_s=0,
        run_s=0.01,
        free_delay_s=0.02,
        chunks=2,
        max_loaded_models=3,
    ),
    comfyui=ComfyUISettings(model_mib=12000, ctx_mib=300, load_s=0, run_s=0, free_delay_s=0.02),
)


def registry(cluster: SimCluster) -> Config:
    health = {"interval_s": 0.2, "timeout_s": 2}
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
            "routing": {"llm": "ollama", "image": "comfyui"},
            "consumers": {
                "ollama": {
                    "type": "ollama",
                    "url": cluster.urls["ollama"],
                    "health": health,
                    "vram_resident_mib": 14000,  # the largest model: what a job used to cost
                    "models": [{"name": EMBED, "vram_mib": 600}],
                    "gpu_processes": ["ollama"],
                },
                "comfyui": {
                    "type": "comfyui",
                    "url": cluster.urls["comfyui"],
                    "health": health,
                    "vram_resident_mib": 12300,
                    "gpu_processes": ["comfyui"],
                },
            },
        }
    )


@pytest.fixture
async def box() -> AsyncIterator[tuple[SimCluster, Server, aiohttp.ClientSession]]:
    async with await start_cluster(spec=SPEC) as cluster:
        async with running_broker(registry(cluster)) as server:
            async with aiohttp.ClientSession() as session:
                yield cluster, server, session


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def image(server: Server, session: aiohttp.ClientSession) -> None:
    status, answer = await post(session, f"{server.url}/v1/image", {"prompt": GRAPH})
    assert status == 200, answer
    await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="the image finished")


async def chat(session: aiohttp.ClientSession, server: Server, model: str) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    return await post(session, f"{server.url}/api/chat", body)


async def test_resident_model_and_embedding_evict_nothing(
    box: tuple[SimCluster, Server, aiohttp.ClientSession],
) -> None:
    cluster, server, session = box
    await image(server, session)  # FLUX resident: 12300 MiB
    status, answer = await chat(session, server, CHAT)  # 7B loads beside it: 4700 MiB
    assert status == 200, answer
    counters = server.broker.residency.view.counters
    evictions = counters.evictions
    assert evictions == 0
    assert cluster.gpu.held_by("comfyui") == 12300

    # A chat on the resident 7B model.
    status, answer = await chat(session, server, CHAT)
    assert status == 200, answer
    # An embedding call (600 MiB): fits beside FLUX and the 7B model.
    status, answer = await post(
        session, f"{server.url}/api/embed", {"model": "nomic-embed-text", "input": "hello"}
    )
    assert status == 200 and answer["embeddings"], answer
    assert counters.evictions == evictions == 0
    assert cluster.gpu.held_by("comfyui") == 12300  # FLUX never left
    assert cluster.gpu.oom_count == 0
    await server.broker.residency.view.reconcile()
    record = server.broker.residency.view.records["ollama"]
    assert set(record.models) == {CHAT, EMBED}
    assert record.models[CHAT].cost_mib == 4700  # Ollama's own size_vram, once resident
    status_doc = server.broker.status().model_dump()
    assert set(status_doc["consumers"]["ollama"]["resident_models"]) == {CHAT, EMBED}


async def test_room_inside_ollama_is_made_model_by_model_lru_first(
    box: tuple[SimCluster, Server, aiohttp.ClientSession],
) -> None:
    """FLUX 12300 + 7B 4700 + embed 600 resident; the 14B (11000) needs room. FLUX may not
    coexist with Ollama, so it goes first; the small models stay."""
    cluster, server, session = box
    await image(server, session)
    status, answer = await chat(session, server, CHAT)
    assert status == 200, answer
    status, answer = await post(session, f"{server.url}/api/embed", {"model": EMBED, "input": "x"})
    assert status == 200, answer
    status, answer = await chat(session, server, BIG)
    assert status == 200, answer
    assert cluster.gpu.held_by("comfyui") == 300  # FLUX evicted (its CUDA context stays)
    decisions = server.broker.residency.decisions
    assert decisions[-1].victims == ("comfyui",)
    # Now FLUX again: 12300 needs room; the LRU models of Ollama go first, one by one
    # (7B used before embed, embed before 14B), until it fits.
    await image(server, session)
    # ComfyUI's CUDA context (300 MiB) stayed, so 4836 MiB must go: the 7B (used first) and
    # the embedding model (used next); the 14B, used last, stays.
    assert server.broker.residency.decisions[-1].victims == (f"ollama/{CHAT}", f"ollama/{EMBED}")
    assert set(server.broker.residency.view.records["ollama"].models) == {BIG}
    assert cluster.gpu.held_by("ollama") == 11000
    assert cluster.gpu.oom_count == 0
