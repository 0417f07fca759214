"""Residency bookkeeping at its edges: unknown memory stays counted until an unload confirms,
a client leaving mid-load does not leave a half-done state, a consumer that left by itself is
not "evicted" again, and a reader without per-process figures measures nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from conftest import Upstream, consumer, make_config, running_broker, wait_for
from mgpumanager.registry import Config
from mgpumanager.residency.records import Record, State
from mgpumanager.upstreams.gpu import GpuProcess, GpuReading


def state_of(record: Record) -> State:
    """The record's state, read afresh: mypy keeps `record.state` narrowed by an earlier assert
    across the awaits in which the broker changes it."""
    return record.state


async def start_upstreams(*names: str) -> tuple[dict[str, Upstream], list[str]]:
    ups = {n: Upstream() for n in names}
    unloads: list[str] = []
    for n, up in ups.items():

        async def job(request: web.Request, n: str = n) -> web.Response:
            return web.json_response({"ok": n})

        async def unload(request: web.Request, n: str = n) -> web.Response:
            unloads.append(n)
            return web.json_response({})

        up.route("POST", "/job", job)
        up.route("POST", "/unload", unload)
        await up.start()
    return ups, unloads


async def test_unknown_memory_stays_counted_until_an_unload_confirms_it() -> None:
    """Static backend, nothing known at start-up: x's job cannot make room (p is pinned) and
    fails; x must still count as taken, so w's job evicts x before loading."""
    ups, unloads = await start_upstreams("x", "p", "w")
    job = {"unload": {"path": "/unload"}}
    config = make_config(
        {
            "x": consumer(
                ups["x"].url, vram_resident_mib=10000, paths={"tts": {"path": "/job"}}, **job
            ),
            "p": consumer(ups["p"].url, vram_resident_mib=15000, pinned=True),
            "w": consumer(
                ups["w"].url, vram_resident_mib=8000, paths={"llm": {"path": "/job"}}, **job
            ),
        },
        routing={"tts": "x", "llm": "w"},
    )
    try:
        async with running_broker(config) as server, aiohttp.ClientSession() as session:
            records = server.broker.residency.view.records
            assert {n: r.state for n, r in records.items()} == dict.fromkeys("xpw", State.UNKNOWN)
            async with session.post(f"{server.url}/v1/tts", json={}) as resp:
                assert (await resp.json())["error"] == "insufficient_vram"
            assert records["x"].state is State.UNKNOWN  # not forgotten by the failure
            async with session.post(f"{server.url}/v1/llm", json={}) as resp:
                assert resp.status == 200
            assert unloads == ["x"]  # x's memory had to be given back first
            assert (records["x"].state, records["w"].state) == (State.UNLOADED, State.RESIDENT)
    finally:
        for up in ups.values():
            await up.aclose()


