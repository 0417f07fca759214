"""A box with two GPUs of 16,000 MiB (static devices; the simulated cards count every
out-of-memory per card): jobs on GPU 0 and GPU 1 run at the same time, a job that needs room on
GPU 0 evicts only there, a job bound to both runs alone, `/v1/status` lists both cards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from conftest import running_broker, wait_for
from mgpumanager.registry import Config
from mgpumanager.scheduling.core import Grant
from mgpumanager.sim.box import sim_uuid
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.tools.remote import render

MODEL = "llm:14b"
CARD_MIB = 16_000


def spec(run_s: float) -> FakeSpec:
    return FakeSpec(
        mvoice=MVoiceSettings(vram_mib=6000, load_s=0.01, run_s=run_s, free_delay_s=0.02),
        ollama=OllamaSettings(
            models={MODEL: 14000}, load_s=0.01, run_s=run_s, free_delay_s=0.02, chunks=2
        ),
        comfyui=ComfyUISettings(
            model_mib=12000, ctx_mib=300, load_s=0.01, run_s=run_s, free_delay_s=0.02
        ),
        whisper=None,
    )


def registry(cluster: SimCluster, mvoice_devices: list[int | str]) -> Config:
    health = {"path": "/health", "interval_s": 0.2, "timeout_s": 2}
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {
                "backend": "static",
                "devices": [{"uuid": sim_uuid(i), "total_mib": CARD_MIB} for i in (0, 1)],
                "static_settle_s": 0.05,
            },
            "routing": {"tts": "mvoice", "llm": "ollama", "image": "comfyui"},
            "consumers": {
                "mvoice": {
                    "url": cluster.urls["mvoice"],
                    "health": health,
                    "vram_resident_mib": 6000,
                    "unload": {"path": "/api/admin/unload"},
                    "load": {"path": "/api/admin/load"},
                    "devices": mvoice_devices,
                },
                "ollama": {
                    "type": "ollama",
                    "url": cluster.urls["ollama"],
                    "health": {**health, "path": "/api/version"},
                    "vram_resident_mib": 14000,
                    "devices": [0],
                },
                "comfyui": {
                    "type": "comfyui",
                    "url": cluster.urls["comfyui"],
                    "health": {**health, "path": "/system_stats"},
                    "vram_resident_mib": 12300,
                    "devices": [sim_uuid(1)],
                },
            },
        }
    )


@pytest.fixture
async def cluster() -> AsyncIterator[SimCluster]:
    where = {"ollama": 0, "mvoice": 0, "comfyui": 1}
    async with await start_cluster(spec=spec(0.4), total_mib=CARD_MIB, gpus=2, devices=where) as c:
        yield c


async def job(client: aiohttp.ClientSession, base: str, kind: str) -> int:
    bodies: dict[str, dict[str, Any]] = {
        "tts": {"text": "hi"},
        "llm": {"model": MODEL, "prompt": "hi", "stream": False},
        "image": {"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}},
    }
    async with client.post(f"{base}/v1/{kind}", json=bodies[kind]) as resp:
        await resp.read()
        return resp.status


async def status(client: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with client.get(f"{base}/v1/status") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def test_two_cards_run_side_by_side_and_evict_only_where_room_is_needed(
    cluster: SimCluster, client: aiohttp.ClientSession
) -> None:
    async with running_broker(registry(cluster, [0])) as server:
        base = server.url
        core = server.broker.lease.core
        together: list[int] = []
        core.on_grant.append(lambda g: together.append(core.in_flight))
        llm, image = await asyncio.gather(job(client, base, "llm"), job(client, base, "image"))
        assert (llm, image) == (200, 200)
        assert max(together) == 2  # ollama on GPU 0 and comfyui on GPU 1 at the same time
        before = await status(client, base)
        assert before["consumers"]["ollama"]["residency"] == "resident"
        assert before["consumers"]["comfyui"]["residency"] == "resident"

        assert await job(client, base, "tts") == 200  # mvoice, GPU 0: ollama is in the way
        after = await status(client, base)
        assert after["consumers"]["ollama"]["residency"] == "unloaded"
        assert after["consumers"]["comfyui"]["residency"] == "resident"  # GPU 1 untouched
        [eviction] = [e for e in after["recent_evictions"] if e["target"] == "mvoice"]
        assert all(v.startswith("ollama") for v in eviction["victims"])
        assert [card.oom_count for card in cluster.cards] == [0, 0]

        gpus = after["gpus"]
        assert [g["uuid"] for g in gpus] == [sim_uuid(0), sim_uuid(1)]
        assert [g["total_mib"] for g in gpus] == [CARD_MIB, CARD_MIB]
        assert gpus[0]["consumers"] == ["mvoice", "ollama"]
        assert after["gpu"]["total_mib"] == 2 * CARD_MIB  # the old single summary: the sum
        assert after["consumers"]["comfyui"]["devices"] == [sim_uuid(1)]
        picture = render(after, base)  # `mgpumanager status`: one line and one bar per card
        assert f"GPU 0 static GPU 0 ({sim_uuid(0)})" in picture
        assert f"GPU 1 static GPU 1 ({sim_uuid(1)})" in picture and "bound: comfyui" in picture
        async with client.get(f"{base}/metrics") as resp:
            metrics = await resp.text()
        assert f'mgpumanager_gpu_vram_mib{{gpu="{sim_uuid(1)}",kind="total"}}' in metrics


async def test_a_job_bound_to_both_cards_runs_alone(
    cluster: SimCluster, client: aiohttp.ClientSession
) -> None:
    async with running_broker(registry(cluster, [0, 1])) as server:
        base = server.url
        core = server.broker.lease.core
        overlaps: list[list[str]] = []

        def granted(g: Grant) -> None:
            names = sorted(j.consumer for j in core.running.values())
            if "mvoice" in names and len(set(names)) > 1:
                overlaps.append(names)

        core.on_grant.append(granted)
        kinds = ["llm", "image", "tts", "llm", "image", "tts", "image"]
        results = await asyncio.gather(*(job(client, base, k) for k in kinds))
        assert results == [200] * len(kinds)
        assert overlaps == []
        assert [card.oom_count for card in cluster.cards] == [0, 0]
        await wait_for(lambda: core.in_flight == 0, timeout_s=5)


async def test_a_consumer_found_on_a_device_it_did_not_declare_is_reported(
    cluster: SimCluster, client: aiohttp.ClientSession
) -> None:
    config = registry(cluster, [0])
    ollama = config.consumers["ollama"].model_copy(
        update={"devices": [1], "gpu_processes": ["ollama"]}  # its fake sits on card 0
    )
    config = config.model_copy(
        update={
            "gpu": config.gpu.model_copy(
                update={"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02}
            ),
            "consumers": {**config.consumers, "ollama": ollama},
        }
    )
    async with running_broker(config) as server:
        seen: list[dict[str, Any]] = []
        server.broker.events.taps.append(
            lambda e: seen.append(e.figures) if e.type == "device.undeclared" else None
        )
        assert await job(client, server.url, "llm") == 200
        await server.broker.residency.view.read_gpu()
        data = await status(client, server.url)
        assert data["consumers"]["ollama"]["undeclared_devices"] == [sim_uuid(0)]
        assert data["gpus"][0]["undeclared"] == ["ollama"]
        assert {"consumer": "ollama", "devices": [sim_uuid(0)]} in seen
