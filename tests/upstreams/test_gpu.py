from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pynvml
import pytest
from aiohttp import web

from fake_nvml import FakeNvml, proc
from mgpumanager.registry import GpuConfig
from mgpumanager.sim.server import serve_app
from mgpumanager.upstreams.gpu import (
    GpuInitError,
    GpuProcess,
    GpuReading,
    NvmlReader,
    SimReader,
    StaticReader,
    make_reader,
    measured_mib,
)


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    """A fake /proc with the command lines of pids 100 and 200."""
    for pid, argv in {
        100: ["ollama", "runner", "--model", "x"],
        200: ["python", "main.py"],
    }.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return tmp_path


async def started(fake: FakeNvml, proc_root: Path, **kwargs: Any) -> NvmlReader:
    reader = NvmlReader(nvml=fake, proc_root=proc_root, **kwargs)
    await reader.start()
    return reader


# --------------------------------------------------------------------------------------------
# NVML


async def test_nvml_normal_reading(proc_root: Path) -> None:
    fake = FakeNvml(procs=[proc(100, 3000), proc(200, 1000)])
    reader = await started(fake, proc_root)
    assert reader.total_mib == 24_576
    reading = await reader.read()
    assert reading == GpuReading(
        backend="nvml",
        device="NVIDIA GeForce RTX 4090",
        total_mib=24_576,
        used_mib=4096,
        free_mib=24_576 - 300 - 4096,
        utilization_pct=37,
        processes=(
            GpuProcess(100, "ollama runner --model x", 3000),
            GpuProcess(200, "python main.py", 1000),
        ),
    )
    assert reading.ok
    assert "procs_v3" in fake.calls and "mem_v1" not in fake.calls
    await reader.aclose()
    assert fake.inits == 0


async def test_nvml_v2_unavailable_falls_back_to_v1_once(proc_root: Path) -> None:
    fake = FakeNvml(v2_error=pynvml.NVMLError_FunctionNotFound())
    reader = await started(fake, proc_root)
    reading = await reader.read()
    assert reading.ok and reading.used_mib == 4096 + 300  # v1: reserved counted as used
    await reader.read()
    assert fake.calls.count("mem_v2") == 1  # not retried on every read
    await reader.aclose()


@pytest.mark.parametrize(
    "error", [pynvml.NVMLError_NotSupported(), TypeError("unexpected keyword 'version'")]
)
async def test_nvml_v2_refused_falls_back_to_v1(proc_root: Path, error: Exception) -> None:
    reader = await started(FakeNvml(v2_error=error), proc_root)
    assert (await reader.read()).used_mib == 4396
    await reader.aclose()


async def test_nvml_unknown_process_usage_and_hidden_pids(proc_root: Path) -> None:
    fake = FakeNvml(
        procs=[proc(100, None), proc(0, 500), proc(4_000_000, 700), proc(4_000_001, 800)],
        proc_names={4_000_001: b"/usr/bin/comfy"},
    )
    reader = await started(fake, proc_root)
    reading = await reader.read()
    assert reading.processes == (
        GpuProcess(100, "ollama runner --model x", None),  # usage unknown, not zero
        GpuProcess(None, "pid:0", 500),  # hidden pid
        GpuProcess(4_000_000, "pid:4000000", 700),  # not in our /proc, unknown to NVML
        GpuProcess(4_000_001, "/usr/bin/comfy", 800),  # NVML's name when /proc has none
    )
    assert measured_mib(reading, ["ollama"]) is None
    assert measured_mib(reading, ["pid:", "comfy"]) == 2000
    await reader.aclose()


async def test_nvml_old_library_without_v3_process_call(proc_root: Path) -> None:
    fake = FakeNvml(procs=[proc(200, 1000)], no_v3=True)
    reader = await started(fake, proc_root)
    assert (await reader.read()).processes == (GpuProcess(200, "python main.py", 1000),)
    assert (await reader.read()).processes == (GpuProcess(200, "python main.py", 1000),)
    assert fake.calls.count("procs_v3") == 1 and fake.calls.count("procs_v2") == 2
    await reader.aclose()


