"""`procfs`: the process listening on a port and its children read from the real /proc; the
unit a process runs in read from a scratch tree of cgroup files, as systemd writes them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from mgpumanager.sim.server import serve_app
from mgpumanager.tools.procfs import ProcSystem, Unit


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="no /proc/net/tcp")
async def test_proc_finds_the_process_listening_on_a_port() -> None:
    server = await serve_app(web.Application())
    try:
        pid = await asyncio.to_thread(ProcSystem().listening_pid, server.port)
        ports = await asyncio.to_thread(ProcSystem().listening_ports)
    finally:
        await server.aclose()
    assert pid == os.getpid()
    assert server.port in ports


def test_proc_finds_children() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc on this system")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    try:
        assert child.pid in ProcSystem().descendants(os.getpid())
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/ollama.service\n", Unit("ollama.service")),
        ("0::/system.slice/docker-3f2a.scope\n", None),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/comfyui.service\n",
            Unit("comfyui.service", user=True),
        ),
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
        (
            "12:memory:/x\n1:name=systemd:/system.slice/whisper-server.service\n",
            Unit("whisper-server.service"),
        ),
        ("", None),
    ],
)
def test_unit_from_the_cgroup_systemd_gave_the_process(
    tmp_path: Path, cgroup: str, unit: Unit | None
) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(cgroup)
    assert ProcSystem(tmp_path).unit_of(42) == unit
    assert ProcSystem(tmp_path).unit_of(43) is None  # no such process: no unit, no error
