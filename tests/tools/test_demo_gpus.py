"""`mgpumanager demo --gpus 2` on free ports: two simulated cards, the chat model on the first
and images on the second run side by side, `/v1/status` lists both cards, no card runs out."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from test_demo import read_banner

BROKER = re.compile(r"\s+broker\s+(http://[\d.]+:\d+)\s")
GPU = re.compile(r"\s+sim GPU\s+(http://[\d.]+:\d+)/v1/gpu\s")


def call(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_with_two_gpus() -> None:
    exe = Path(sys.executable).parent / "mgpumanager"
    proc = subprocess.Popen(
        [str(exe), "demo", "--port", "0", "--gpus", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        lines = read_banner(proc, timeout_s=60)
        [base] = [m.group(1) for line in lines if (m := BROKER.match(line))]
        [gpu] = [m.group(1) for line in lines if (m := GPU.match(line))]
        llm = {"model": "qwen2.5:14b", "prompt": "hi", "stream": False}
        image = {"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}}
        with ThreadPoolExecutor(2) as pool:
            answers = list(
                pool.map(
                    lambda kb: call(f"{base}/v1/{kb[0]}", kb[1]), [("llm", llm), ("image", image)]
                )
            )
        assert all("error" not in a for a in answers), answers
        status = call(f"{base}/v1/status")
        assert len(status["gpus"]) == 2
        assert status["consumers"]["ollama"]["devices"] == [status["gpus"][0]["uuid"]]
        assert status["consumers"]["comfyui"]["devices"] == [status["gpus"][1]["uuid"]]
        # Each on its own card, neither waited for the other (under one lease the second
        # would wait out the first's run, 1.2 s for the chat, 3 s for the image).
        deadline = time.monotonic() + 30  # the image's job ends with its prompt, later
        while len(status["recent_jobs"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            status = call(f"{base}/v1/status")
        waits = [j["wait_s"] for j in status["recent_jobs"]]
        assert len(waits) == 2 and max(waits) < 1.0, status["recent_jobs"]
        cards = call(f"{gpu}/v1/gpu")["devices"]
        assert [c["oom_count"] for c in cards] == [0, 0]
        assert {p["name"] for p in cards[1]["processes"]} <= {"comfyui"}
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
