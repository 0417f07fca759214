"""Reloading the registry while serving (what SIGHUP does): consumers added, changed and
removed; queued jobs of a removed consumer refused; what needs a restart refused whole."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from conftest import Upstream, consumer, make_config, running_broker, wait_for


async def test_reload_adds_changes_and_removes_consumers(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"slow": True})

    async def fast(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    upstream.route("POST", "/api/synthesize", slow)
    upstream.route("POST", "/api/transcribe", fast)
    upstream.route("POST", "/inference", fast)
    upstream.route("POST", "/unload", fast)
    await upstream.start()
    old = make_config(
        {
            "mvoice": consumer(upstream.url),
            "gone": consumer(upstream.url, unload={"path": "/unload"}),
        },
        routing={"tts": "mvoice", "stt": "gone"},
    )
    new = make_config(
        {
            "mvoice": consumer(upstream.url, priority=4),
            "whisper": consumer(upstream.url, paths={"stt": {"path": "/inference"}}),
        },
        routing={"tts": "mvoice", "stt": "whisper"},
        auth={"token": "t"},
    )
    async with running_broker(old) as server:
        # Static backend: "gone" is unknown, and nothing could see its memory once removed.
        with pytest.raises(ValueError, match="unload it first"):
            await server.broker.reload(new)
        async with client.post(f"{server.url}/v1/admin/consumers/gone/unload") as resp:
            assert (await resp.json())["residency"] == "unloaded"
        running = asyncio.create_task(client.post(f"{server.url}/v1/tts", json={}))
        await asyncio.wait_for(entered.wait(), 10)
        queued = asyncio.create_task(client.post(f"{server.url}/v1/stt", data=b"x"))
        await wait_for(lambda: server.broker.lease.core.queue_depth == 1, what="queued")

        changes = await server.broker.reload(new)
        assert set(changes) >= {"+whisper", "-gone", "~mvoice", "routing", "auth"}
        async with await queued as resp:
            body = json.loads(await resp.read())
            assert (resp.status, body["error"], body["consumer"]) == (404, "no_consumer", "gone")
        release.set()
        async with await running as resp:
            assert resp.status == 200  # the job that ran during the reload finished
        auth = {"Authorization": "Bearer t"}
        async with client.post(f"{server.url}/v1/stt", data=b"x", headers=auth) as resp:
            assert (resp.status, await resp.json()) == (200, {"path": "/inference"})
        async with client.post(f"{server.url}/v1/stt", data=b"x") as resp:
            assert resp.status == 401  # auth follows the new registry too
        async with client.get(f"{server.url}/v1/status", headers=auth) as resp:
            status = await resp.json()
        assert set(status["consumers"]) == {"mvoice", "whisper"}
        assert status["consumers"]["mvoice"]["priority"] == 4
        assert status["consumers"]["whisper"]["healthy"] is True


async def test_reload_refuses_what_needs_a_restart(upstream: Upstream) -> None:
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)})
    async with running_broker(config) as server:
        moved = make_config({"mvoice": consumer(upstream.url)}, gpu={"backend": "nvml"})
        with pytest.raises(ValueError, match=r"gpu\.backend static -> nvml: restart"):
            await server.broker.reload(moved)
        assert server.broker.config == config
