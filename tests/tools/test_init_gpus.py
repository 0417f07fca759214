"""`mgpumanager init` on a box with two GPUs: each service is proposed `devices:` from the card
its processes use, and the registry checks."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import yaml

from conftest import wait_for
from mgpumanager.registry import load_config
from mgpumanager.sim.cluster import FakeSpec, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.tools.discover import parse_target
from mgpumanager.tools.init import run_init

MODEL = "llama3.1:8b"
GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}


async def test_each_service_is_bound_to_the_card_it_uses(tmp_path: Path) -> None:
    spec = FakeSpec(
        mvoice=None,
        whisper=None,
        ollama=OllamaSettings(models={MODEL: 6200}),
        comfyui=ComfyUISettings(model_mib=12000, ctx_mib=300),
    ).with_timing(load_s=0, run_s=0, free_delay_s=0)
    where = {"ollama": 0, "comfyui": 1}
    async with (
        await start_cluster(total_mib=24_576, spec=spec, gpus=2, devices=where) as box,
        aiohttp.ClientSession() as session,
    ):
        body = {"model": MODEL, "prompt": "hi", "stream": False}
        async with session.post(box.urls["ollama"] + "/api/generate", json=body) as resp:
            assert resp.status == 200
        async with session.post(box.urls["comfyui"] + "/prompt", json={"prompt": GRAPH}) as resp:
            prompt_id = (await resp.json())["prompt_id"]

        async def image_done() -> bool:
            async with session.get(f"{box.urls['comfyui']}/history/{prompt_id}") as resp:
                return bool(await resp.json())

        await wait_for(image_done, what="the warm-up image")
        out = tmp_path / "consumers.yaml"
        scan = [parse_target(u.removeprefix("http://")) for u in box.urls.values()]
        await run_init(scan=scan, out=out, gpu_sim=box.gpu_url, usual_ports=())
        consumers = yaml.safe_load(out.read_text())["consumers"]
        assert consumers["ollama"]["devices"] == [0]
        assert consumers["comfyui"]["devices"] == [1]
        assert "the GPUs (NVML index) its processes use now" in out.read_text()
        load_config(out)  # check-config accepts it