async def test_nvml_utilization_and_processes_not_supported(proc_root: Path) -> None:
    fake = FakeNvml(
        util_error=pynvml.NVMLError_NotSupported(), procs_error=pynvml.NVMLError_NotSupported()
    )
    reader = await started(fake, proc_root)
    reading = await reader.read()
    assert reading.ok
    assert reading.utilization_pct is None and reading.processes == ()
    assert reading.used_mib == 4096
    await reader.aclose()


async def test_nvml_error_at_run_time_then_recovery(
    proc_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeNvml()
    reader = await started(fake, proc_root)
    fake.memory_error = pynvml.NVMLError_GpuIsLost()
    with caplog.at_level(logging.INFO, logger="mgpumanager.upstreams.gpu"):
        failures = [await reader.read() for _ in range(5)]
        for reading in failures:
            assert not reading.ok
            assert reading.error is not None and "NVMLError_GpuIsLost" in reading.error
            assert reading.used_mib is None and reading.free_mib is None
            assert reading.utilization_pct is None
            assert reading.total_mib == 24_576
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # rate-limited: a dead GPU does not flood the log
        fake.memory_error = None
        reading = await reader.read()
    assert reading.ok and reading.used_mib == 4096
    assert any("recovered" in r.getMessage() for r in caplog.records)
    await reader.aclose()


async def test_nvml_unexpected_exception_is_a_failed_reading(proc_root: Path) -> None:
    fake = FakeNvml(procs=[SimpleNamespace(pid=1)])  # a struct without usedGpuMemory
    reader = await started(fake, proc_root)
    reading = await reader.read()
    assert not reading.ok and reading.error is not None and "AttributeError" in reading.error
    await reader.aclose()


async def test_nvml_total_cap(proc_root: Path) -> None:
    reader = await started(FakeNvml(), proc_root, total_cap_mib=8000)
    assert reader.total_mib == 8000
    reading = await reader.read()
    assert (reading.total_mib, reading.used_mib, reading.free_mib) == (8000, 4096, 8000 - 4096)
    await reader.aclose()


async def test_nvml_read_before_start_is_a_failed_reading() -> None:
    reader = NvmlReader(nvml=FakeNvml())
    assert not (await reader.read()).ok
    with pytest.raises(RuntimeError):
        _ = reader.total_mib


async def test_nvml_init_failure_is_gpu_init_error() -> None:
    with pytest.raises(GpuInitError, match="NVMLError_LibraryNotFound"):
        await NvmlReader(nvml=FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound())).start()


async def test_nvml_bad_index_shuts_nvml_down_again() -> None:
    fake = FakeNvml()
    with pytest.raises(GpuInitError, match="GPU 3"):
        await NvmlReader(index=3, nvml=fake).start()
    assert fake.inits == 0


async def test_make_reader_nvml() -> None:
    reader = await make_reader(GpuConfig(backend="nvml"), nvml=FakeNvml())
    assert reader.backend == "nvml" and reader.total_mib == 24_576
    await reader.aclose()


async def test_make_reader_auto_prefers_nvml() -> None:
    reader = await make_reader(GpuConfig(backend="auto", total_mib=10_000), nvml=FakeNvml())
    assert isinstance(reader, NvmlReader)
    assert reader.total_mib == 10_000  # total_mib caps the card
    await reader.aclose()


async def test_make_reader_nvml_requested_but_failing() -> None:
    fake = FakeNvml(init_error=pynvml.NVMLError_DriverNotLoaded())
    with pytest.raises(GpuInitError, match="DriverNotLoaded"):
        await make_reader(GpuConfig(backend="nvml", total_mib=8000), nvml=fake)


async def test_make_reader_auto_falls_back_to_static() -> None:
    fake = FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound())
    reader = await make_reader(GpuConfig(backend="auto", total_mib=8000), nvml=fake)
    assert isinstance(reader, StaticReader)
    assert reader.total_mib == 8000
    await reader.aclose()


async def test_make_reader_auto_without_total_is_a_clear_error() -> None:
    fake = FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound())
    with pytest.raises(GpuInitError, match=r"gpu\.total_mib is not set"):
        await make_reader(GpuConfig(backend="auto"), nvml=fake)


