"""A ComfyUI client flow over aiohttp, exactly as Open WebUI's ComfyUI integration runs it,
with `http://broker/upstream/comfyui` as ComfyUI's base URL: websocket with its clientId,
POST /prompt with that client_id, wait for `executing` with `node: null`, /history/{id},
/view, /upload/image. The prompt holds the lease until it has finished generating, so a job
for another consumer sent meanwhile starts only after it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import pytest

from conftest import running_broker, wait_done, wait_for
from mgpumanager.daemon import Server
from mgpumanager.registry import Config
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings, FakeComfyUI
from mgpumanager.sim.mvoice import MVoiceSettings

GRAPH: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev"}},
    "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 42}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "owui"}},
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


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    spec = FakeSpec(
        ollama=None,
        whisper=None,
        comfyui=ComfyUISettings(model_mib=8000, ctx_mib=300, run_s=0.8),
        mvoice=MVoiceSettings(vram_mib=3000, run_s=0),
    ).with_timing(load_s=0, free_delay_s=0)
    async with await start_cluster(spec=spec) as cluster:
        health = {"interval_s": 0.05}
        config = Config.model_validate(
            {
                "listen": "127.0.0.1:0",
                "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
                "routing": {"tts": "mvoice"},
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
                        "paths": {"tts": {"path": "/api/synthesize"}},
                        "vram_resident_mib": 3000,
                        "unload": {"path": "/api/admin/unload"},
                        "load": {"path": "/api/admin/load"},
                        "gpu_processes": ["mvoice"],
                    },
                },
            }
        )
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            yield Box(cluster, server, cast(FakeComfyUI, cluster.fakes["comfyui"]), http)


async def test_open_webui_flow_through_upstream_holds_the_lease(box: Box) -> None:
    http, base, client_id = box.http, box.base, "open-webui-7"
    async with http.ws_connect(f"{base}/ws?clientId={client_id}") as ws:
        hello = await ws.receive_json(timeout=5)
        assert hello["data"]["sid"] == client_id  # ComfyUI got the client's own id
        async with http.post(
            f"{base}/prompt", json={"prompt": GRAPH, "client_id": client_id}
        ) as resp:
            assert resp.status == 200
            prompt_id = (await resp.json())["prompt_id"]
        # Answered at once, the image still being made: the lease stays with ComfyUI.
        lease = box.server.broker.lease.core
        assert lease.stats().holder == "comfyui" and box.comfyui.queue_remaining == 1
        tts = asyncio.ensure_future(
            http.post(f"{box.server.url}/v1/tts", json={"text": "meanwhile"})
        )
        await wait_for(lambda: lease.stats().queue_depth == 1, what="the TTS job queued")
        events = await wait_done(ws, prompt_id)
    assert "execution_success" in events
    async with await tts as resp:
        assert resp.status == 200
    # Work of the two consumers never overlapped: the TTS ran after the prompt ended.
    intervals = box.cluster.activity.intervals()
    [comfy] = [i for i in intervals if i.consumer == "comfyui"]
    [voice] = [i for i in intervals if i.consumer == "mvoice"]
    assert voice.start >= comfy.end
    assert box.cluster.activity.overlapping_pairs() == []

    async with http.get(f"{base}/history/{prompt_id}") as resp:
        history = (await resp.json())[prompt_id]
    assert history["status"]["status_str"] == "success"
    [image] = history["outputs"]["9"]["images"]
    assert image["filename"] == "owui_00001_.png"
    params = {"filename": image["filename"], "subfolder": image["subfolder"], "type": "output"}
    async with http.get(f"{base}/view", params=params) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        assert (await resp.read()).startswith(b"\x89PNG")

    form = aiohttp.FormData()
    form.add_field("image", b"\x89PNG input", filename="in.png", content_type="image/png")
    form.add_field("overwrite", "true")
    async with http.post(f"{base}/upload/image", data=form) as resp:
        assert await resp.json() == {"name": "in.png", "subfolder": "", "type": "input"}
    async with http.get(f"{base}/object_info/LoadImage") as resp:
        listed = (await resp.json())["LoadImage"]["input"]["required"]["image"][0]
    assert listed == ["in.png"]
    # Two jobs went through the lease: the prompt and the TTS; the rest passed without it.
    assert lease.stats().total_jobs == 2


async def test_comfyui_front_end_paths_under_api_are_scheduled_too(box: Box) -> None:
    http, base = box.http, box.base
    async with http.ws_connect(f"{base}/api/ws?clientId=front") as ws:
        async with http.post(
            f"{base}/api/prompt", json={"prompt": GRAPH, "client_id": "front"}
        ) as resp:
            prompt_id = (await resp.json())["prompt_id"]
        assert box.server.broker.lease.core.stats().in_flight == 1  # held to the prompt's end
        await wait_done(ws, prompt_id)
    await wait_for(
        lambda: box.server.broker.lease.core.stats().in_flight == 0, what="lease released"
    )
    async with http.get(f"{base}/api/view", params={"filename": "owui_00001_.png"}) as resp:
        assert resp.status == 200


async def test_a_bad_graph_is_comfyuis_own_answer_and_releases_the_lease(box: Box) -> None:
    async with box.http.post(f"{box.base}/prompt", json={"prompt": {}}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_prompt"
    stats = box.server.broker.lease.core.stats
    await wait_for(lambda: stats().in_flight == 0, what="the job ended with its answer")
    assert stats().upstream_error == 1 and box.comfyui.prompts_started == []  # not completed
