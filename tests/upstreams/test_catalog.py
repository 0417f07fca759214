"""The model catalog: who serves which model, from the registry and from the upstreams' own
lists (the fake Ollama's /api/tags, the fake vLLM's /v1/models on loopback)."""

from __future__ import annotations

import aiohttp

from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, start_cluster
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.sim.vllm import VLLMSettings
from mgpumanager.upstreams.adapters import make_adapter
from mgpumanager.upstreams.catalog import ModelCatalog

SPEC = FakeSpec(
    mvoice=None,
    comfyui=None,
    whisper=None,
    ollama=OllamaSettings(models={"llama3.1:8b": 6200, "nomic-embed-text:latest": 600}),
    vllm=VLLMSettings(model="Qwen/Qwen2.5-7B-Instruct", load_s=0),
)


async def test_owner_size_and_listing_from_registry_and_upstreams() -> None:
    async with await start_cluster(spec=SPEC) as cluster:
        config = Config.model_validate(
            {
                "gpu": {"backend": "static", "total_mib": 24000},
                "consumers": {
                    "ollama": {
                        "type": "ollama",
                        "url": cluster.urls["ollama"],
                        "vram_resident_mib": 8000,
                        "models": [{"name": "llama3.1:8b", "vram_mib": 7000}],
                        "aliases": {"gpt-4o-mini": "llama3.1:8b"},
                    },
                    "vllm": {
                        "type": "vllm",
                        "url": cluster.urls["vllm"],
                        "vram_resident_mib": 16000,
                    },
                    "tts": {"url": "http://127.0.0.1:9", "vram_resident_mib": 100},
                },
            }
        )
        async with aiohttp.ClientSession() as session:
            adapters = {n: make_adapter(n, c, session) for n, c in config.consumers.items()}
            catalog = ModelCatalog(config, adapters)
            await catalog.refresh()
    # The registry's figure wins; else the upstream's own (/api/tags size, 0.85 x 600 MiB).
    assert catalog.size_mib("ollama", "llama3.1:8b") == 7000
    assert catalog.size_mib("ollama", "gpt-4o-mini") == 7000
    assert catalog.size_mib("ollama", "nomic-embed-text") == 510  # its implied tag: one model
    assert catalog.size_mib("ollama", "nomic-embed-text:latest") == 510
    owner = catalog.owner("gpt-4o-mini")
    assert owner is not None and (owner.consumer, owner.target) == ("ollama", "llama3.1:8b")
    implicit = catalog.owner("nomic-embed-text")  # Ollama's implicit :latest
    assert implicit is not None and implicit.target == "nomic-embed-text:latest"
    vllm = catalog.owner("Qwen/Qwen2.5-7B-Instruct")
    assert vllm is not None and vllm.consumer == "vllm"
    assert catalog.owner("no-such-model") is None
    assert catalog.has("ollama", "llama3.1:8b") is True
    assert catalog.has("ollama", "mistral:7b") is False
    assert catalog.has("tts", "anything") is None  # keeps no list
    assert [(m.model, m.consumer) for m in catalog.listing()] == [
        ("llama3.1:8b", "ollama"),
        ("gpt-4o-mini", "ollama"),
        ("nomic-embed-text:latest", "ollama"),
        ("Qwen/Qwen2.5-7B-Instruct", "vllm"),
    ]


async def test_a_failed_refresh_keeps_the_last_good_list() -> None:
    async with aiohttp.ClientSession() as session:
        async with await start_cluster(spec=SPEC) as cluster:
            config = Config.model_validate(
                {
                    "gpu": {"backend": "static", "total_mib": 24000},
                    "consumers": {
                        "ollama": {
                            "type": "ollama",
                            "url": cluster.urls["ollama"],
                            "vram_resident_mib": 8000,
                        }
                    },
                }
            )
            adapters = {n: make_adapter(n, c, session) for n, c in config.consumers.items()}
            catalog = ModelCatalog(config, adapters)
            await catalog.refresh()
            before = dict(catalog.upstream["ollama"])
        await catalog.refresh()  # the fake is gone: connection refused
    assert before and catalog.upstream["ollama"] == before
