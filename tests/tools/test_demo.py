"""`make demo` as a user runs it: started as a subprocess, every printed command run against it
as printed (the broker's facade, an Ollama call, an OpenAI call, a ComfyUI round trip through
/upstream/comfyui that ends with the image's bytes), then Ctrl-C stops everything and leaves no
process behind. It runs on free ports (`--port 0`), so it passes while a `make demo` of the
shipped ports (or a broker on 8770) runs beside it: the ports its processes listen on are read
from /proc while it runs, and none is a fixed one. The test itself never binds them."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BROKER_PORT, FIXED_PORTS
from mgpumanager.registry.paths import demo_registry

ROOT = Path(__file__).resolve().parents[2]
WHISPER = re.compile(r"\s+whisper\s+(http://[\d.]+:\d+)\s")


def read_banner(proc: subprocess.Popen[str], timeout_s: float) -> list[str]:
    """Lines up to the banner's last one, read by a thread (a pipe read has no timeout)."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if line.startswith("Ctrl-C stops everything"):
            return seen
    raise AssertionError(f"demo did not come up in {timeout_s} s; printed: {seen}")


def listening_ports(pgid: int) -> set[int]:
    """The TCP ports the processes of group `pgid` listen on, from /proc (Linux)."""
    inodes: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def refused(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_make_demo_and_every_printed_command(tmp_path: Path) -> None:
    run_the_demo(tmp_path)


def run_the_demo(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is needed to run the demo's printed commands (apt-get install curl)")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "demo", "DEMO_ARGS=--port 0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        banner = read_banner(proc, timeout_s=120)
        [whisper_url] = [m.group(1) for line in banner if (m := WHISPER.match(line))]
        assert ":8770" not in "\n".join(banner)
        listening = listening_ports(proc.pid)
        assert listening, "the demo's processes listen on nothing /proc shows"
        assert not listening & FIXED_PORTS, listening
        tried = banner[banner.index("Try:") + 1 :]
        tried = tried[: tried.index("")]  # the block ends at its blank line
        commands = [line for line in tried if not line.startswith("#")]
        assert len(commands) >= 9, banner
        surfaces = ["/api/chat", "/v1/chat/completions", "/upstream/comfyui/prompt"]
        surfaces += ["/v1/audio/speech", "/v1/audio/transcriptions"]
        assert all(any(s in c for c in commands) for s in surfaces), commands
        for command in commands:
            run = subprocess.run(
                ["bash", "-c", command + " --fail-with-body --max-time 60"],
                capture_output=True,
                text=True,
                check=False,
                timeout=90,
                cwd=tmp_path,
            )
            assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
            assert run.stdout.strip(), command
            if "/metrics" in command:
                assert "mgpumanager_queue_depth" in run.stdout
            elif "/upstream/comfyui" in command:
                # prompt -> history -> the image's bytes, saved where the user ran it
                assert run.stdout.startswith("200 image/png"), run.stdout
                assert (tmp_path / "comfyui.png").read_bytes().startswith(b"\x89PNG")
            elif "/v1/audio/speech" in command:
                assert run.stdout.startswith("200 audio/wav"), run.stdout
                assert (tmp_path / "speech.wav").read_bytes().startswith(b"RIFF")
            else:
                # NDJSON for the streamed LLM answer, one JSON document otherwise
                try:
                    docs = [json.loads(run.stdout)]
                except json.JSONDecodeError:
                    docs = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
                assert docs and all(isinstance(d, dict) for d in docs), command
                assert not any("error" in d and "retryable" in d for d in docs), run.stdout
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            assert proc.stdout is not None
            proc.stdout.close()
    # make itself dies of the SIGINT it forwards (-2), or reports the demo's exit status.
    assert proc.returncode in (0, 2, 130, -signal.SIGINT), proc.returncode
    assert refused(whisper_url), "the demo left its whisper process behind"


def test_port_moves_every_piece_and_the_commands_follow(tmp_path: Path) -> None:
    from mgpumanager.registry import load_config
    from mgpumanager.tools.demo import demo_ports, relocated

    config = load_config(demo_registry())
    ports = demo_ports(config, 9000)
    assert ports == {
        "broker": 9000,
        "gpu": 9029,
        "mvoice": 9031,
        "ollama": 9032,
        "comfyui": 9033,
        "whisper": 9034,
        "speaches": 9035,
    }
    assert set(demo_ports(config, 0).values()) == {0}
    assert demo_ports(config, None)["broker"] == 8770
    urls = {name: f"http://127.0.0.1:{p}" for name, p in ports.items()}
    moved = relocated(config, urls, 9000, tmp_path)
    assert moved.listen == "127.0.0.1:9000" and moved.gpu.sim_url == urls["gpu"]
    whisper = moved.consumers["whisper"]
    assert whisper.load is not None and whisper.unload is not None
    start, stop = whisper.load.command or [], whisper.unload.command or []
    assert start[start.index("--port") + 1] == "9034"
    assert start[start.index("--ledger") + 1] == urls["gpu"]
    pidfile = str(tmp_path / "whisper.pid")
    assert start[start.index("--pidfile") + 1] == pidfile
    assert stop[stop.index("--pidfile") + 1] == pidfile
    assert all(":87" not in token and ":88" not in token for token in start + stop)


def test_the_fixed_ports_no_test_may_bind_are_the_demos_and_the_brokers(
    no_fixed_port: list[int],
) -> None:
    from mgpumanager.registry import load_config
    from mgpumanager.tools.demo import demo_ports

    shipped = demo_ports(load_config(demo_registry()), None)
    assert set(shipped.values()) == FIXED_PORTS
    assert shipped["broker"] == BROKER_PORT
    # a bind to one of them fails the test, even where the code under test catches OSError
    with socket.socket() as sock, pytest.raises(AssertionError, match="fixed port 8770"):
        sock.bind(("127.0.0.1", BROKER_PORT))
    assert no_fixed_port == [BROKER_PORT]
    no_fixed_port.clear()  # this test tried on purpose
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # port 0 is what every test binds
