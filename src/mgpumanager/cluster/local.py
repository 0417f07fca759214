"""Simulated hosts for trying the cluster on one machine: each one a simulated 24 GiB GPU,
fake Ollama, ComfyUI and mVoice, and a broker in front of them, all on loopback and free ports
(what `mgpumanager cluster --local N`, the cluster tests and the cluster benchmark stand on)."""

from __future__ import annotations

import dataclasses
from typing import Any

from mgpumanager.broker import Broker
from mgpumanager.daemon import Server, start_server
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.ollama import OllamaSettings

# Two models that fit together on one card (6200 + 10400 < 24 GiB less the margin), and that
# with ComfyUI's 12300 do not.
SMALL_MODEL = "llama3.1:8b"
BIG_MODEL = "qwen2.5:14b"
MODELS = {SMALL_MODEL: 6200, BIG_MODEL: 10400}


def host_spec(*, instant: bool = True) -> FakeSpec:
    """The fakes of one simulated host: instant for tests, with a human pace for trying it."""
    ollama = OllamaSettings(models=MODELS, chunks=4)
    spec = FakeSpec(whisper=None, ollama=ollama)
    if instant:
        return spec.with_timing(load_s=0, run_s=0, free_delay_s=0, wake_s=0, embed_s=0)
    ollama = dataclasses.replace(ollama, load_s=1.0, run_s=0.6, free_delay_s=0.3, chunks=8)
    return dataclasses.replace(spec, ollama=ollama).with_timing(load_s=1.0, run_s=0.6)


def host_registry(cluster: SimCluster) -> Config:
    """mvoice (6000 MiB), ollama (its models' sizes) and comfyui (12300) on one simulated card."""
    health = {"interval_s": 0.5, "timeout_s": 2}
    consumers: dict[str, Any] = {
        "mvoice": {
            "url": cluster.urls["mvoice"],
            "health": {"path": "/health", **health},
            "vram_resident_mib": 6000,
            "unload": {"path": "/api/admin/unload"},
            "load": {"path": "/api/admin/load"},
            "gpu_processes": ["mvoice"],
        },
        "ollama": {
            "type": "ollama",
            "url": cluster.urls["ollama"],
            "health": {"path": "/api/version", **health},
            "vram_resident_mib": max(MODELS.values()),
            "models": [{"name": n, "vram_mib": m} for n, m in MODELS.items()],
            "gpu_processes": ["ollama"],
        },
        "comfyui": {
            "type": "comfyui",
            "url": cluster.urls["comfyui"],
            "health": {"path": "/system_stats", **health},
            "vram_resident_mib": 12300,
            "gpu_processes": ["comfyui"],
        },
    }
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.05},
            "routing": {"tts": "mvoice", "llm": "ollama", "image": "comfyui"},
            "consumers": consumers,
        }
    )


@dataclasses.dataclass
class SimHost:
    """One simulated box: its card and fakes, and its broker."""

    name: str
    sim: SimCluster
    server: Server

    @property
    def url(self) -> str:
        return self.server.url

    async def aclose(self) -> None:
        """The box goes away: its broker, then its card and fakes."""
        try:
            await self.server.stop()
        finally:
            await self.sim.aclose()


async def start_host(name: str, *, instant: bool = True) -> SimHost:
    sim = await start_cluster(spec=host_spec(instant=instant), gpu_name=f"Simulated GPU {name}")
    try:
        server = await start_server(Broker(host_registry(sim)), port=0)
    except BaseException:
        await sim.aclose()
        raise
    return SimHost(name, sim, server)


__all__ = [
    "BIG_MODEL",
    "MODELS",
    "SMALL_MODEL",
    "SimHost",
    "host_registry",
    "host_spec",
    "start_host",
]
