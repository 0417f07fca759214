"""The ComfyUI adapter follows the socket events of the real server (tests/real_comfyui.py
checks the fake against it): `execution_cached`, `progress_state` and `executing` are the run
going on; `execution_success` / `_error` / `_interrupted` say that it is over, so /history is
asked at once and the lease is released even where the final `executing {node: null}` never
comes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import Upstream, make_config, running_broker, wait_for
from mgpumanager.upstreams.adapters import ComfyUIAdapter


@pytest.mark.parametrize("end", ["execution_success", "execution_interrupted", "execution_error"])
async def test_the_end_of_a_run_is_seen_without_node_null(upstream: Upstream, end: str) -> None:
    """A ComfyUI that sends everything but `executing {node: null}` (a socket taken over by a
    second connect under the same client id loses it): the lease goes with /history."""
    prompts: dict[str, str] = {}  # client_id -> prompt_id
    sockets: dict[str, web.WebSocketResponse] = {}
    history: dict[str, Any] = {}

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        sockets[request.query["clientId"]] = sock
        async for _ in sock:
            pass
        return sock

    async def prompt(request: web.Request) -> web.Response:
        body = await request.json()
        pid, cid = body["prompt_id"], body["client_id"]
        prompts[cid] = pid

        async def run() -> None:
            sock = sockets[cid]
            steps: list[tuple[str, dict[str, Any]]] = [
                ("execution_start", {}),
                ("execution_cached", {"nodes": []}),
                ("progress_state", {"nodes": {}}),
                ("executing", {"node": "1", "display_node": "1"}),
                (end, {}),
            ]
            for kind, data in steps:
                await sock.send_json({"type": kind, "data": {**data, "prompt_id": pid}})
            await asyncio.sleep(0.05)
            history[pid] = {"status": {"status_str": "success"}, "outputs": {}}

        asyncio.get_running_loop().create_task(run())
        return web.json_response({"prompt_id": pid, "number": 0, "node_errors": {}})

    async def history_one(request: web.Request) -> web.Response:
        pid = request.match_info["pid"]
        return web.json_response({pid: history[pid]} if pid in history else {})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"devices": [{"type": "cpu", "index": None}]})

    async def queue(request: web.Request) -> web.Response:
        return web.json_response({"queue_running": [], "queue_pending": []})

    upstream.route("GET", "/ws", ws)
    upstream.route("POST", "/prompt", prompt)
    upstream.route("GET", "/history/{pid}", history_one)
    upstream.route("GET", "/system_stats", stats)
    upstream.route("GET", "/queue", queue)
    await upstream.start()
    config = make_config(
        {"comfyui": {"type": "comfyui", "url": upstream.url, "vram_resident_mib": 1000}},
        routing={"image": "comfyui"},
    )
    async with running_broker(config) as server, aiohttp.ClientSession() as http:
        adapter = server.broker.adapters["comfyui"]
        assert isinstance(adapter, ComfyUIAdapter)
        adapter.history_poll_s = 60.0  # only the end event can make it ask in time
        graph = {"1": {"class_type": "SaveImage", "inputs": {}}}
        async with http.post(f"{server.url}/v1/image", json={"prompt": graph}) as resp:
            assert resp.status == 200, await resp.text()
            pid = json.loads(await resp.text())["prompt_id"]
        lease = server.broker.lease.core
        await wait_for(lambda: lease.stats().in_flight == 0, timeout_s=5, what="lease released")
        assert pid in history and lease.stats().completed == 1
