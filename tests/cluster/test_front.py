"""The cluster front without Ray: two simulated hosts (card, fakes, broker on loopback), a front
for each, meeting in one `MemoryDirectory`. Follow-ups stay where the model is, a cold model
goes where it fits, a dead host is skipped (its not-yet-forwarded requests served elsewhere)
and comes back, streams and a ComfyUI prompt pass, and a 503 with Retry-After moves on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from conftest import wait_done, wait_for
from mgpumanager.cluster.front import Front, MemoryDirectory, wait_for_hosts
from mgpumanager.cluster.local import BIG_MODEL, SMALL_MODEL, SimHost, start_host

PERIOD = 0.1


@dataclass
class Pair:
    hosts: dict[str, SimHost]
    fronts: dict[str, Front]
    directory: MemoryDirectory


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    directory = MemoryDirectory()
    hosts: dict[str, SimHost] = {}
    fronts: dict[str, Front] = {}
    try:
        for name in ("h1", "h2"):
            hosts[name] = await start_host(name)
            fronts[name] = Front(name, hosts[name].url, directory, period_s=PERIOD)
            await fronts[name].start()
        for front in fronts.values():
            await wait_for_hosts(front, 2)
        yield Pair(hosts, fronts, directory)
    finally:
        for front in fronts.values():
            await front.stop()
        for host in hosts.values():
            await host.aclose()


async def generate(
    session: aiohttp.ClientSession, base: str, model: str, stream: bool = False
) -> list[dict[str, object]]:
    body = {"model": model, "prompt": "hi", "stream": stream}
    async with session.post(f"{base}/api/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        lines = [json.loads(line) async for line in resp.content if line.strip()]
    return lines


def resident_on(pair: Pair, model: str) -> list[str]:
    return sorted(
        name
        for name, h in pair.hosts.items()
        if model in h.sim.fakes["ollama"].resident_models()  # type: ignore[attr-defined]
    )


async def settled(front: Front, host: str, model: str) -> None:
    """Until `front` read a status of `host` that shows `model` resident."""
    await wait_for(
        lambda: host in front.hosts and front.hosts[host].serves(model) is not None,
        timeout_s=10,
        what=f"{model} resident on {host} in the front's view",
    )


async def test_follow_ups_stay_on_the_host_that_loaded_the_model(pair: Pair) -> None:
    front = pair.fronts["h1"]
    async with aiohttp.ClientSession() as session:
        await generate(session, front.url, BIG_MODEL)
        [first] = resident_on(pair, BIG_MODEL)
        await settled(front, first, BIG_MODEL)
        await settled(pair.fronts["h2"], first, BIG_MODEL)
        for _ in range(10):
            await generate(session, pair.fronts["h2"].url, BIG_MODEL)
        assert resident_on(pair, BIG_MODEL) == [first]


async def test_two_cold_requests_at_once_load_the_model_on_one_host(pair: Pair) -> None:
    front = pair.fronts["h1"]
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(generate(session, front.url, SMALL_MODEL) for _ in range(4)))
    assert len(resident_on(pair, SMALL_MODEL)) == 1


async def test_a_cold_model_goes_where_it_fits_without_eviction(pair: Pair) -> None:
    async with aiohttp.ClientSession() as session:
        # h2's card is taken by ComfyUI and mVoice, straight through its own broker.
        h2 = pair.hosts["h2"].url
        async with session.post(f"{h2}/v1/tts", json={"text": "hi"}) as resp:
            assert resp.status == 200
        graph = {"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}}
        async with session.post(f"{h2}/v1/image", json=graph) as resp:
            assert resp.status == 200
        front = pair.fronts["h2"]
        await wait_for(
            lambda: (front.hosts["h2"].headroom_mib or 0) < 10400,
            timeout_s=10,
            what="h2's card full in the front's view",
        )
        await generate(session, front.url, BIG_MODEL)
    assert resident_on(pair, BIG_MODEL) == ["h1"]
    assert pair.hosts["h2"].sim.gpu.oom_count == 0


async def test_streaming_passes_line_by_line(pair: Pair) -> None:
    async with aiohttp.ClientSession() as session:
        lines = await generate(session, pair.fronts["h1"].url, SMALL_MODEL, stream=True)
        assert len(lines) > 2 and lines[-1]["done"] is True
        body = {"model": SMALL_MODEL, "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(
            f"{pair.fronts['h1'].url}/v1/chat/completions", json={**body, "stream": True}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            text = await resp.text()
        assert text.rstrip().endswith("data: [DONE]")


async def test_a_comfyui_prompt_with_its_websocket_through_the_front(pair: Pair) -> None:
    base = f"{pair.fronts['h1'].url}/upstream/comfyui"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{base}/ws?clientId=c1") as ws:
            graph = {
                "3": {"class_type": "KSampler", "inputs": {"seed": 1}},
                "9": {
                    "class_type": "SaveImage",
                    "inputs": {"images": ["3", 0], "filename_prefix": "x"},
                },
            }
            async with session.post(
                f"{base}/prompt", json={"prompt": graph, "client_id": "c1"}
            ) as resp:
                assert resp.status == 200, await resp.text()
                prompt_id = (await resp.json())["prompt_id"]
            seen = await wait_done(ws, prompt_id)
            assert "executing" in seen
        async with session.get(f"{base}/history/{prompt_id}") as resp:
            history = await resp.json()
        image = history[prompt_id]["outputs"]["9"]["images"][0]
        async with session.get(
            f"{base}/view", params={"filename": image["filename"], "type": "output"}
        ) as resp:
            assert resp.status == 200
            assert len(await resp.read()) > 0


async def test_a_dead_host_is_skipped_and_comes_back_when_its_broker_answers(pair: Pair) -> None:
    front = pair.fronts["h1"]
    async with aiohttp.ClientSession() as session:
        # Load the model on h2 (through h2's own front, which prefers nothing: both are empty).
        await generate(session, pair.hosts["h2"].url, BIG_MODEL)
        await settled(front, "h2", BIG_MODEL)
        # h2's front goes away with its box, while h1's front still thinks the model is there:
        # the requests it meant for h2 are never forwarded and are served by h1 instead.
        await pair.fronts["h2"].stop()
        results = await asyncio.gather(*(generate(session, front.url, BIG_MODEL) for _ in range(4)))
        assert all(r[-1]["done"] for r in results)
        assert "h2" in front.down
        assert resident_on(pair, BIG_MODEL) == ["h1", "h2"]
        async with session.get(f"{front.url}/v1/status") as resp:
            hosts = {h["name"]: h for h in (await resp.json())["hosts"]}
        assert hosts["h1"]["up"] and not hosts["h2"]["up"]
        assert hosts["h1"]["summary"]["consumers"]["ollama"]["type"] == "ollama"
        # h2 comes back: a front listening again, its broker's status read once more.
        back = Front("h2", pair.hosts["h2"].url, pair.directory, period_s=PERIOD)
        pair.fronts["h2"] = back
        await back.start()
        await wait_for(lambda: "h2" not in front.down, timeout_s=10, what="h2 back")


class Full:
    """A broker stand-in whose queue is full: its status is the real broker's, every other
    request answers 503 with Retry-After."""

    def __init__(self, real: str) -> None:
        self.real = real
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/v1/status":
            async with aiohttp.ClientSession() as session:
                async with session.get(self.real + "/v1/status") as resp:
                    return web.json_response(await resp.json())
        self.calls += 1
        return web.json_response({"error": "queue_full"}, status=503, headers={"Retry-After": "2"})


async def test_a_503_with_retry_after_moves_the_request_to_the_next_host(pair: Pair) -> None:
    front = pair.fronts["h1"]
    full = Full(pair.hosts["h1"].url)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", full.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        front.broker_url = f"http://127.0.0.1:{port}"  # h1's broker now answers 503
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                await generate(session, front.url, SMALL_MODEL)
        assert full.calls >= 1
        assert resident_on(pair, SMALL_MODEL) == ["h2"]
    finally:
        await runner.cleanup()


async def test_the_host_selector_and_each_hosts_dashboard_through_the_front(pair: Pair) -> None:
    front = pair.fronts["h1"].url
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{front}/cluster/") as resp:
            page = await resp.text()
        assert 'href="/ui/?host=h1"' in page and 'href="/ui/?host=h2"' in page
        html = {"Accept": "text/html"}
        async with session.get(f"{front}/ui/", headers=html, allow_redirects=False) as resp:
            assert (resp.status, resp.headers["Location"]) == (302, "/cluster/")
        async with session.get(f"{front}/ui/?host=h2", headers=html) as resp:
            assert resp.status == 200 and 'id="hosts"' in await resp.text()
        async with session.get(f"{front}/hosts/h2/v1/status") as resp:
            status = await resp.json()
        assert status["gpu"]["device"] == "Simulated GPU h2"
        async with session.get(f"{front}/hosts/nowhere/v1/status") as resp:
            assert resp.status == 404


class Breaks(Full):
    """A broker stand-in that takes the request and breaks off before answering."""

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/v1/status":
            return await super().handle(request)
        self.calls += 1
        await request.read()
        assert request.transport is not None
        request.transport.close()
        return web.Response()


async def test_a_request_once_forwarded_is_never_sent_again(pair: Pair) -> None:
    front = pair.fronts["h1"]
    breaks = Breaks(pair.hosts["h1"].url)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", breaks.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        front.broker_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as session:
            body = {"model": SMALL_MODEL, "prompt": "hi", "stream": False}
            async with session.post(f"{front.url}/api/generate", json=body) as resp:
                assert resp.status == 502
                assert (await resp.json())["error"] == "host_failed"
        assert breaks.calls == 1
        assert resident_on(pair, SMALL_MODEL) == []  # h2 never saw it
    finally:
        await runner.cleanup()