# --------------------------------------------------------------------------------------------
# Static, measured_mib


async def test_static_reader() -> None:
    reader = await make_reader(GpuConfig(backend="static", total_mib=12_000))
    reading = await reader.read()
    assert reading == GpuReading("static", "static (no readings)", 12_000, None, None, None)
    assert reading.ok
    assert measured_mib(reading, ["x"]) is None
    await reader.aclose()


def test_measured_mib() -> None:
    reading = GpuReading(
        "sim",
        "sim",
        1000,
        600,
        400,
        None,
        (GpuProcess(1, "ollama serve", 100), GpuProcess(2, "ollama runner", 200)),
    )
    assert measured_mib(reading, ["ollama"]) == 300
    assert measured_mib(reading, ["runner", "nothing"]) == 200
    assert measured_mib(reading, []) is None
    assert measured_mib(reading, ["comfy"]) is None
    failed = GpuReading("sim", "sim", 1000, None, None, None, reading.processes, error="x")
    assert measured_mib(failed, ["ollama"]) is None


# --------------------------------------------------------------------------------------------
# The simulated GPU, over a real loopback server

SIM_GPU = {
    "name": "sim-24g",
    "total_mib": 24_576,
    "used_mib": 5000,
    "free_mib": 19_576,
    "utilization_pct": 12,
    "peak_used_mib": 9000,
    "oom_count": 0,
    "processes": [{"pid": None, "name": "ollama", "used_mib": 5000}],
}


@dataclass
class SimServer:
    url: str
    respond: Callable[[], web.Response]
    stop: Callable[[], Awaitable[None]]


@pytest.fixture
async def sim_server() -> AsyncIterator[SimServer]:
    async def gpu(request: web.Request) -> web.Response:
        return server.respond()

    app = web.Application()
    app.router.add_get("/v1/gpu", gpu)
    running = await serve_app(app)
    server = SimServer(running.url, lambda: web.json_response(SIM_GPU), running.aclose)
    yield server
    await running.aclose()  # a second cleanup (after stop) is harmless


async def test_sim_reading(sim_server: SimServer) -> None:
    reader = await make_reader(GpuConfig(backend="sim", sim_url=sim_server.url + "/"))
    assert reader.total_mib == 24_576
    reading = await reader.read()
    assert reading == GpuReading(
        "sim", "sim-24g", 24_576, 5000, 19_576, 12, (GpuProcess(None, "ollama", 5000),)
    )
    assert measured_mib(reading, ["ollama"]) == 5000
    await reader.aclose()


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (lambda: web.Response(status=500, text="boom"), "HTTP 500"),
        (lambda: web.Response(text="{not json", content_type="application/json"), "Validation"),
        (lambda: web.json_response({"total_mib": "lots"}), "Validation"),
    ],
)
async def test_sim_bad_answers_are_failed_readings(
    sim_server: SimServer, response: Callable[[], web.Response], expected: str
) -> None:
    async with aiohttp.ClientSession() as session:
        reader = SimReader(sim_server.url, session)
        await reader.start()
        sim_server.respond = response
        reading = await reader.read()
        assert not reading.ok and reading.error is not None and expected in reading.error
        assert reading.used_mib is None and reading.total_mib == 24_576
        sim_server.respond = lambda: web.json_response(SIM_GPU)
        assert (await reader.read()).ok  # recovers
        await reader.aclose()
        assert not session.closed  # a session passed in belongs to the caller


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback port bound (so no one else takes it) but never listening: connections to it
    are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_sim_connection_refused(sim_server: SimServer) -> None:
    reader = SimReader(sim_server.url)
    await reader.start()
    await sim_server.stop()  # the simulated GPU went away
    reading = await reader.read()
    assert not reading.ok and reading.error is not None
    assert "ClientConnectorError" in reading.error
    assert reading.total_mib == 24_576
    await reader.aclose()


async def test_make_reader_sim_unreachable(refused_url: str) -> None:
    with pytest.raises(GpuInitError, match="simulated GPU"):
        await make_reader(GpuConfig(backend="sim", sim_url=refused_url))
