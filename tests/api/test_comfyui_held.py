"""ComfyUI prompts accepted at once: a prompt posted while the lease is busy is answered at
once with its prompt_id and number, shows in ComfyUI's own views (/queue, /history/{id},
websocket status), runs after the holder, and can be deleted while held; a held prompt that
ComfyUI refuses when it is posted reaches its client as execution_error and an error status in
/history. Against the fake ComfyUI (tests/test_real_comfyui.py runs it against the real one)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from comfyui_box import Box, comfyui_box, graph

from conftest import lease_held, wait_done, wait_for

GRAPH = graph("held")


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    mvoice = {"can_coexist_with": ["comfyui"]}
    async with comfyui_box(run_s=0.2, routing={"image": "comfyui"}, mvoice=mvoice) as found:
        yield found


async def statuses(ws: aiohttp.ClientWebSocketResponse, wanted: int) -> None:
    """Read the socket until a `status` says `wanted` prompts remain."""
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.TEXT:
            message = json.loads(msg.data)
            status = message["data"].get("status") if message["type"] == "status" else None
            if status is not None and status["exec_info"]["queue_remaining"] == wanted:
                return
    raise AssertionError("socket closed")


async def test_a_prompt_posted_while_the_gpu_is_busy_is_accepted_at_once(box: Box) -> None:
    loop = asyncio.get_running_loop()
    async with (
        box.http.ws_connect(f"{box.base}/ws?clientId=c1") as ws,
        lease_held(box.server.broker) as release,
    ):
        sent = loop.time()
        body = {"prompt": GRAPH, "client_id": "c1"}
        async with box.http.post(f"{box.base}/prompt", json=body) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert loop.time() - sent < 1.0
        prompt_id = answer["prompt_id"]
        assert answer["node_errors"] == {} and isinstance(answer["number"], int)
        async with box.http.get(f"{box.base}/queue") as resp:
            pending = (await resp.json())["queue_pending"]
        assert [item[1] for item in pending] == [prompt_id]
        assert pending[0][3] == {"client_id": "c1"}
        async with box.http.get(f"{box.base}/history/{prompt_id}") as resp:
            assert await resp.json() == {}
        await asyncio.wait_for(statuses(ws, 1), 5)  # queue_remaining counts it
        assert box.comfyui.history == {} and box.server.broker.lease.core.queue_depth == 1
        release.set()  # the holder ends: the prompt is posted and runs
        seen = await asyncio.wait_for(wait_done(ws, prompt_id), 10)
    assert "execution_success" in seen
    async with box.http.get(f"{box.base}/history/{prompt_id}") as resp:
        entry = (await resp.json())[prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["outputs"]


async def test_the_facade_accepts_at_once_too_and_posts_when_granted(box: Box) -> None:
    async with lease_held(box.server.broker):
        async with box.http.post(f"{box.server.url}/v1/image", json={"prompt": GRAPH}) as resp:
            assert resp.status == 200
            prompt_id = (await resp.json())["prompt_id"]
        assert prompt_id not in box.comfyui.history
    await wait_for(lambda: prompt_id in box.comfyui.history, what="the held prompt ran")


@pytest.mark.parametrize("how", ["queue delete", "interrupt", "queue clear"])
async def test_a_held_prompt_can_be_deleted(box: Box, how: str) -> None:
    core = box.server.broker.lease.core
    async with lease_held(box.server.broker):
        body = {"prompt": GRAPH, "prompt_id": "mine"}
        async with box.http.post(f"{box.base}/prompt", json=body) as resp:
            assert (await resp.json())["prompt_id"] == "mine"
        assert core.queue_depth == 1
        path, payload = {
            "queue delete": ("/queue", {"delete": ["mine"]}),
            "interrupt": ("/interrupt", {"prompt_id": "mine"}),
            "queue clear": ("/queue", {"clear": True}),
        }[how]
        async with box.http.post(f"{box.base}{path}", json=payload) as resp:
            assert resp.status == 200
        await wait_for(lambda: core.queue_depth == 0, what="the job left the queue")
        async with box.http.get(f"{box.base}/queue") as resp:
            assert (await resp.json())["queue_pending"] == []
    assert "mine" not in box.comfyui.history and core.stats().cancelled == 1


async def test_a_held_prompt_refused_when_posted_reaches_its_client(box: Box) -> None:
    graph = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    async with (
        box.http.ws_connect(f"{box.base}/ws?clientId=c2") as ws,
        lease_held(box.server.broker) as release,
    ):
        body = {"prompt": graph, "client_id": "c2"}
        async with box.http.post(f"{box.base}/prompt", json=body) as resp:
            assert resp.status == 200  # accepted: ComfyUI has not seen it yet
            prompt_id = (await resp.json())["prompt_id"]
        release.set()
        seen = await asyncio.wait_for(wait_done(ws, prompt_id), 10)
    assert "execution_error" in seen
    async with box.http.get(f"{box.base}/history/{prompt_id}") as resp:
        entry = (await resp.json())[prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    kind, error = entry["status"]["messages"][-1]
    assert kind == "execution_error" and "NoSuchNode" in error["exception_message"]


async def test_a_prompt_granted_at_once_gets_comfyuis_own_answer(box: Box) -> None:
    graph = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    async with box.http.post(f"{box.base}/prompt", json={"prompt": GRAPH}) as resp:
        assert resp.status == 200
    await wait_for(lambda: box.server.broker.lease.core.in_flight == 0, what="prompt done")
    async with box.http.post(f"{box.base}/prompt", json={"prompt": graph}) as resp:
        assert resp.status == 400  # the GPU was free: posted at once, refused as before
        assert (await resp.json())["error"]["type"] == "invalid_prompt"
