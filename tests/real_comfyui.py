"""The real ComfyUI (0.3.64, on the CPU) for the tests that check the broker and the fake
against it: found where `make real-comfyui` built it (REAL_COMFYUI_DIR, else
~/.cache/mgpumanager/real-comfyui/comfyui-a125cd8), started with `main.py --cpu` on a free
loopback port, everything it writes under a temporary folder. Where it has not been built the
tests that need it skip, saying how to build it (docs/real-comfyui.md)."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

NAME = "comfyui-a125cd8"
START_TIMEOUT_S = 120.0  # 5-10 s on an idle machine; CI machines are busier
_colours = itertools.count(1)


def real_dir() -> Path:
    configured = os.environ.get("REAL_COMFYUI_DIR")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mgpumanager" / "real-comfyui" / NAME


def built() -> bool:
    return (real_dir() / "ready").exists()


needs_real_comfyui = pytest.mark.skipif(
    not built(),
    reason=f"the real ComfyUI is not built at {real_dir()}: run `make real-comfyui` "
    "(it needs the ComfyUI source tarball; see docs/real-comfyui.md)",
)


def graph(
    prefix: str = "real", *, size: int = 256, blur: int = 5, fresh: bool = True
) -> dict[str, Any]:
    """A prompt that needs no model weights: EmptyImage -> ImageBlur -> ImageInvert ->
    SaveImage. `fresh`: a colour no earlier prompt used, so that ComfyUI's output cache
    (an unchanged graph is not run again) does not answer it."""
    colour = next(_colours) if fresh else 0
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": colour},
        },
        "2": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": blur, "sigma": 2.0},
        },
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


def slow_graph(prefix: str = "slow") -> dict[str, Any]:
    """The same graph on a large image: its blur runs for seconds on a CPU."""
    return graph(prefix, size=2048, blur=31)


def _free_port() -> int:
    # ComfyUI binds the port itself: take a free one and hand it over (a race only with
    # another process binding the same port in between).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RealComfyUI:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/system_stats", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def running(base: Path) -> Iterator[RealComfyUI]:
    """The real ComfyUI on a free port, its folders and database under `base`."""
    root = real_dir()
    port = _free_port()
    log = base / "comfyui.log"
    for folder in ("custom_nodes", "models", "input", "output", "temp", "user"):
        (base / folder).mkdir(exist_ok=True)  # it lists some before it would create them
    args = [
        str(root / "venv" / "bin" / "python"),
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
        "--disable-auto-launch",
        "--disable-all-custom-nodes",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=root / "ComfyUI", stdout=out, stderr=subprocess.STDOUT)
    comfy = RealComfyUI(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(comfy.url):
            if process.poll() is not None:
                pytest.fail(f"the real ComfyUI exited ({process.returncode}):\n{comfy.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the real ComfyUI did not answer in {START_TIMEOUT_S:g} s")
            time.sleep(0.1)
        yield comfy
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
