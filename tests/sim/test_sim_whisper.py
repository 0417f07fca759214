"""Fake whisper-server (in process and as its own process) and the launcher that stops it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp

from mgpumanager.sim import (
    ActivityLog,
    FakeSpec,
    FakeWhisper,
    LocalLedger,
    SimGPU,
    WhisperProcess,
    WhisperSettings,
    gpu_app,
    serving,
    start_cluster,
    wait_until,
)
from mgpumanager.sim.launcher import running_pid


def audio_form() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", b"\x00" * 2048, filename="a.wav", content_type="audio/wav")
    form.add_field("response_format", "json")
    return form


async def status_of(http: aiohttp.ClientSession, path: str) -> int:
    try:
        async with http.get(path) as r:
            return r.status
    except aiohttp.ClientConnectionError:
        return -1


async def healthy(http: aiohttp.ClientSession) -> bool:
    return await status_of(http, "/health") == 200


async def run(*argv: str) -> int:
    proc = await asyncio.create_subprocess_exec(*argv)
    return await proc.wait()


async def test_health_is_503_while_the_model_loads() -> None:
    gpu = SimGPU(24576)
    fake = FakeWhisper(
        WhisperSettings(model_mib=3000, load_s=0.5, run_s=0), ledger=LocalLedger(gpu)
    )
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.get("/health") as r:
            assert (r.status, await r.json()) == (503, {"status": "loading model"})
        assert gpu.held_by("whisper-server") == 0
        await wait_until(lambda: healthy(http), timeout_s=5)
        async with http.get("/health") as r:
            assert (r.status, await r.json()) == (200, {"status": "ok"})
        assert gpu.held_by("whisper-server") == 3000


async def test_inference_is_serialised_and_load_swaps_the_model() -> None:
    gpu, activity = SimGPU(24576), ActivityLog()
    settings = WhisperSettings(
        model_mib=3000, model_sizes_mib={"big.bin": 5000, "huge.bin": 9000}, load_s=0, run_s=0.05
    )
    fake = FakeWhisper(settings, ledger=LocalLedger(gpu), activity=activity)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        await wait_until(lambda: fake.state == "loaded", what="loaded")

        async def infer() -> Any:
            async with http.post("/inference", data=audio_form()) as r:
                return await r.json()

        results = await asyncio.gather(*(infer() for _ in range(4)))
        assert all(r == {"text": settings.transcript} for r in results)
        assert activity.max_concurrency("whisper") == 1 and len(activity.intervals()) == 4
        form = aiohttp.FormData()
        form.add_field("model", "big.bin")
        async with http.post("/load", data=form) as r:
            assert (r.status, await r.text()) == (200, "Load was successful!")
        assert gpu.allocations() == {("whisper-server", "weights"): 5000}
        gpu.allocate("ollama", 19000)
        form = aiohttp.FormData()
        form.add_field("model", "huge.bin")
        async with http.post("/load", data=form) as r:
            assert r.status == 500
        assert fake.fatal.is_set()  # the real server exits here
        async with http.post("/inference") as r:
            assert r.status == 400


async def test_standalone_process_via_launcher_releases_memory_on_stop(tmp_path: Path) -> None:
    gpu, activity = SimGPU(24576), ActivityLog()
    pidfile, port_file = tmp_path / "w.pid", tmp_path / "w.port"
    launcher = [sys.executable, "-m", "mgpumanager.sim.launcher"]
    async with serving(gpu_app(gpu, activity)) as gpu_server:
        argv = [
            sys.executable, "-m", "mgpumanager.sim.whisper", "--host", "127.0.0.1", "--port", "0",
            "--ledger", gpu_server.url, "--model-mib", "3000", "--load-s", "0.2", "--run-s", "0",
            "--port-file", str(port_file), "--activity",
        ]  # fmt: skip
        log = tmp_path / "w.log"
        assert (
            await run(*launcher, "start", "--pidfile", str(pidfile), "--log", str(log), "--", *argv)
            == 0
        )
        try:
            await wait_until(port_file.exists, timeout_s=15, what="port file")
            url = f"http://127.0.0.1:{port_file.read_text().strip()}"
            async with aiohttp.ClientSession(url) as http:
                await wait_until(
                    lambda: gpu.held_by("whisper-server") == 3000, timeout_s=15, what="loaded"
                )
                assert await status_of(http, "/health") == 200
                pid = running_pid(pidfile)
                assert gpu.snapshot()["processes"] == [
                    {"pid": pid, "name": "whisper-server", "used_mib": 3000}
                ]
                async with http.post("/inference", data=audio_form()) as r:
                    assert r.status == 200
                assert [i.consumer for i in activity.intervals()] == ["whisper"]
                assert await run(*launcher, "status", "--pidfile", str(pidfile)) == 0
        finally:
            assert await run(*launcher, "stop", "--pidfile", str(pidfile), "--timeout-s", "10") == 0
        assert gpu.held_by("whisper-server") == 0, log.read_text()
        assert not pidfile.exists()
        assert await run(*launcher, "stop", "--pidfile", str(pidfile)) == 0  # idempotent
        assert await run(*launcher, "status", "--pidfile", str(pidfile)) == 3


async def test_cluster_runs_whisper_as_a_process_that_commands_can_restart() -> None:
    spec = FakeSpec(
        mvoice=None,
        ollama=None,
        comfyui=None,
        whisper=WhisperSettings(load_s=0, run_s=0),
        whisper_subprocess=True,
    )
    cluster = await start_cluster(total_mib=8192, spec=spec)
    try:
        proc = cluster.fakes["whisper"]
        assert isinstance(proc, WhisperProcess) and cluster.urls["whisper"] == proc.url
        await wait_until(lambda: cluster.gpu.held_by("whisper-server") == 3000, timeout_s=15)
        assert await run(*proc.stop_argv) == 0
        assert cluster.gpu.held_by("whisper-server") == 0 and not proc.running()
        assert await run(*proc.start_argv) == 0
        async with aiohttp.ClientSession(proc.url) as http:
            await wait_until(lambda: healthy(http), timeout_s=15, what="back")
        assert cluster.gpu.held_by("whisper-server") == 3000
    finally:
        await cluster.aclose()
    assert cluster.gpu.held_by("whisper-server") == 0
