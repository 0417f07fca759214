"""A ComfyUI and an mVoice on the simulated card, behind a broker: what the ComfyUI client-flow
tests share. ComfyUI takes 8,300 MiB, mVoice 3,000."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp

from conftest import running_broker
from mgpumanager.daemon import Server
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings, FakeComfyUI
from mgpumanager.sim.mvoice import MVoiceSettings


def graph(prefix: str) -> dict[str, Any]:
    """A FLUX-like graph whose images are saved under `prefix`."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev"}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 42}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"images": ["3", 0], "filename_prefix": prefix},
        },
    }


@dataclasses.dataclass
class Box:
    cluster: SimCluster
    server: Server
    comfyui: FakeComfyUI
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"{self.server.url}/upstream/comfyui"


@contextlib.asynccontextmanager
async def comfyui_box(
    *, run_s: float, routing: dict[str, str], mvoice: dict[str, Any]
) -> AsyncIterator[Box]:
    """The box, with ComfyUI's prompts taking `run_s`, the registry's `routing`, and more
    registry keys for mVoice (`mvoice`)."""
    spec = FakeSpec(
        ollama=None,
        whisper=None,
        comfyui=ComfyUISettings(model_mib=8000, ctx_mib=300, run_s=run_s),
        mvoice=MVoiceSettings(vram_mib=3000, run_s=0),
    ).with_timing(load_s=0, free_delay_s=0)
    async with await start_cluster(spec=spec) as cluster:
        health = {"interval_s": 0.05}
        config = Config.model_validate(
            {
                "listen": "127.0.0.1:0",
                "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
                "routing": routing,
                "consumers": {
                    "comfyui": {
                        "type": "comfyui",
                        "url": cluster.urls["comfyui"],
                        "health": {"path": "/system_stats", **health},
                        "vram_resident_mib": 8300,
                        "gpu_processes": ["comfyui"],
                    },
                    "mvoice": {
                        "url": cluster.urls["mvoice"],
                        "health": health,
                        "vram_resident_mib": 3000,
                        **mvoice,
                    },
                },
            }
        )
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            yield Box(cluster, server, cast(FakeComfyUI, cluster.fakes["comfyui"]), http)
