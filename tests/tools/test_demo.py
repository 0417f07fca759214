"""`make demo` as a user runs it: started as a subprocess, every printed command run against it
as printed (the broker's facade, an Ollama call, an OpenAI call, a ComfyUI round trip through
/upstream/comfyui that ends with the image's bytes), then Ctrl-C stops everything and leaves no
process behind. It runs on free ports (`--port 0`), so it passes while a `make demo` of the
shipped ports runs beside it: the test holds the broker's default port itself to show that."""

from __future__ import annotations

import contextlib
import errno
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
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@contextlib.contextmanager
def default_port_taken() -> Iterator[None]:
    """The demo's default broker port busy for the test's length, as a `make demo` running
    beside it would have it (already busy, when one does)."""
    sock = socket.socket()
    try:
        try:
            sock.bind(("127.0.0.1", 8770))
            sock.listen()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        yield
    finally:
        sock.close()


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
    with default_port_taken():
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
        tried = banner[banner.index("Try:") + 1 :]
        tried = tried[: tried.index("")]  # the block ends at its blank line
        commands = [line for line in tried if not line.startswith("#")]
        assert len(commands) >= 9, banner
        surfaces = ["/api/chat", "/v1/chat/completions", "/upstream/comfyui/prompt"]
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

    config = load_config(ROOT / "config" / "demo.yaml")
    ports = demo_ports(config, 9000)
    assert ports == {
        "broker": 9000,
        "gpu": 9029,
        "mvoice": 9031,
        "ollama": 9032,
        "comfyui": 9033,
        "whisper": 9034,
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
