"""Model names as the registry writes them (`big`, an alias) and as Ollama lists them
(`big:latest`) are one model: its registry figure applies, and a warm restore of it finds it
resident instead of making room for it again and again."""

from __future__ import annotations

import aiohttp

from conftest import running_broker
from mgpumanager.clock import FakeClock
from mgpumanager.registry import Config
from mgpumanager.residency.view import ResidencyView
from mgpumanager.sim.cluster import FakeSpec, start_cluster
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.upstreams.adapters import make_adapter

SPEC = FakeSpec(
    mvoice=None,
    comfyui=None,
    whisper=None,
    ollama=OllamaSettings(
        models={"big:latest": 9000, "nomic-embed-text:latest": 510},
        load_s=0,
        run_s=0,
        free_delay_s=0,
    ),
)


def registry(ollama_url: str, gpu_url: str, **top: object) -> Config:
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "sim", "sim_url": gpu_url, "poll_interval_s": 0.02},
            "consumers": {
                "ollama": {
                    "type": "ollama",
                    "url": ollama_url,
                    "vram_resident_mib": 9500,
                    "models": [
                        {"name": "big", "vram_mib": 9000},
                        {"name": "nomic-embed-text", "vram_mib": 3000},
                    ],
                    "aliases": {"embedder": "nomic-embed-text"},
                    "gpu_processes": ["ollama"],
                }
            },
            **top,
        }
    )


async def test_a_registry_figure_applies_to_the_model_as_ollama_lists_it() -> None:
    config = registry("http://127.0.0.1:9", "http://127.0.0.1:9")
    async with aiohttp.ClientSession() as session:
        adapters = {"ollama": make_adapter("ollama", config.consumers["ollama"], session)}
        view = ResidencyView(config, adapters, None, FakeClock())  # type: ignore[arg-type]
        for asked in ("nomic-embed-text", "nomic-embed-text:latest", "embedder"):
            key = view.model_key("ollama", asked)
            assert key == "nomic-embed-text:latest", asked
            assert view.model_cost_mib("ollama", key) == 3000, asked


async def test_warm_restore_of_an_untagged_model_loads_it_once() -> None:
    async with await start_cluster(spec=SPEC) as cluster:
        config = registry(
            cluster.urls["ollama"],
            cluster.gpu_url,
            idle={"warm": ["ollama/big"], "warm_after_s": 1},
        )
        async with running_broker(config) as server:
            keeper = server.broker.idle
            assert keeper is not None
            for _ in range(3):
                keeper.idle_since = server.broker.clock.now() - 60  # idle long enough
                await keeper.tick()
                if keeper.warming is not None:
                    await keeper.warming
                await server.broker.residency.view.reconcile()  # what the background does, 5 s on
            residency = server.broker.residency
            assert residency.ready("ollama", "big")
            assert keeper.next_warm() is None
            assert residency.view.counters.evictions == 0
            assert residency.decisions == []
            assert cluster.gpu.held_by("ollama") == 9000
            assert cluster.gpu.oom_count == 0
