"""An Ollama (its largest model 14,000 MiB) and a ComfyUI (12,300 MiB) on the simulated 24 GiB
card, behind a broker, and the calls the per-model tests make to it: they never fit together,
so a job for one evicts the other."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from conftest import running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster

GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}

Box = tuple[SimCluster, Server, aiohttp.ClientSession]


def registry(cluster: SimCluster, **ollama: Any) -> Config:
    """The two consumers, with more registry keys for Ollama (`ollama`)."""
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
                    "vram_resident_mib": 14000,  # the largest model
                    "gpu_processes": ["ollama"],
                    **ollama,
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


@contextlib.asynccontextmanager
async def running_box(spec: FakeSpec, **ollama: Any) -> AsyncIterator[Box]:
    async with await start_cluster(spec=spec) as cluster:
        async with running_broker(registry(cluster, **ollama)) as server:
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
