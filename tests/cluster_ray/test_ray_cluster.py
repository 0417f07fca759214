"""The cluster on a real local Ray cluster (`make test-ray`; the `ray` extra): two simulated
hosts, each a Ray node with its front before its own broker. Follow-ups stay on the model's
host, a cold model goes where it fits without eviction, a host killed mid-run is skipped and
the requests meant for it are served elsewhere, streams and a ComfyUI prompt pass, and with the
head gone every broker still serves its own port."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from conftest import wait_done
from mgpumanager.cluster.local import BIG_MODEL, SMALL_MODEL

pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[dev,ray]'")

from mgpumanager.cluster.ray_app import LocalCluster, local_cluster

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture
async def lc() -> AsyncIterator[LocalCluster]:
    async with local_cluster(2, period_s=0.25) as cluster:
        async with aiohttp.ClientSession() as session:

            async def both_seen() -> bool:
                for url in cluster.urls.values():
                    async with session.get(f"{url}/v1/status") as resp:
                        hosts = (await resp.json())["hosts"]
                    if sum(h["up"] for h in hosts) < 2:
                        return False
                return True

            deadline = asyncio.get_running_loop().time() + 60
            while not await both_seen():
                assert asyncio.get_running_loop().time() < deadline, "fronts never saw 2 hosts"
                await asyncio.sleep(0.2)
        yield cluster


async def generate(
    session: aiohttp.ClientSession, base: str, model: str, stream: bool = False
) -> list[dict[str, object]]:
    body = {"model": model, "prompt": "hi", "stream": stream}
    async with session.post(f"{base}/api/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return [json.loads(line) async for line in resp.content if line.strip()]


def resident_on(lc: LocalCluster, model: str) -> list[str]:
    return sorted(
        n
        for n, h in lc.hosts.items()
        if model in h.sim.fakes["ollama"].resident_models()  # type: ignore[attr-defined]
    )


async def shows(session: aiohttp.ClientSession, front: str, host: str, model: str) -> None:
    async def seen() -> bool:
        async with session.get(f"{front}/v1/status") as resp:
            hosts = {h["name"]: h for h in (await resp.json())["hosts"]}
        summary = hosts[host]["summary"] or {}
        return model in summary.get("consumers", {}).get("ollama", {}).get("resident_models", [])

    deadline = asyncio.get_running_loop().time() + 20
    while not await seen():
        assert asyncio.get_running_loop().time() < deadline, f"{model} never shown on {host}"
        await asyncio.sleep(0.1)


async def holds(session: aiohttp.ClientSession, front: str, host: str, consumer: str) -> None:
    """Until `front`'s view of `host` has `consumer` resident."""

    async def seen() -> bool:
        async with session.get(f"{front}/v1/status") as resp:
            hosts = {h["name"]: h for h in (await resp.json())["hosts"]}
        summary = hosts[host]["summary"] or {}
        residency = summary.get("consumers", {}).get(consumer, {}).get("residency")
        return bool(residency == "resident")

    deadline = asyncio.get_running_loop().time() + 20
    while not await seen():
        assert asyncio.get_running_loop().time() < deadline, f"{consumer} never on {host}"
        await asyncio.sleep(0.1)


async def test_the_cluster_routes_streams_and_survives_a_dead_host(
    lc: LocalCluster,
) -> None:
    h1, h2 = lc.urls["h1"], lc.urls["h2"]
    async with aiohttp.ClientSession() as session:
        # Follow-ups stay on the host that loaded the model, whichever front they reach.
        await generate(session, h2, BIG_MODEL)
        [home] = resident_on(lc, BIG_MODEL)
        await shows(session, h1, home, BIG_MODEL)
        await shows(session, h2, home, BIG_MODEL)
        for i in range(10):
            await generate(session, (h1, h2)[i % 2], BIG_MODEL)
        assert resident_on(lc, BIG_MODEL) == [home]

        # A cold model goes where it fits without eviction: the other host's card is free.
        other = "h2" if home == "h1" else "h1"
        direct = lc.hosts[home].url
        image_job = {"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}}
        async with session.post(f"{direct}/v1/image", json=image_job) as resp:
            assert resp.status == 200  # ComfyUI joins the big model: the small one won't fit
        await holds(session, h1, home, "comfyui")
        await generate(session, h1, SMALL_MODEL)
        assert resident_on(lc, SMALL_MODEL) == [other]
        assert lc.hosts[home].sim.gpu.oom_count == 0

        # Streaming, NDJSON and SSE, through the front.
        lines = await generate(session, h1, SMALL_MODEL, stream=True)
        assert len(lines) > 2 and lines[-1]["done"] is True
        chat = {
            "model": SMALL_MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        async with session.post(f"{h1}/v1/chat/completions", json=chat) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert (await resp.text()).rstrip().endswith("data: [DONE]")

        # A ComfyUI prompt with its websocket, history and image, through the front.
        base = f"{h1}/upstream/comfyui"
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
            await wait_done(ws, prompt_id)
        async with session.get(f"{base}/history/{prompt_id}") as resp:
            image = (await resp.json())[prompt_id]["outputs"]["9"]["images"][0]
        async with session.get(
            f"{base}/view", params={"filename": image["filename"], "type": "output"}
        ) as resp:
            assert resp.status == 200 and len(await resp.read()) > 0

        # h2 dies mid-run while h1's front still counts on it: the requests meant for it were
        # never forwarded, and h1 serves them.
        await shows(session, h1, "h2", SMALL_MODEL if other == "h2" else BIG_MODEL)
        moved = SMALL_MODEL if other == "h2" else BIG_MODEL
        await lc.kill_host("h2")
        results = await asyncio.gather(*(generate(session, h1, moved) for _ in range(4)))
        assert all(r[-1]["done"] for r in results)
        assert "h1" in resident_on(lc, moved)
        # ...and drops out of the cluster's status within three status periods.
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with session.get(f"{h1}/v1/status") as resp:
                hosts = {h["name"]: h for h in (await resp.json())["hosts"]}
            if not hosts["h2"]["up"]:
                break
            assert asyncio.get_running_loop().time() < deadline, "h2 never dropped out"
            await asyncio.sleep(0.1)
        assert hosts["h1"]["up"]


async def test_with_the_head_gone_every_broker_serves_its_own_port(lc: LocalCluster) -> None:
    async with aiohttp.ClientSession() as session:
        await lc.kill_head()
        for host in lc.hosts.values():
            lines = await generate(session, host.url, SMALL_MODEL)
            assert lines[-1]["done"] is True
        # The fronts went with the driver and the head; the brokers never depended on them.
