"""Which of ComfyUI's /system_stats devices is the broker's card, and what a ComfyUI on no
card (`--cpu`, as the real one runs in tests/test_real_comfyui.py) means for residency: it
holds no card memory (its `torch_vram_total` is the machine's RAM), its unloads are confirmed
at once, and work posted around the broker makes it busy, with a residency_detail that says
so while it runs and stops saying so after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from conftest import make_config, running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.registry import ConsumerConfig
from mgpumanager.sim import ComfyUISettings, FakeComfyUI, LocalLedger, SimGPU, serving
from mgpumanager.upstreams.adapters import ComfyUIAdapter, make_adapter
from mgpumanager.upstreams.adapters.comfyui import card_device

GIB = 1024**3
CPU = {"name": "cpu", "type": "cpu", "index": None, "torch_vram_total": 24 * GIB}


def cuda(index: int, gib: int) -> dict[str, Any]:
    return {"name": f"cuda:{index}", "type": "cuda", "index": index, "torch_vram_total": gib * GIB}


@pytest.mark.parametrize(
    ("devices", "gpu_index", "expected"),
    [
        ([CPU], 0, None),  # --cpu: no card at all
        ([{**CPU, "type": "mps", "name": "mps"}], 0, None),  # Apple
        ([cuda(0, 3)], 0, cuda(0, 3)),
        ([cuda(0, 3), cuda(1, 9)], 1, cuda(1, 9)),  # the broker's index among several
        ([cuda(0, 3)], 1, cuda(0, 3)),  # one card, renumbered by CUDA_VISIBLE_DEVICES
        ([cuda(0, 3), cuda(2, 9)], 1, None),  # several, none the broker's: not ours
        ([{**cuda(0, 3), "type": "rocm"}], 0, {**cuda(0, 3), "type": "rocm"}),
        ("nonsense", 0, None),
    ],
)
def test_the_card_is_the_brokers_gpu(devices: Any, gpu_index: int, expected: Any) -> None:
    assert card_device(devices, gpu_index) == expected


@pytest.fixture
async def cpu_comfyui() -> AsyncIterator[tuple[FakeComfyUI, str, SimGPU]]:
    gpu = SimGPU(24000)
    settings = ComfyUISettings(device="cpu", load_s=0, run_s=0.2, free_delay_s=0, ram_mib=24105)
    fake = FakeComfyUI(settings, ledger=LocalLedger(gpu))
    async with serving(fake.app) as server:
        yield fake, server.url, gpu


async def test_a_cpu_comfyui_holds_nothing_and_unloads_at_once(
    cpu_comfyui: tuple[FakeComfyUI, str, SimGPU],
) -> None:
    fake, url, _ = cpu_comfyui
    config = ConsumerConfig.model_validate({"type": "comfyui", "url": url, "vram_resident_mib": 1})
    async with aiohttp.ClientSession() as session:
        comfy = make_adapter("comfyui", config, session)
        assert isinstance(comfy, ComfyUIAdapter)
        async with session.post(f"{url}/prompt", json={"prompt": graph(1)}) as resp:
            assert resp.status == 200
        await wait_for(lambda: fake.model_loaded and fake.running is None, what="loaded")
        report = await comfy.residency()
        assert report.resident is False and report.held_mib == 0
        assert report.detail == "runs on cpu, holds no card memory"
        await comfy.unload()  # /free with its JSON body (an empty one is a 500)
        assert await comfy.unloaded()
        await wait_for(lambda: not fake.model_loaded, what="unloaded")


def graph(colour: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"color": colour}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
    }


async def status_of(http: aiohttp.ClientSession, server: Server) -> dict[str, Any]:
    async with http.get(f"{server.url}/v1/status") as resp:
        answer: dict[str, Any] = await resp.json()
    assert answer["gpu"]["headroom_mib"] >= 0, answer["gpu"]
    consumer: dict[str, Any] = answer["consumers"]["comfyui"]
    return consumer


async def test_residency_detail_follows_a_prompt_posted_around_the_broker(
    cpu_comfyui: tuple[FakeComfyUI, str, SimGPU],
) -> None:
    fake, url, gpu = cpu_comfyui
    config = make_config(
        {"comfyui": {"type": "comfyui", "url": url, "vram_resident_mib": 12000}},
        gpu={"backend": "static", "total_mib": 24000, "reconcile_interval_s": 0.05},
        routing={"image": "comfyui"},
    )
    async with running_broker(config) as server, aiohttp.ClientSession() as http:
        record = server.broker.residency.view.records["comfyui"]
        # Through the broker, then an admin unload: confirmed, nothing on the card.
        async with http.post(f"{server.url}/v1/image", json={"prompt": graph(1)}) as resp:
            assert resp.status == 200
        lease = server.broker.lease.core
        await wait_for(lambda: lease.stats().in_flight == 0, what="the prompt ended")
        async with http.post(f"{server.url}/v1/admin/consumers/comfyui/unload") as resp:
            assert resp.status == 200, await resp.text()
        assert (await status_of(http, server))["residency"] == "unloaded"

        fake.settings = ComfyUISettings(device="cpu", load_s=0, run_s=2, free_delay_s=0)
        async with http.post(f"{url}/prompt", json={"prompt": graph(2)}) as resp:
            pid = (await resp.json())["prompt_id"]
        await wait_for(lambda: record.busy_outside, what="seen busy")
        during = await status_of(http, server)
        assert during["residency"] == "unloaded" and during["busy_outside"] is True
        assert during["residency_detail"] == (
            "runs on cpu, holds no card memory, 1 prompt(s) posted around the broker"
        )
        await wait_for(lambda: pid in fake.history, what="the outside prompt ended")
        await wait_for(lambda: not record.busy_outside, what="seen idle")
        after = await status_of(http, server)
        assert after["residency_detail"] == "runs on cpu, holds no card memory", after
    assert gpu.held_by("comfyui") == 0
