"""One memory figure per consumer: the one the planner counts, with its source (measured,
reported, declared), the same in /v1/status, `status`, the dashboard's bar and /metrics. A
consumer declared at 2,000 MiB that the card shows holding 12,300 is drawn at 12,300."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from conftest import running_broker, sim_registry, sim_spec, wait_for
from mgpumanager.registry import Config
from mgpumanager.residency.records import Record, State
from mgpumanager.sim.cluster import SimCluster, start_cluster
from mgpumanager.tools.remote import memory_parts, render

GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}


@pytest.fixture
async def cluster() -> AsyncIterator[SimCluster]:
    async with await start_cluster(spec=sim_spec()) as c:
        yield c


def test_the_source_follows_the_figure_that_wins() -> None:
    record = Record(State.RESIDENT, declared_mib=2000, pinned=False)
    assert (record.cost_mib, record.cost_source) == (2000, "declared")
    record.reported_mib = 24105
    assert (record.cost_mib, record.cost_source) == (24105, "reported")
    record.measured_mib = 30000
    assert (record.cost_mib, record.cost_source) == (30000, "measured")
    record.measured_mib, record.reported_mib = 1000, None
    assert (record.cost_mib, record.cost_source) == (2000, "declared")


async def test_status_bar_and_metrics_show_what_the_planner_counts(
    cluster: SimCluster, client: aiohttp.ClientSession
) -> None:
    data: dict[str, Any] = sim_registry(cluster).model_dump(mode="json")
    data["consumers"]["comfyui"]["vram_resident_mib"] = 2000  # declared far too small
    config = Config.model_validate(data)
    async with running_broker(config) as server:
        base = server.url
        async with client.post(base + "/v1/image", json={"prompt": GRAPH}) as resp:
            assert resp.status == 200, await resp.text()
        record = server.broker.residency.view.records["comfyui"]

        async def measured() -> bool:
            await server.broker.residency.view.read_gpu()
            return record.cost_source == "measured"

        await wait_for(measured, what="comfyui measured on the card")
        async with client.get(base + "/v1/status") as resp:
            doc = await resp.json()
        async with client.get(base + "/metrics") as resp:
            metrics = await resp.text()
    planned = record.cost_mib
    assert planned >= 12000  # what the card shows, not the 2,000 declared
    comfy = doc["consumers"]["comfyui"]
    assert (comfy["vram_mib"], comfy["vram_source"]) == (planned, "measured")
    assert comfy["vram_declared_mib"] == 2000
    [part] = [p for p in memory_parts(doc) if p.label == "comfyui"]
    assert (part.mib, part.kind) == (planned, "measured")
    labels = '{consumer="comfyui",source="measured"}'
    assert f"mgpumanager_consumer_vram_planned_mib{labels} {planned}" in metrics
    picture = render(doc, base, width=120)
    [row] = [r for r in picture.splitlines() if r.lstrip().startswith("comfyui")]
    assert f"{planned:,} measured" in row
