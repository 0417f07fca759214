"""Weight prefetch: the next tenure's files read ahead while a job runs, bounded by
MemAvailable, cancelled when the forecast changes, paused while residency changes."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import Upstream, consumer, make_config, running_broker, wait_for
from mgpumanager.clock import FakeClock
from mgpumanager.registry import Config, HttpCall, SchedulerConfig
from mgpumanager.residency.prefetch import (
    Prefetcher,
    _expand,
    _plan,
    cached_fraction,
    job_weights,
    loader_files,
    ollama_blobs,
    read_range_into_cache,
)
from mgpumanager.residency.records import State
from mgpumanager.residency.view import ResidencyView
from mgpumanager.scheduling.core import ConsumerPolicy, Outcome, SchedulerCore
from mgpumanager.upstreams.adapters import make_adapter
from mgpumanager.upstreams.gpu import StaticReader

MIB = 1024 * 1024


def weights(tmp_path: Path, name: str, files: int = 2, size: int = MIB) -> str:
    folder = tmp_path / name
    folder.mkdir()
    for i in range(files):
        (folder / f"part{i}.bin").write_bytes(bytes([i % 251]) * size)
    return str(folder / "*.bin")


def registry(tmp_path: Path, **top: Any) -> Config:
    return Config.model_validate(
        {
            "gpu": {"backend": "static", "total_mib": 24576},
            "consumers": {
                name: {
                    "url": "http://127.0.0.1:9",
                    "vram_resident_mib": 1000,
                    "weights": [weights(tmp_path, name)],
                }
                for name in ("a", "b", "c")
            },
            **top,
        }
    )


class Box:
    """A core, a residency view and a prefetcher over consumers a, b, c (none resident)."""

    def __init__(
        self,
        config: Config,
        *,
        read_range: Callable[[str, int, int], int] | None = None,
        mem_available: Callable[[], int | None] = lambda: 64 * 1024 * MIB,
    ) -> None:
        self.config = config
        self.clock = FakeClock()
        adapters = {n: make_adapter(n, c, None) for n, c in config.consumers.items()}  # type: ignore[arg-type]
        self.residency = ResidencyView(config, adapters, StaticReader(24576), self.clock)
        for record in self.residency.records.values():
            record.state = State.UNLOADED
        self.core = SchedulerCore(
            SchedulerConfig(policy="priority"),
            {n: ConsumerPolicy() for n in config.consumers},
            self.clock,
        )
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.prefetcher = Prefetcher(
            lambda: self.config,
            self.residency,
            self.core,
            lambda: adapters,
            self.clock,
            emit=self._record,
            mem_available=mem_available,
            read_range=read_range,
        )
        self.prefetcher.attach()

    def _record(self, kind: str, /, **figures: Any) -> None:
        self.events.append((kind, figures))

    def run(self, consumer: str, priority: int | None = None) -> int:
        """A job of `consumer` granted and ready at once (a tenure under way)."""
        job = self.core.submit(consumer, priority)
        [grant] = self.core.schedule(self.residency.resident_set())
        self.core.ready(grant.job_id)
        self.residency.records[consumer].state = State.RESIDENT
        return job

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [figures for k, figures in self.events if k == kind]


class Gate:
    """A read_range that blocks in its thread until the test lets each chunk through."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.calls: list[str] = []

    def __call__(self, path: str, offset: int, length: int) -> int:
        self.calls.append(path)
        self.open.wait(10)
        return length


async def test_next_tenure_read_ahead_while_a_job_runs(tmp_path: Path) -> None:
    box = Box(registry(tmp_path))
    try:
        box.run("a")
        box.core.submit("b")
        await wait_for(lambda: bool(box.kinds("prefetch.done")), what="b's files read")
        [done] = box.kinds("prefetch.done")
        assert done["consumer"] == "b" and done["bytes"] == 2 * MIB
        assert box.prefetcher.counters.bytes_read == 2 * MIB
        [started] = box.kinds("prefetch.started")
        assert all("/b/" in f for f in started["files"])
    finally:
        await box.prefetcher.aclose()


