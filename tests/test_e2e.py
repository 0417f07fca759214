"""The central end-to-end tests on the simulated GPU: hammering the fakes directly runs the
card out of memory; the same load through the broker never does. Overlap is measured at the
upstreams (the fakes' activity log), not by the broker's own counters."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from conftest import running_broker, wait_for
from mgpumanager.registry import Config
from mgpumanager.sim.activity import ActivityLog
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.sim.whisper import WhisperSettings

MODEL = "llm:14b"
GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}
# ComfyUI answers an unchanged graph from its cache without running it: each image job here
# is a new image (a new seed), as a person making images sends.
_seeds = itertools.count(100)


def fresh_graph() -> dict[str, Any]:
    return {"3": {"class_type": "KSampler", "inputs": {"seed": next(_seeds)}}}


def spec(*, whisper_subprocess: bool = False) -> FakeSpec:
    return FakeSpec(
        mvoice=MVoiceSettings(vram_mib=6000, load_s=0.01, run_s=0.01, free_delay_s=0.03),
        ollama=OllamaSettings(
            models={MODEL: 14000}, load_s=0.01, run_s=0.02, free_delay_s=0.03, chunks=3
        ),
        comfyui=ComfyUISettings(
            model_mib=12000, ctx_mib=300, load_s=0.01, run_s=0.02, free_delay_s=0.03
        ),
        whisper=WhisperSettings(model_mib=3000, load_s=0.01, run_s=0.01),
        whisper_subprocess=whisper_subprocess,
    )


def registry(cluster: SimCluster, **consumer_overrides: dict[str, Any]) -> Config:
    health = {"interval_s": 0.2, "timeout_s": 2}
    consumers: dict[str, dict[str, Any]] = {
        "mvoice": {
            "url": cluster.urls["mvoice"],
            "health": {"path": "/health", **health},
            "vram_resident_mib": 6000,
            "unload": {"path": "/api/admin/unload"},
            "load": {"path": "/api/admin/load"},
            "can_coexist_with": ["whisper"],
            "priority": 3,
            "gpu_processes": ["mvoice"],
        },
        "ollama": {
            "type": "ollama",
            "url": cluster.urls["ollama"],
            "health": {"path": "/api/version", **health},
            "vram_resident_mib": 14000,
            "gpu_processes": ["ollama"],
        },
        "comfyui": {
            "type": "comfyui",
            "url": cluster.urls["comfyui"],
            "health": {"path": "/system_stats", **health},
            "vram_resident_mib": 12300,
            "priority": 1,
            "gpu_processes": ["comfyui"],
        },
    }
    if cluster.whisper_process is not None:
        consumers["whisper"] = {
            "type": "command",
            "url": cluster.urls["whisper"],
            "health": {"path": "/health", **health},
            "paths": {"stt": {"path": "/inference"}},
            "vram_resident_mib": 3000,
            "unload": {"command": cluster.whisper_process.stop_argv},
            "load": {"command": cluster.whisper_process.start_argv},
            "can_coexist_with": ["mvoice"],
            "gpu_processes": ["whisper-server"],
        }
    for name, extra in consumer_overrides.items():
        consumers[name] = {**consumers[name], **extra}
    routing = {"tts": "mvoice", "llm": "ollama", "image": "comfyui"}
    routing["stt"] = "whisper" if "whisper" in consumers else "mvoice"
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
            "scheduler": {"queue_timeout_s": 120},
            "routing": routing,
            "consumers": consumers,
        }
    )


@pytest.fixture
async def cluster() -> AsyncIterator[SimCluster]:
    async with await start_cluster(spec=spec()) as c:
        yield c


def requests_for(kind: str, base: str, *, direct: bool) -> tuple[str, dict[str, Any]]:
    """(url, post kwargs) for one job of `kind`, at the broker or straight at the fake."""
    paths: dict[str, tuple[str, str, dict[str, Any]]] = {
        "tts": ("/v1/tts", "/api/synthesize", {"json": {"text": "hi"}}),
        "stt": ("/v1/stt", "/api/transcribe", {"data": b"RIFF" + b"\0" * 2048}),
        "stt-whisper": ("/v1/stt", "/inference", {"data": _form()}),
        "llm": ("/v1/llm", "/api/generate", {"json": {"model": MODEL, "prompt": "hi"}}),
        "image": ("/v1/image", "/prompt", {"json": {"prompt": fresh_graph()}}),
    }
    facade, upstream, kwargs = paths[kind]
    return base + (upstream if direct else facade), kwargs


def _form() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF" + b"\0" * 1024, filename="a.wav")
    return form


async def hammer(jobs: list[tuple[str, dict[str, Any]]], concurrency: int) -> list[int]:
    statuses: list[int] = []
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                url, kwargs = queue.get_nowait()
                async with session.post(url, **kwargs) as resp:
                    await resp.read()
                    statuses.append(resp.status)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def no_cross_consumer_overlap(activity: ActivityLog) -> None:
    pairs = activity.overlapping_pairs()
    assert pairs == [], f"jobs of different consumers overlapped at the upstreams: {pairs[:3]}"


async def test_concurrent_clients_never_overlap_across_consumers(cluster: SimCluster) -> None:
    config = registry(cluster, ollama={"max_concurrency": 2})
    async with running_broker(config) as server:
        kinds = ["tts", "llm", "image", "llm", "tts", "llm", "image", "llm"] * 3
        jobs = [requests_for(k, server.url, direct=False) for k in kinds]
        statuses = await hammer(jobs, concurrency=8)
        await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="idle")
    assert statuses == [200] * len(jobs)
    no_cross_consumer_overlap(cluster.activity)
    assert cluster.activity.max_concurrency("ollama") <= 2
    assert cluster.activity.max_concurrency("mvoice") == 1
    assert cluster.activity.max_concurrency("comfyui") == 1
    assert cluster.gpu.oom_count == 0


async def test_comfyui_holds_the_lease_until_its_prompt_finished(cluster: SimCluster) -> None:
    comfy = cluster.fakes["comfyui"]
    slow = ComfyUISettings(model_mib=12000, ctx_mib=300, load_s=0, run_s=0.3)
    comfy.settings = slow  # type: ignore[attr-defined]
    config = registry(cluster)
    async with running_broker(config) as server, aiohttp.ClientSession() as session:
        url, kwargs = requests_for("image", server.url, direct=False)
        async with session.post(url, **kwargs) as resp:
            assert resp.status == 200
            prompt_id = (await resp.json())["prompt_id"]
        # /prompt has answered; the prompt still runs and still holds the lease.
        assert server.broker.lease.core.in_flight == 1
        url, kwargs = requests_for("tts", server.url, direct=False)
        async with session.post(url, **kwargs) as resp:
            assert resp.status == 200
        history = await (await session.get(f"{cluster.urls['comfyui']}/history/{prompt_id}")).json()
        assert history[prompt_id]["status"]["completed"] is True
    no_cross_consumer_overlap(cluster.activity)
    [image] = [i for i in cluster.activity.intervals() if i.consumer == "comfyui"]
    [tts] = [i for i in cluster.activity.intervals() if i.consumer == "mvoice"]
    assert tts.start >= image.end


def mixed_jobs(base: str, *, direct: bool, urls: dict[str, str] | None, n: int) -> list[Any]:
    rng = random.Random(2026)
    kinds = rng.choices(["tts", "stt-whisper", "llm", "image"], weights=[3, 2, 3, 2], k=n)
    out = []
    for kind in kinds:
        if direct:
            assert urls is not None
            target = {
                "tts": "mvoice",
                "stt-whisper": "whisper",
                "llm": "ollama",
                "image": "comfyui",
            }
            out.append(requests_for(kind, urls[target[kind]], direct=True))
        else:
            out.append(requests_for(kind, base, direct=False))
    return out


@pytest.mark.slow
async def test_the_card_never_runs_out_through_the_broker() -> None:
    """200 mixed requests from 16 clients: straight at the fakes the ledger records OOMs;
    through the broker none, every answer 2xx, peak ≤ total, evictions in LRU order."""
    async with await start_cluster(spec=spec(whisper_subprocess=True)) as direct_cluster:
        jobs = mixed_jobs("", direct=True, urls=direct_cluster.urls, n=200)
        await hammer(jobs, concurrency=16)
        assert direct_cluster.gpu.oom_count > 0, "the simulator must be able to fail"

    async with await start_cluster(spec=spec(whisper_subprocess=True)) as cluster:
        config = registry(cluster)
        async with running_broker(config) as server:
            # whisper-server answers 503 while its model loads at start-up: let it finish.
            await wait_for(
                lambda: all(h.ok for h in server.broker.health.states.values()), what="healthy"
            )
            jobs = mixed_jobs(server.url, direct=False, urls=None, n=200)
            statuses = await hammer(jobs, concurrency=16)
            await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="idle")
            residency = server.broker.residency
            decisions = list(residency.decisions)
            evictions = residency.view.counters.evictions
        assert sorted(set(statuses)) == [200], statuses
        assert cluster.gpu.oom_count == 0
        assert cluster.gpu.peak_used_mib <= cluster.gpu.total_mib
        assert evictions > 0 and decisions
        no_cross_consumer_overlap(cluster.activity)
        check_lru(decisions, cluster.activity, config)


def check_lru(decisions: list[Any], activity: ActivityLog, config: Config) -> None:
    """Each eviction, judged by the upstreams' own record of when each consumer last worked:
    no resident that survived and may not coexist with the target was idle longer than a
    victim and big enough to have made the room alone (LRU, with no unnecessary victim)."""
    intervals = activity.intervals()
    for d in decisions:
        last = {
            name: max(
                (i.end for i in intervals if i.consumer == name and i.end <= d.at), default=0.0
            )
            for name in d.residents
        }
        short = d.need_mib - d.headroom_mib
        for victim in d.victims:
            for survivor in set(d.residents) - set(d.victims):
                if config.coexist(survivor, d.target) and not config.coexist(victim, d.target):
                    continue
                cost = config.consumers[survivor].vram_resident_mib
                assert not (last[survivor] < last[victim] and cost >= short), (
                    f"{victim} evicted for {d.target} while {survivor} was idle longer "
                    f"and large enough ({d})"
                )


async def test_an_unload_that_never_frees_fails_the_job_and_nothing_runs_out(
    cluster: SimCluster,
) -> None:
    # comfyui's "unload" answers 200 and frees nothing (a GET of its stats page).
    config = registry(
        cluster,
        comfyui={"unload": {"method": "GET", "path": "/system_stats"}, "unload_timeout_s": 2},
    )
    async with running_broker(config) as server, aiohttp.ClientSession() as session:
        url, kwargs = requests_for("image", server.url, direct=False)
        async with session.post(url, **kwargs) as resp:
            assert resp.status == 200, await resp.text()
        await wait_for(lambda: server.broker.lease.core.in_flight == 0, what="prompt done")
        # ollama (14000) cannot fit beside comfyui (12300): comfyui must go, and will not.
        url, kwargs = requests_for("llm", server.url, direct=False)
        async with session.post(url, **kwargs) as resp:
            body = await resp.json()
            assert resp.status == 503, body
            assert body["error"] == "eviction_failed" and body["retryable"] is True
            assert body["consumer"] == "ollama" and "comfyui" in body["message"]
        status = await (await session.get(f"{server.url}/v1/status")).json()
        assert status["consumers"]["comfyui"]["residency"] == "unknown"
        assert status["consumers"]["ollama"]["residency"] == "unloaded"
        assert status["scheduler"]["eviction_failures"] == 1
        # unknown memory counts as taken, and for one unload_timeout_s the stuck consumer is
        # in the way: the next attempt fails fast, retryable, and still loads nothing
        async with session.post(url, **kwargs) as resp:
            body = await resp.json()
            assert (resp.status, body["error"], body["retryable"]) == (
                507,
                "insufficient_vram",
                True,
            )
            assert "comfyui" in body["message"] and "not confirmed" in body["message"]
        assert server.broker.residency.view.counters.eviction_failures == 1  # no second attempt
    assert cluster.gpu.oom_count == 0
    assert cluster.gpu.held_by("ollama") == 0  # never loaded on an unconfirmed eviction


async def test_a_consumer_without_an_unload_call_is_never_a_victim(cluster: SimCluster) -> None:
    data = registry(cluster).model_dump(mode="json", exclude_unset=True)
    del data["consumers"]["mvoice"]["unload"]
    data["consumers"]["mvoice"]["vram_resident_mib"] = 12000
    config = Config.model_validate(data)
    async with running_broker(config) as server, aiohttp.ClientSession() as session:
        url, kwargs = requests_for("tts", server.url, direct=False)
        async with session.post(url, **kwargs) as resp:
            assert resp.status == 200
        url, kwargs = requests_for("llm", server.url, direct=False)  # 14000 MiB: no room
        async with session.post(url, **kwargs) as resp:
            body = await resp.json()
        assert (resp.status, body["error"], body["consumer"]) == (
            507,
            "insufficient_vram",
            "ollama",
        )
        assert "'mvoice'" in body["message"] and "pinned" in body["message"]
        assert server.broker.residency.view.records["mvoice"].state == "resident"
    assert cluster.fakes["mvoice"].unload_count == 0  # type: ignore[attr-defined]
    assert cluster.gpu.oom_count == 0
