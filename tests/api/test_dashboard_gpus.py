"""The dashboard on a box with two simulated GPUs, in headless Chromium: one memory bar per
card under the box's, each with what its consumers hold there."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import aiohttp
import pytest
from playwright.async_api import async_playwright, expect

from conftest import running_broker
from mgpumanager.registry import Config
from mgpumanager.sim.box import sim_uuid
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.ollama import OllamaSettings

MODEL = "llm:14b"


def chromium() -> str:
    path = os.environ.get("MGPUMANAGER_CHROMIUM") or shutil.which("chromium")
    if path is None:
        pytest.fail("the browser test needs Debian's chromium (apt-get install chromium)")
    return path


@pytest.fixture
async def cluster() -> AsyncIterator[SimCluster]:
    spec = FakeSpec(
        mvoice=None,
        whisper=None,
        ollama=OllamaSettings(models={MODEL: 14000}, load_s=0.01, run_s=0.01, chunks=1),
        comfyui=ComfyUISettings(model_mib=12000, load_s=0.01, run_s=0.01),
    )
    where = {"ollama": 0, "comfyui": 1}
    async with await start_cluster(spec=spec, total_mib=16_000, gpus=2, devices=where) as c:
        yield c


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
                    "health": {"path": "/api/version", **health},
                    "vram_resident_mib": 14000,
                    "gpu_processes": ["ollama"],
                    "devices": [0],
                },
                "comfyui": {
                    "type": "comfyui",
                    "url": cluster.urls["comfyui"],
                    "health": {"path": "/system_stats", **health},
                    "vram_resident_mib": 12300,
                    "gpu_processes": ["comfyui"],
                    "devices": [1],
                },
            },
        }
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_one_bar_per_gpu(cluster: SimCluster) -> None:
    async with running_broker(registry(cluster)) as server, aiohttp.ClientSession() as s:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium())
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            await page.goto(server.url + "/ui/")
            devices = page.locator("#devices .device")
            await expect(devices).to_have_count(2, timeout=5000)
            async with s.post(
                server.url + "/v1/llm", json={"model": MODEL, "prompt": "hi", "stream": False}
            ) as resp:
                assert resp.status == 200
                await resp.read()
            first = page.locator(f'#devices .device[data-uuid="{sim_uuid(0)}"]')
            await expect(first.locator('[data-consumer="ollama"]')).to_be_visible(timeout=5000)
            second = page.locator(f'#devices .device[data-uuid="{sim_uuid(1)}"]')
            await expect(second.locator('[data-consumer="ollama"]')).to_have_count(0)
            await expect(second).to_contain_text("bound: comfyui")
            await browser.close()
