"""One rule for what a model name means (model_names), and what it changes on a full card: a
model spelt differently by the client and by an Ollama-compatible server's list (`big` vs
`big:latest`) is one model, costed and made room for; a model the list does not show costs its
room too, unless the upstream has just answered 404 for it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mgpumanager.registry import AdapterType, Config
from mgpumanager.sim.cluster import FakeSpec
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.ollama import FakeOllama, OllamaSettings
from mgpumanager.upstreams.model_names import model_identity, registry_entry, same_model, spelling
from ollama_comfyui_box import Box, chat, image, running_box

OLLAMA = AdapterType.OLLAMA


@pytest.mark.parametrize(
    "name",
    [
        "big",
        "big:latest",
        "Big:Latest",
        "library/big",
        "library/big:latest",
        "registry.ollama.ai/library/big:latest",
        "big:latest@sha256:0123",
    ],
)
def test_every_spelling_of_an_ollama_model_is_one_model(name: str) -> None:
    assert model_identity(OLLAMA, name) == "big:latest"
    assert same_model(OLLAMA, name, "big")


def test_other_namespaces_registries_and_tags_are_other_models() -> None:
    assert model_identity(OLLAMA, "someone/big") == "someone/big:latest"
    assert model_identity(OLLAMA, "hf.co/org/repo:Q4_K_M") == "hf.co/org/repo:q4_k_m"
    assert model_identity(OLLAMA, "localhost:5000/x/big") == "localhost:5000/x/big:latest"
    assert not same_model(OLLAMA, "someone/big", "big")
    assert not same_model(OLLAMA, "big:8b", "big")


def test_openai_ids_are_exact() -> None:
    for kind in (AdapterType.VLLM, AdapterType.SPEACHES, AdapterType.GENERIC):
        assert not same_model(kind, "Systran/faster-whisper-small", "systran/faster-whisper-small")
        assert model_identity(kind, "big") == "big"


def test_spelling_prefers_the_exact_name_then_the_identity() -> None:
    assert spelling(OLLAMA, ["big", "big:latest"], "big:latest") == "big:latest"
    assert spelling(OLLAMA, ["big"], "library/big:latest") == "big"
    assert spelling(OLLAMA, ["big:8b"], "big") is None
    assert spelling(AdapterType.VLLM, ["big"], "big:latest") is None


def test_the_registry_entry_is_found_by_alias_and_by_identity() -> None:
    config = Config.model_validate(
        {
            "consumers": {
                "ollama": {
                    "type": "ollama",
                    "url": "http://127.0.0.1:9",
                    "vram_resident_mib": 9000,
                    "models": [{"name": "library/big", "vram_mib": 9000}],
                    "aliases": {"gpt-4o": "big"},
                }
            }
        }
    )
    consumer = config.consumers["ollama"]
    for asked in ("big", "big:latest", "gpt-4o", "registry.ollama.ai/library/big:latest"):
        entry = registry_entry(consumer, asked)
        assert entry is not None and entry.vram_mib == 9000, asked
    assert registry_entry(consumer, "someone/big") is None


# -- on a full card ---------------------------------------------------------------------------

# An Ollama-compatible server that lists its model without the tag.
SPEC = FakeSpec(
    mvoice=None,
    whisper=None,
    ollama=OllamaSettings(models={"big": 14000}, load_s=0, run_s=0.01, free_delay_s=0.02, chunks=2),
    comfyui=ComfyUISettings(model_mib=12000, ctx_mib=300, load_s=0, run_s=0, free_delay_s=0.02),
)


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    async with running_box(SPEC) as found:
        yield found


@pytest.mark.parametrize("asked", ["big", "big:latest", "library/big"])
async def test_a_model_the_list_spells_otherwise_evicts_first_and_never_ooms(
    box: Box, asked: str
) -> None:
    cluster, server, session = box
    await image(server, session)  # FLUX resident: 12300 of 24576 MiB
    status, answer = await chat(session, server, asked)  # 14000 more cannot fit beside it
    assert status == 200, answer
    residency = server.broker.residency
    assert residency.decisions and residency.decisions[-1].victims == ("comfyui",)
    assert cluster.gpu.oom_count == 0
    assert residency.ready("ollama", asked)
    # Reconciled from /api/ps ("big"), it is the same model: a second chat evicts nothing.
    await residency.view.reconcile()
    assert residency.ready("ollama", "big:latest")
    evictions = residency.view.counters.evictions
    status, answer = await chat(session, server, "big")
    assert status == 200, answer
    assert residency.view.counters.evictions == evictions
    assert cluster.gpu.oom_count == 0


async def test_a_model_its_list_does_not_show_yet_still_gets_its_room(
    box: Box,
) -> None:
    cluster, server, session = box
    await image(server, session)
    fake = cluster.fakes["ollama"]
    assert isinstance(fake, FakeOllama)
    fake.install("late:1b", 14000)  # pulled around the broker: its list does not show it yet
    status, answer = await chat(session, server, "late:1b")
    assert status == 200, answer
    assert server.broker.residency.decisions[-1].victims == ("comfyui",)
    assert cluster.gpu.oom_count == 0


async def test_after_its_404_a_missing_model_evicts_nothing(
    box: Box,
) -> None:
    cluster, server, session = box
    await image(server, session)
    counters = server.broker.residency.view.counters
    # The first request costs its room (the declared figure): nobody knows it is missing yet.
    status, answer = await chat(session, server, "no-such-model:1b")
    assert status == 404 and "not found" in answer["error"], answer
    await image(server, session)  # FLUX back
    evictions = counters.evictions
    # The upstream has just answered 404 for it: nothing is evicted for it now.
    status, answer = await chat(session, server, "no-such-model:1b")
    assert status == 404, answer
    assert counters.evictions == evictions
    assert cluster.gpu.held_by("comfyui") == 12300
    assert cluster.gpu.oom_count == 0