async def test_cancelled_when_the_queue_changes(tmp_path: Path) -> None:
    gate = Gate()
    box = Box(registry(tmp_path), read_range=gate)
    try:
        box.run("a")
        b_job = box.core.submit("b")
        await wait_for(lambda: len(gate.calls) == 1, what="b's first chunk asked for")
        assert "/b/" in gate.calls[0]
        # An urgent job for c arrives: the next tenure is c's now, b's reading stops.
        box.core.submit("c", priority=4)
        await wait_for(lambda: bool(box.kinds("prefetch.cancelled")), what="b's cancelled")
        [cancelled] = box.kinds("prefetch.cancelled")
        assert cancelled["consumer"] == "b"
        assert cancelled["reason"] == "the next tenure changed"
        gate.open.set()
        await wait_for(lambda: bool(box.kinds("prefetch.done")), what="c's files read")
        assert [d["consumer"] for d in box.kinds("prefetch.done")] == ["c"]
        # b's job leaves the queue, then c's: nothing left to read ahead, nothing under way.
        box.core.cancel(b_job)
        [c_job] = [j.id for j in box.core.waiting.values() if j.consumer == "c"]
        box.core.cancel(c_job, Outcome.CANCELLED)
        await wait_for(lambda: box.prefetcher._task is None, what="the forecast dropped")
    finally:
        gate.open.set()
        await box.prefetcher.aclose()


async def test_bounded_by_mem_available(tmp_path: Path) -> None:
    # 3 MiB available at half: 1.5 MiB of b's two 1 MiB files, the second cut short.
    box = Box(registry(tmp_path), mem_available=lambda: 3 * MIB)
    try:
        box.run("a")
        box.core.submit("b")
        await wait_for(lambda: bool(box.kinds("prefetch.done")), what="b read")
        [started] = box.kinds("prefetch.started")
        assert started["budget_bytes"] == 3 * MIB // 2
        assert started["bytes"] == 3 * MIB // 2
        assert box.prefetcher.counters.bytes_read == 3 * MIB // 2
    finally:
        await box.prefetcher.aclose()


async def test_nothing_read_without_memory_to_spare(tmp_path: Path) -> None:
    gate = Gate()
    box = Box(registry(tmp_path), read_range=gate, mem_available=lambda: 0)
    try:
        box.run("a")
        box.core.submit("b")
        await wait_for(
            lambda: (
                box.prefetcher.current is not None and box.prefetcher.current.state == "nothing"
            ),
            what="the plan made",
        )
        assert gate.calls == [] and box.kinds("prefetch.started") == []
    finally:
        await box.prefetcher.aclose()


async def test_paused_while_residency_changes_and_warm_when_its_tenure_begins(
    tmp_path: Path,
) -> None:
    box = Box(registry(tmp_path))
    try:
        a_job = box.run("a")
        await box.residency.changing.acquire()  # a change under way (a model loading)
        box.core.submit("b")
        await wait_for(
            lambda: box.prefetcher.current is not None and box.prefetcher.current.state == "paused",
            what="the prefetch paused",
        )
        assert box.prefetcher.counters.bytes_read == 0
        box.residency.changing.release()
        box.prefetcher.poke()
        await wait_for(lambda: bool(box.kinds("prefetch.done")), what="b read after the change")
        # a's job ends; b's tenure begins: its load finds the files read ahead.
        box.core.finish(a_job, Outcome.COMPLETED)
        [grant] = box.core.schedule(box.residency.resident_set())
        assert grant.consumer == "b" and grant.prepare
        await wait_for(lambda: bool(box.kinds("prefetch.used")), what="the load's verdict")
        [used] = box.kinds("prefetch.used")
        assert used["warm"] is True and used["read_bytes"] == 2 * MIB
        assert box.prefetcher.counters.warm_loads == 1
    finally:
        await box.prefetcher.aclose()


