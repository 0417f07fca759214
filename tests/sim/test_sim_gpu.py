"""The simulated GPU: OOM counting, peak, snapshot, and its HTTP face through HttpLedger."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from mgpumanager.sim import (
    ActivityLog,
    CudaOutOfMemory,
    GpuEventKind,
    HttpLedger,
    LocalLedger,
    RunningApp,
    SimGPU,
    gpu_app,
    serve_app,
)


def test_allocate_release_peak_and_oom_count() -> None:
    gpu = SimGPU(24576)
    gpu.allocate("ollama", 14000, "llama3")
    gpu.allocate("comfyui", 300, "cuda_context")
    gpu.allocate("comfyui", 8000)
    assert (gpu.used_mib, gpu.free_mib, gpu.peak_used_mib) == (22300, 2276, 22300)
    with pytest.raises(CudaOutOfMemory):
        gpu.allocate("mvoice", 6000)
    assert gpu.oom_count == 1
    assert gpu.held_by("mvoice") == 0
    assert gpu.release("comfyui", "weights") == 8000
    assert gpu.held_by("comfyui") == 300
    assert gpu.release("ollama") == 14000
    assert gpu.release("nobody") == 0
    assert gpu.peak_used_mib == 22300
    gpu.reset_stats()
    assert (gpu.oom_count, gpu.peak_used_mib) == (0, 300)
    kinds = [e.event for e in gpu.events]
    assert kinds.count(GpuEventKind.OOM) == 1
    assert kinds[-1] is GpuEventKind.RESET_STATS
    _t, event, owner, mib = gpu.events[0]
    assert (event, owner, mib) == (GpuEventKind.ALLOC, "ollama", 14000)


def test_oom_message_reads_like_torch() -> None:
    gpu = SimGPU(24576)
    gpu.allocate("a", 14848)
    with pytest.raises(CudaOutOfMemory) as info:
        gpu.allocate("b", 14336)
    assert str(info.value) == (
        "CUDA out of memory. Tried to allocate 14.00 GiB "
        "(GPU 0; 24.00 GiB total capacity; 9.50 GiB free)"
    )
    assert (info.value.requested_mib, info.value.free_mib) == (14336, 9728)


def test_snapshot_lists_owners_like_nvidia_smi() -> None:
    activity = ActivityLog()
    gpu = SimGPU(1000, "Sim 1000", busy=activity.busy)
    gpu.allocate("comfyui", 100, "cuda_context")
    gpu.allocate("comfyui", 200)
    gpu.allocate("whisper-server", 50, pid=4242)
    snap = gpu.snapshot()
    assert snap["name"] == "Sim 1000"
    assert (snap["used_mib"], snap["free_mib"], snap["utilization_pct"]) == (350, 650, 0)
    assert snap["processes"] == [
        {"pid": None, "name": "comfyui", "used_mib": 300},
        {"pid": 4242, "name": "whisper-server", "used_mib": 50},
    ]
    token = activity.begin("comfyui")
    assert gpu.snapshot()["utilization_pct"] == 100
    activity.end(token)
    gpu.release("whisper-server")
    assert [p["name"] for p in gpu.snapshot()["processes"]] == ["comfyui"]


def test_negative_allocation_is_refused() -> None:
    with pytest.raises(ValueError):
        SimGPU(100).allocate("x", -1)


@pytest.fixture
async def served() -> AsyncIterator[tuple[SimGPU, ActivityLog, RunningApp]]:
    gpu, activity = SimGPU(2048), ActivityLog()
    server = await serve_app(gpu_app(gpu, activity))
    yield gpu, activity, server
    await server.aclose()


async def test_http_ledger_round_trip(served: tuple[SimGPU, ActivityLog, RunningApp]) -> None:
    gpu, activity, server = served
    ledger = HttpLedger(server.url)
    try:
        await ledger.allocate("whisper-server", 1500)
        assert gpu.held_by("whisper-server") == 1500
        assert gpu.snapshot()["processes"][0]["pid"] == os.getpid()
        with pytest.raises(CudaOutOfMemory, match="CUDA out of memory") as info:
            await ledger.allocate("ollama", 1000)
        assert info.value.free_mib == 548
        assert gpu.oom_count == 1
        mem = await ledger.memory()
        assert (mem.total_mib, mem.free_mib) == (2048, 548)
        token = await ledger.work_begin("whisper")
        assert activity.active() == ["whisper"]
        await ledger.work_end(token)
        assert [i.consumer for i in activity.intervals()] == ["whisper"]
        assert await ledger.release("whisper-server") == 1500
    finally:
        await ledger.aclose()


async def test_gpu_app_endpoints(served: tuple[SimGPU, ActivityLog, RunningApp]) -> None:
    gpu, _, server = served
    async with aiohttp.ClientSession(server.url) as http:
        async with http.post("/v1/alloc", json={"owner": "mvoice", "mib": 2000}) as r:
            assert (r.status, await r.json()) == (200, {"ok": True})
        async with http.post("/v1/alloc", json={"owner": "x", "mib": 100, "tag": "t"}) as r:
            assert r.status == 507
            assert (await r.json())["error"].startswith("CUDA out of memory. Tried to allocate")
        async with http.post("/v1/alloc", json={"owner": "x", "mib": "lots"}) as r:
            assert r.status == 400
        async with http.get("/v1/gpu") as r:
            snap = await r.json()
        assert snap["oom_count"] == 1
        assert snap["processes"] == [{"pid": None, "name": "mvoice", "used_mib": 2000}]
        assert set(snap) == {
            "name", "total_mib", "used_mib", "free_mib", "utilization_pct",
            "peak_used_mib", "oom_count", "processes",
        }  # fmt: skip
        async with http.post("/v1/release", json={"owner": "mvoice", "tag": None}) as r:
            assert await r.json() == {"freed_mib": 2000}
        async with http.post("/v1/reset_stats") as r:
            assert r.status == 200
        assert (gpu.oom_count, gpu.peak_used_mib) == (0, 0)


async def test_local_ledger_reads_memory() -> None:
    gpu = SimGPU(100)
    ledger = LocalLedger(gpu)
    await ledger.allocate("a", 40)
    assert (await ledger.memory()).free_mib == 60
    assert await ledger.release("a") == 40
