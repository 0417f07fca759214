"""`mgpumanager init` on a box without NVML: `--total-mib N` writes `backend: static` with the
card's size (never `sim` unless asked), its report says nothing of memory it did not read; and
a service that computes on the CPU (or MPS) is flagged and gets no VRAM figure from its own
memory figures (a CPU ComfyUI reports the host's RAM)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from test_proposal import FakeSystem

from conftest import Upstream
from mgpumanager.cli import main as cli_main
from mgpumanager.registry import load_config
from mgpumanager.sim.single import serve_one
from mgpumanager.tools.discover import Target
from mgpumanager.tools.init import run_init

MIB = 1024 * 1024


def sim_args(service: str) -> argparse.Namespace:
    return argparse.Namespace(
        service=service, port=0, host="127.0.0.1", total_mib=24576, gpu=None, model=[],
        instant=True,
    )  # fmt: skip


def target(url: str) -> Target:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return Target(host, int(port))


async def cpu_comfyui(upstream: Upstream) -> None:
    """ComfyUI started with --cpu, as /system_stats answers then: the host's RAM as 'VRAM'."""

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "system": {
                    "os": "posix",
                    "comfyui_version": "0.3.60",
                    "ram_total": 64 * 1024 * MIB,
                },
                "devices": [
                    {
                        "name": "cpu",
                        "type": "cpu",
                        "index": None,
                        "vram_total": 24105 * MIB,
                        "vram_free": 20000 * MIB,
                        "torch_vram_total": 24105 * MIB,
                        "torch_vram_free": 20000 * MIB,
                    }
                ],
            }
        )

    upstream.route("GET", "/system_stats", stats)
    await upstream.start()


async def test_total_mib_writes_a_static_card_and_a_cpu_service_holds_none_of_it(
    tmp_path: Path, upstream: Upstream
) -> None:
    ollama = await serve_one(sim_args("ollama"))
    await cpu_comfyui(upstream)
    out = tmp_path / "consumers.yaml"
    try:
        plan, report = await run_init(
            scan=[target(ollama.url), target(upstream.url)],
            out=out,
            total_mib=16384,
            usual_ports=(),
            system=FakeSystem({}, {}),
        )
    finally:
        await ollama.aclose()
    data = yaml.safe_load(out.read_text())
    assert data["gpu"]["backend"] == "static" and data["gpu"]["total_mib"] == 16384
    assert "sim_url" not in data["gpu"]
    config = load_config(out)  # check-config's own reading
    assert config.gpu.backend == "static" and config.gpu.total_mib == 16384
    # nothing of the card was read: no "None MiB" anywhere
    assert "None" not in report and "None MiB" not in out.read_text()
    assert "memory in use not read" in report
    [comfy] = [c for c in plan.consumers if c.service.kind.value == "comfyui"]
    assert comfy.cost.mib == 0 and "runs on CPU: holds no card memory" in comfy.cost.note
    assert data["consumers"][comfy.name]["vram_resident_mib"] == 0
    assert any("runs on CPU: holds no card memory" in line for line in plan.checks)
    assert "24105" not in out.read_text()  # the host's RAM is no VRAM figure


def test_total_mib_and_gpu_sim_together_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli_main(
        [
            "init",
            "--total-mib",
            "8192",
            "--gpu-sim",
            "http://127.0.0.1:1",
            "--no-usual-ports",
            "--out",
            str(tmp_path / "x.yaml"),
        ]
    )
    assert status == 2
    assert "--total-mib or --gpu-sim" in capsys.readouterr().err
