"""Protocol adapters: what the broker knows about each kind of upstream (`type:` in the registry).

One module per upstream type, mirroring the fakes in `mgpumanager.sim`:

    adapters/base.py      the ConsumerAdapter Protocol and BaseAdapter (shared HTTP plumbing)
    adapters/generic.py   generic   registry-written health / unload / load (mVoice)
    adapters/ollama.py    ollama    /api/ps residency, keep_alive 0 unload
    adapters/comfyui.py   comfyui   asynchronous prompts held to their end, /free
    adapters/speaches.py  speaches  /api/ps load and unload per model
    adapters/command.py   command   argv unload / load (whisper.cpp via systemctl)
    adapters/vllm.py      vllm      sleep mode
    adapters/docker.py    docker    a container stopped to unload, started to load; also the
                                    driver in front of any type that names a `container:`

This module is the registry: `ADAPTERS` maps each `type:` to its class. docs/adding-an-upstream.md
lists every place a new type touches.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from mgpumanager.registry import AdapterType, ConsumerConfig
from mgpumanager.upstreams.adapters.base import (
    OPENAI_GPU_PATHS,
    BaseAdapter,
    ConsumerAdapter,
    HealthResult,
    ResidencyReport,
    UpstreamStatus,
    residual_allowance_mib,
)
from mgpumanager.upstreams.adapters.comfyui import ComfyUIAdapter
from mgpumanager.upstreams.adapters.command import CommandAdapter
from mgpumanager.upstreams.adapters.docker import ContainerDriver, DockerAdapter, driven
from mgpumanager.upstreams.adapters.generic import GenericAdapter
from mgpumanager.upstreams.adapters.ollama import OllamaAdapter
from mgpumanager.upstreams.adapters.speaches import SpeachesAdapter
from mgpumanager.upstreams.adapters.vllm import VllmAdapter

ADAPTERS: Mapping[AdapterType, type[BaseAdapter]] = {
    AdapterType.GENERIC: GenericAdapter,
    AdapterType.OLLAMA: OllamaAdapter,
    AdapterType.COMFYUI: ComfyUIAdapter,
    AdapterType.SPEACHES: SpeachesAdapter,
    AdapterType.COMMAND: CommandAdapter,
    AdapterType.VLLM: VllmAdapter,
    AdapterType.DOCKER: DockerAdapter,
}


def make_adapter(
    name: str, config: ConsumerConfig, session: aiohttp.ClientSession, *, gpu_index: int = 0
) -> BaseAdapter:
    cls = ADAPTERS[config.type]
    if config.container is not None:
        cls = driven(cls)  # stopped to unload, started to load
    adapter = cls(name, config, session)
    adapter.gpu_index = gpu_index
    return adapter


__all__ = [
    "ADAPTERS",
    "OPENAI_GPU_PATHS",
    "BaseAdapter",
    "ComfyUIAdapter",
    "CommandAdapter",
    "ConsumerAdapter",
    "ContainerDriver",
    "DockerAdapter",
    "GenericAdapter",
    "HealthResult",
    "OllamaAdapter",
    "ResidencyReport",
    "SpeachesAdapter",
    "UpstreamStatus",
    "VllmAdapter",
    "make_adapter",
    "residual_allowance_mib",
]
