"""`mgpumanager status | load | unload`, run as a user runs them (the real command line in a
subprocess) against a live broker on a free port in front of the simulated GPU, and against a
broker that has stopped or refuses the token."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from conftest import SIM_MODEL, running_broker, sim_registry, sim_spec
from mgpumanager.sim.cluster import SimCluster, start_cluster
from mgpumanager.tools.remote import DEFAULT_URL, Part, bar, broker_url, memory_parts

GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}


@dataclass
class Run:
    code: int
    out: str
    err: str


async def cli(*args: str, token: str | None = None, timeout_s: float = 30) -> Run:
    env = {k: v for k, v in os.environ.items() if k != "MGPUMANAGER_TOKEN"}
    if token is not None:
        env["MGPUMANAGER_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mgpumanager.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def cluster() -> AsyncIterator[SimCluster]:
    async with await start_cluster(spec=sim_spec()) as c:
        yield c


async def test_status_names_every_consumer_and_the_last_eviction(cluster: SimCluster) -> None:
    async with running_broker(sim_registry(cluster)) as server, aiohttp.ClientSession() as s:
        for path, body in (
            ("/v1/llm", {"model": SIM_MODEL, "prompt": "hi"}),
            ("/v1/image", {"prompt": GRAPH}),
        ):
            async with s.post(server.url + path, json=body) as resp:
                assert resp.status == 200
                await resp.read()
        url = server.url
        run = await cli("status", "--url", url)
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0].startswith(f"mgpumanager 0.1.0 at {url}")
    table = lines[lines.index(next(x for x in lines if x.startswith("CONSUMER"))) :]
    for name in ("mvoice", "ollama", "comfyui"):
        assert any(row.split()[0] == name for row in table), name
    comfyui = next(row for row in table if row.startswith("comfyui"))
    assert "resident" in comfyui and "healthy" in comfyui
    # The bar: ComfyUI's memory (capitals once measured), free space, the margin at the end.
    [memory] = [x for x in lines if x.startswith("[")]
    assert "c" in memory.lower() and memory.endswith("!]")
    evictions = lines[lines.index("Last evictions:") + 1 :]
    assert evictions[0].split(" ", 3)[3].startswith("for comfyui: ollama")
    assert evictions[0].endswith("confirmed")


async def test_unload_and_load_change_the_consumer_and_say_so(cluster: SimCluster) -> None:
    async with running_broker(sim_registry(cluster)) as server:
        run = await cli("load", "mvoice", "--url", server.url)
        assert (run.code, run.out, run.err) == (0, "mvoice: resident\n", "")
        assert server.broker.residency.view.records["mvoice"].state == "resident"
        run = await cli("unload", "mvoice", "--url", server.url)
        assert (run.code, run.out, run.err) == (0, "mvoice: unloaded\n", "")
        status = server.broker.status()
        assert status.consumers["mvoice"].residency == "unloaded"
        assert cluster.gpu.held_by("mvoice") == 0
        run = await cli("unload", "nope", "--url", server.url)
        assert run.code == 1
        assert run.err == (
            "mgpumanager: no consumer named 'nope'; the consumers: mvoice, ollama, comfyui\n"
        )


async def test_a_stopped_broker_is_one_line_and_a_failure(cluster: SimCluster) -> None:
    async with running_broker(sim_registry(cluster)) as server:
        url = server.url
    for args in (("status",), ("unload", "mvoice")):
        run = await cli(*args, "--url", url)
        assert run.code == 1
        assert run.out == ""
        assert run.err == f"mgpumanager: no broker answers at {url} (connection refused)\n"


async def test_a_token_missing_or_refused_is_one_line_and_a_failure(cluster: SimCluster) -> None:
    config = sim_registry(cluster, auth={"token": "s3cret"})
    async with running_broker(config) as server:
        url = server.url
        run = await cli("status", "--url", url)
        assert (run.code, run.out) == (1, "")
        assert run.err == f"mgpumanager: the broker at {url} needs a token: set MGPUMANAGER_TOKEN\n"
        run = await cli("unload", "mvoice", "--url", url, token="wrong")
        assert (run.code, run.out) == (1, "")
        assert (
            run.err == f"mgpumanager: the broker at {url} refused the token in MGPUMANAGER_TOKEN\n"
        )
        run = await cli("status", "--url", url, token="s3cret")
        assert run.code == 0 and "mvoice" in run.out


@pytest.mark.timeout(120)
async def test_watch_redraws_until_interrupted(cluster: SimCluster) -> None:
    async with running_broker(sim_registry(cluster)) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mgpumanager.cli",
            "status",
            "--watch",
            "--interval",
            "0.1",
            "--url",
            server.url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Ctrl-C as a terminal sends it: a suite started in the background (`make test &`)
            # hands its children SIGINT ignored, and Python then raises no KeyboardInterrupt.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert proc.stdout is not None
        stdout = proc.stdout
        seen = b""
        two_pictures = asyncio.Event()

        async def read() -> None:
            # Every byte the watch prints, until the second picture has been drawn in full
            # (its closing newline): the test waits on that, not on a read racing the drawing.
            nonlocal seen
            while chunk := await stdout.read(4096):
                seen += chunk
                if seen.count(b"\x1b[H\x1b[2J") >= 3 or (
                    seen.count(b"\x1b[H\x1b[2J") == 2 and seen.endswith(b"\n")
                ):
                    two_pictures.set()
                    return

        reader = asyncio.create_task(read())
        try:
            # generous: a loaded box may take long to start the interpreter
            async with asyncio.timeout(45):
                await two_pictures.wait()
        finally:
            reader.cancel()
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode == 0, err
    assert b"comfyui" in seen


def test_the_url_comes_from_the_option_the_registry_or_the_default(tmp_path: Path) -> None:
    assert broker_url("http://box:9000/", None) == "http://box:9000"
    registry = tmp_path / "consumers.yaml"
    registry.write_text("listen: 0.0.0.0:9123\nconsumers: {}\n")
    assert broker_url(None, registry) == "http://127.0.0.1:9123"
    registry.write_text("listen: '[::1]:9124'\n")
    assert broker_url(None, registry) == "http://[::1]:9124"
    registry.write_text("consumers: {}\n")  # no listen: the broker's default
    assert broker_url(None, registry) == DEFAULT_URL


def test_the_bar_gives_every_holder_a_cell_and_keeps_its_width() -> None:
    status = {
        "gpu": {"total_mib": 24576, "used_mib": 20000, "safety_margin_mib": 512},
        "consumers": {
            "ollama": {"residency": "resident", "vram_mib": 14000, "vram_source": "measured"},
            "mvoice": {"residency": "unknown", "vram_mib": 60, "vram_source": "declared"},
            "comfyui": {"residency": "unloaded", "vram_mib": 12300, "vram_source": "declared"},
        },
    }
    parts = memory_parts(status)
    assert parts == [
        Part("ollama", 14000, "measured"),
        Part("mvoice", 60, "declared"),  # unknown counts as held: the safe side
        Part("outside", 5940, "outside"),
        Part("free", 4064, "free"),
        Part("margin", 512, "margin"),
    ]
    line = bar(parts, {"ollama": "o", "mvoice": "m"}, 50)
    assert len(line) == 50
    assert line.startswith("O" * 28) and "m" in line and line.endswith("!")
    assert line.count("m") == 1  # 60 MiB is less than a cell, but shown