async def test_off_with_prefetch_false(tmp_path: Path) -> None:
    gate = Gate()
    box = Box(registry(tmp_path, prefetch=False), read_range=gate)
    try:
        assert not box.config.prefetch.enabled
        box.run("a")
        box.core.submit("b")
        await wait_for(lambda: not box.prefetcher._pending, what="the forecast made")
        assert box.prefetcher.current is None and gate.calls == []
    finally:
        await box.prefetcher.aclose()


async def test_resident_next_consumer_needs_nothing(tmp_path: Path) -> None:
    box = Box(registry(tmp_path))
    try:
        box.residency.records["b"].state = State.RESIDENT
        box.run("a")
        box.core.submit("b")
        await wait_for(lambda: not box.prefetcher._pending, what="the forecast made")
        assert box.prefetcher.current is None
    finally:
        await box.prefetcher.aclose()


# -- where the files are ----------------------------------------------------------------------


def test_comfyui_loader_files_under_model_dirs(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "checkpoints" / "sd").mkdir(parents=True)
    (models / "loras").mkdir()
    (models / "checkpoints" / "sd" / "base.safetensors").write_bytes(b"x" * 10)
    (models / "loras" / "style.safetensors").write_bytes(b"y" * 5)
    prompt = {
        "prompt": {
            "4": {
                "class_type": "CheckpointLoaderSimple",
                "inputs": {"ckpt_name": "sd/base.safetensors"},
            },
            "5": {
                "class_type": "LoraLoader",
                "inputs": {"lora_name": "style.safetensors", "model": ["4", 0]},
            },
            "6": {"class_type": "KSampler", "inputs": {"seed": 1}},
        }
    }
    names = loader_files(json.dumps(prompt).encode())
    assert names == ("sd/base.safetensors", "style.safetensors")
    found = _expand(names, [str(models)])
    assert [(Path(p).name, n) for p, n in found] == [
        ("base.safetensors", 10),
        ("style.safetensors", 5),
    ]
    assert loader_files(b"not json") == ()
    config = Config.model_validate(
        {"consumers": {"comfyui": {"type": "comfyui", "url": "http://x", "vram_resident_mib": 1}}}
    )
    body = json.dumps(prompt).encode()
    assert job_weights(config, "comfyui", HttpCall(path="/prompt"), body) == names
    assert job_weights(config, "comfyui", HttpCall(path="/upload/image"), body) == ()


async def test_ollama_blobs_from_the_modelfile(tmp_path: Path) -> None:
    blob = tmp_path / "blobs" / "sha256-abc"
    blob.parent.mkdir()
    blob.write_bytes(b"z" * 7)

    class Adapter:
        async def request_json(self, method: str, path: str, **kw: Any) -> Any:
            assert (method, path, kw["body"]) == ("POST", "/api/show", {"model": "m:latest"})
            return {"modelfile": "# Modelfile\nFROM /elsewhere/blobs/sha256-abc\nPARAMETER x 1\n"}

    paths = await ollama_blobs(Adapter(), "m:latest")  # type: ignore[arg-type]
    assert paths == ["/elsewhere/blobs/sha256-abc"]
    # Not readable where the upstream says (another mount): its name under model_dirs.
    found = _expand(paths, [str(tmp_path), str(tmp_path / "blobs")])
    assert found == [(str(blob), 7)]


def test_plan_and_cache_helpers(tmp_path: Path) -> None:
    assert _plan([("a", 5), ("b", 5)], 7) == [("a", 5), ("b", 2)]
    assert _plan([("a", 5)], None) == [("a", 5)]
    path = tmp_path / "w.bin"
    path.write_bytes(b"q" * (3 * MIB))
    assert read_range_into_cache(str(path), MIB, 2 * MIB) == 2 * MIB
    assert read_range_into_cache(str(path), 2 * MIB, 4 * MIB) == MIB  # past the end
    fraction = cached_fraction([str(path)])
    assert fraction is None or 0.0 <= fraction <= 1.0


