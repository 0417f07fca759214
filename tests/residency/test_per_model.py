"""Per-model residency through a real broker on the simulated GPU (24 GiB): with FLUX (ComfyUI,
12 GiB) resident, a chat on a resident 7B model and a small embedding call each evict nothing —
the consumer's declared cost (its largest model, 14 GiB) would not have fitted beside FLUX.
When room is needed inside Ollama, its other models go one by one, least recently used first.
(A model Ollama does not have: test_model_names.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mgpumanager.sim.cluster import FakeSpec
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.ollama import OllamaSettings
from ollama_comfyui_box import Box, chat, image, post, running_box

CHAT = "qwen2.5:7b"
EMBED = "nomic-embed-text:latest"
BIG = "qwen2.5:14b"
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


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    async with running_box(SPEC, models=[{"name": EMBED, "vram_mib": 600}]) as found:
        yield found


async def test_resident_model_and_embedding_evict_nothing(
    box: Box,
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
    box: Box,
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
