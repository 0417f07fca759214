"""A ComfyUI client flow over aiohttp, exactly as Open WebUI's ComfyUI integration runs it,
with `http://broker/upstream/comfyui` as ComfyUI's base URL: websocket with its clientId,
POST /prompt with that client_id, wait for `executing` with `node: null`, /history/{id},
/view, /upload/image. The prompt holds the lease until it has finished generating, so a job
for another consumer sent meanwhile starts only after it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from comfyui_box import Box, comfyui_box, graph

from conftest import wait_done, wait_for

GRAPH = graph("owui")


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    mvoice = {
        "paths": {"tts": {"path": "/api/synthesize"}},
        "unload": {"path": "/api/admin/unload"},
        "load": {"path": "/api/admin/load"},
        "gpu_processes": ["mvoice"],
    }
    async with comfyui_box(run_s=0.8, routing={"tts": "mvoice"}, mvoice=mvoice) as found:
        yield found


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