@pytest.mark.parametrize("value", [False, {"enabled": False, "max_ram_fraction": 0.25}])
def test_registry_keys(value: object) -> None:
    config = Config.model_validate(
        {
            "prefetch": value,
            "consumers": {
                "ollama": {
                    "type": "ollama",
                    "url": "http://x",
                    "vram_resident_mib": 1,
                    "model_dirs": ["/var/lib/ollama/models"],
                    "models": [{"name": "m", "weights": ["/w/*.gguf"]}],
                }
            },
        }
    )
    assert not config.prefetch.enabled
    assert config.consumers["ollama"].models[0].weights == ["/w/*.gguf"]
    assert Config.model_validate({"consumers": {}}).prefetch.max_ram_fraction == 0.5


# -- through the broker -------------------------------------------------------------------------


async def test_broker_reads_the_next_load_ahead_and_reports_it(
    tmp_path: Path, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"ok": True})

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    upstream.route("POST", "/a/run", slow)
    for path in ("/b/run", "/a/unload", "/b/unload", "/a/load", "/b/load"):
        upstream.route("POST", path, ok)
    await upstream.start()
    blob = weights(tmp_path, "b", files=1, size=3 * MIB)

    def one(name: str, kind: str, **extra: Any) -> dict[str, Any]:
        return consumer(
            upstream.url,
            paths={kind: {"path": f"/{name}/run"}},
            vram_resident_mib=14000,
            unload={"path": f"/{name}/unload"},
            load={"path": f"/{name}/load"},
            **extra,
        )

    config = make_config(
        {"a": one("a", "tts"), "b": one("b", "stt", weights=[blob])},
        gpu={"static_settle_s": 0},
        routing={"tts": "a", "stt": "b"},
    )
    async with running_broker(config) as server:
        broker = server.broker
        seen: list[str] = []
        broker.events.taps.append(lambda event: seen.append(event.type))
        a_job = asyncio.ensure_future(client.post(f"{server.url}/v1/tts", json={}))
        await wait_for(lambda: broker.lease.core.holder == "a", what="a's tenure")
        b_job = asyncio.ensure_future(client.post(f"{server.url}/v1/stt", json={}))

        def prefetched() -> bool:
            status = broker.status().prefetch
            return status is not None and status.done == 1

        await wait_for(prefetched, what="b's weights read while a's job runs")
        release.set()
        for job in (a_job, b_job):
            async with await job as resp:
                assert resp.status == 200
        async with client.get(f"{server.url}/v1/status") as resp:
            status = (await resp.json())["prefetch"]
        assert status["enabled"] and status["warm_loads"] == 1 and status["cold_loads"] == 0
        assert status["bytes_read"] == 3 * MIB
        assert status["last"]["consumer"] == "b" and status["last"]["warm"] is True
        await wait_for(lambda: "prefetch.used" in seen, what="the load's verdict emitted")
        assert seen.index("prefetch.started") < seen.index("prefetch.done")


async def test_a_reload_switching_prefetch_off_stops_the_reading(tmp_path: Path) -> None:
    gate = Gate()
    box = Box(registry(tmp_path), read_range=gate)
    try:
        box.run("a")
        box.core.submit("b")
        await wait_for(lambda: len(gate.calls) == 1, what="b's first chunk asked for")
        box.config = box.config.model_copy(
            update={"prefetch": box.config.prefetch.model_copy(update={"enabled": False})}
        )
        gate.open.set()
        await wait_for(lambda: bool(box.kinds("prefetch.cancelled")), what="the reading stopped")
        [cancelled] = box.kinds("prefetch.cancelled")
        assert cancelled["reason"] == "prefetch is off" and len(gate.calls) == 1
    finally:
        gate.open.set()
        await box.prefetcher.aclose()