async def held_open_load(upstream: Upstream) -> tuple[Config, asyncio.Event, asyncio.Event]:
    """Consumer a, whose load answers only once `release` is set (`entered`: it has begun)."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def load(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"loaded": True})

    async def job(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    upstream.route("POST", "/load", load)
    upstream.route("POST", "/job", job)
    await upstream.start()
    config = make_config(
        {
            "a": consumer(
                upstream.url,
                load={"path": "/load"},
                unload={"path": "/load"},
                paths={"tts": {"path": "/job"}},
            )
        },
        routing={"tts": "a"},
    )
    return config, entered, release


async def test_a_client_leaving_mid_load_does_not_cut_the_load_in_half(upstream: Upstream) -> None:
    config, entered, release = await held_open_load(upstream)
    async with running_broker(config) as server:
        record = server.broker.residency.view.records["a"]
        record.state = State.UNLOADED
        async with aiohttp.ClientSession() as leaving:
            task = asyncio.create_task(leaving.post(f"{server.url}/v1/tts", json={}))
            await asyncio.wait_for(entered.wait(), 10)
            assert record.state is State.LOADING
            task.cancel()
        await wait_for(lambda: server.broker.lease.core.stats().cancelled == 0, what="no-op")
        release.set()  # the load finishes although its client is gone
        await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="lease freed")
        assert state_of(record) is State.RESIDENT
        assert server.broker.lease.core.stats().cancelled == 1


async def test_a_consumer_that_left_by_itself_is_not_evicted_again() -> None:
    """Ollama's keep_alive ran out: /api/ps is empty although the broker last saw it resident.
    The planner takes the upstream's word and finds the room free without an unload."""
    from mgpumanager.sim.cluster import FakeSpec, start_cluster

    async with await start_cluster(spec=FakeSpec.instant()) as cluster:
        ollama: Any = cluster.fakes["ollama"]
        model = next(iter(ollama.settings.models))
        config = make_config(
            {
                "ollama": {
                    "type": "ollama",
                    "url": cluster.urls["ollama"],
                    "vram_resident_mib": 14000,
                },
                "comfyui": {
                    "type": "comfyui",
                    "url": cluster.urls["comfyui"],
                    "vram_resident_mib": 12300,
                },
            },
            gpu={"backend": "sim", "sim_url": cluster.gpu_url, "total_mib": None},
            routing={"llm": "ollama", "image": "comfyui"},
        )
        async with running_broker(config) as server, aiohttp.ClientSession() as session:
            body = {"model": model, "prompt": "hi", "keep_alive": 0}  # it leaves right after
            async with session.post(f"{server.url}/v1/llm", json=body) as resp:
                await resp.read()
            await wait_for(lambda: not ollama.resident_models(), what="ollama left by itself")
            records = server.broker.residency.view.records
            assert records["ollama"].state is State.RESIDENT  # the broker did not see it go
            graph = {"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}}
            async with session.post(f"{server.url}/v1/image", json=graph) as resp:
                assert resp.status == 200, await resp.text()
            assert state_of(records["ollama"]) is State.UNLOADED
            victims = [v for d in server.broker.residency.decisions for v in d.victims]
            assert "ollama" not in victims  # found gone, not unloaded again
        assert cluster.gpu.oom_count == 0


def test_a_reading_without_per_process_figures_measures_nothing() -> None:
    from mgpumanager.residency.evict import Residency

    config = make_config({"a": consumer("http://127.0.0.1:9", gpu_processes=["svc-a"])})

    class Reader:
        backend, total_mib = "nvml", 24576

    residency = Residency(config, {}, Reader(), clock=None)  # type: ignore[arg-type]
    hidden = GpuReading("nvml", "gpu", 24576, 8000, 16576, 0, (GpuProcess(None, "pid:0", 8000),))
    named = GpuReading("nvml", "gpu", 24576, 8000, 16576, 0, (GpuProcess(7, "other", 8000),))
    empty = GpuReading("nvml", "gpu", 24576, 0, 24576, 0, ())
    no_figures = GpuReading("nvml", "gpu", 24576, 8000, 16576, 0, (GpuProcess(7, "svc", None),))
    assert residency.view.measure("a", hidden) is None
    assert residency.view.measure("a", no_figures) is None
    assert residency.view.measure("a", named) == 0
    assert residency.view.measure("a", empty) == 0


def test_a_consumer_without_a_load_call_costs_its_unload_and_the_others_unload_and_load() -> None:
    from types import SimpleNamespace

    from mgpumanager.residency.evict import Residency

    url = "http://127.0.0.1:9"
    config = make_config({n: consumer(url) for n in ("lazy", "loads", "never")})
    adapters = {
        "lazy": SimpleNamespace(has_load=False),  # loads inside its first job (ComfyUI)
        "loads": SimpleNamespace(has_load=True),
        "never": SimpleNamespace(has_load=True),
    }

    class Reader:
        backend, total_mib = "static", 24576

    residency = Residency(config, adapters, Reader(), clock=None)  # type: ignore[arg-type]
    records = residency.view.records
    records["lazy"].last_unload_s = 0.5
    records["loads"].last_unload_s, records["loads"].last_load_s = 1.0, 4.0
    records["never"].last_load_s = 3.0  # never unloaded: its cycle is not known
    # The lazy one's load is added by the scheduler, from its first job after a swap.
    assert residency.swap_costs() == {"lazy": 0.5, "loads": 5.0}


async def test_swap_seconds_counts_the_lease_time_spent_making_a_consumer_resident(
    upstream: Upstream,
) -> None:
    """The load is held open by the test: the counter covers at least that span, a job for a
    consumer already resident adds nothing, and /v1/status and /metrics show the figure."""
    config, entered, release = await held_open_load(upstream)
    async with running_broker(config) as server, aiohttp.ClientSession() as session:
        residency = server.broker.residency
        residency.view.records["a"].state = State.UNLOADED
        assert residency.view.counters.swap_seconds == 0
        first = asyncio.create_task(session.post(f"{server.url}/v1/tts", json={}))
        await asyncio.wait_for(entered.wait(), 10)
        held_from = time.monotonic()
        await wait_for(lambda: time.monotonic() - held_from >= 0.05, what="the load held open")
        held_s = time.monotonic() - held_from
        release.set()
        async with await first as resp:
            assert resp.status == 200
        swapped_s = residency.view.counters.swap_seconds
        assert swapped_s >= held_s
        async with session.post(f"{server.url}/v1/tts", json={}) as resp:
            assert resp.status == 200  # resident already: no swap, nothing added
        assert residency.view.counters.swap_seconds == swapped_s
        async with session.get(f"{server.url}/v1/status") as resp:
            status = await resp.json()
        assert status["scheduler"]["swap_seconds"] == swapped_s
        assert status["scheduler"]["swaps"] == 1
        async with session.get(f"{server.url}/metrics") as resp:
            metrics = await resp.text()
        assert f"mgpumanager_swap_seconds_total {swapped_s}" in metrics
