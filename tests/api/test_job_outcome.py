"""A job's outcome says what happened: `completed` only when the upstream answered 2xx/3xx,
`upstream_error` with the status when it answered 4xx/5xx (recent jobs, events, counters,
metrics); and a body that is not JSON on a JSON route is refused before it queues, in each
surface's dialect."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from conftest import SIM_MODEL, running_broker, sim_registry, sim_spec, wait_for
from mgpumanager.sim.cluster import SimCluster, start_cluster

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def cluster() -> AsyncIterator[SimCluster]:
    async with await start_cluster(spec=sim_spec()) as c:
        yield c


async def status(client: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with client.get(base + "/v1/status") as resp:
        doc: dict[str, Any] = await resp.json()
        return doc


async def test_an_upstream_4xx_is_an_upstream_error_with_its_status(
    cluster: SimCluster, client: aiohttp.ClientSession
) -> None:
    async with running_broker(sim_registry(cluster)) as server:
        base = server.url
        events = await client.get(base + "/v1/events")
        good = {"model": SIM_MODEL, "prompt": "hi", "stream": False}
        async with client.post(base + "/v1/llm", json=good) as resp:
            assert resp.status == 200, await resp.text()
        unknown = {"model": "no-such:model", "prompt": "hi", "stream": False}
        async with client.post(base + "/api/generate", json=unknown) as resp:
            assert resp.status == 404  # Ollama's own answer, relayed as it came

        async def both_finished() -> bool:
            return len((await status(client, base))["recent_jobs"]) == 2

        await wait_for(both_finished, what="two finished jobs")
        doc = await status(client, base)
        failed, done = doc["recent_jobs"]  # newest first
        assert (done["outcome"], done["status"]) == ("completed", None)
        assert (failed["outcome"], failed["status"]) == ("upstream_error", 404)
        sched = doc["scheduler"]
        assert (sched["completed"], sched["upstream_error"], sched["failed"]) == (1, 1, 0)
        async with client.get(base + "/metrics") as resp:
            metrics = await resp.text()
        assert 'mgpumanager_jobs_total{outcome="upstream_error"} 1.0' in metrics
        assert 'mgpumanager_jobs_total{outcome="completed"} 1.0' in metrics
        # the event stream says it too
        finished: list[dict[str, Any]] = []
        async for raw in events.content:
            line = raw.decode()
            if line.startswith("data:") and '"job.finished"' in line:
                finished.append(json.loads(line.removeprefix("data:")))
                if len(finished) == 2:
                    break
        events.close()
        assert [(e["outcome"], e["status"]) for e in finished] == [
            ("completed", None),
            ("upstream_error", 404),
        ]


@pytest.mark.parametrize(
    ("path", "headers", "dialect"),
    [
        ("/v1/llm", {}, "envelope"),  # aiohttp's default type for bytes: the route decides
        ("/v1/llm", {"Content-Type": "application/x-www-form-urlencoded"}, "envelope"),  # curl -d
        ("/v1/llm", JSON, "envelope"),
        ("/api/generate", JSON, "ollama"),
        ("/api/chat", {}, "ollama"),
        ("/v1/chat/completions", JSON, "openai"),
        ("/upstream/ollama/api/chat", {}, "ollama"),
        ("/upstream/ollama/api/generate", JSON, "ollama"),
    ],
)
async def test_a_body_that_is_not_json_is_refused_before_it_queues_on_every_surface(
    cluster: SimCluster,
    client: aiohttp.ClientSession,
    path: str,
    headers: dict[str, str],
    dialect: str,
) -> None:
    async with running_broker(sim_registry(cluster)) as server:
        async with client.post(server.url + path, data=b"{garbage", headers=headers) as resp:
            assert resp.status == 400, await resp.text()
            body = await resp.json()
        if dialect == "envelope":
            assert body["error"] == "bad_request" and "not JSON" in body["message"], body
        elif dialect == "ollama":
            assert isinstance(body["error"], str) and "not JSON" in body["error"], body
        else:
            assert body["error"]["type"] == "invalid_request_error", body
        sched = (await status(client, server.url))["scheduler"]
        assert sched["total_jobs"] == 0  # never queued
