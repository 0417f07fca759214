"""scripts/gpu_e2e.py, the end-to-end run on a real NVIDIA card, run here with `--fake` (the
stand-in services without CUDA, a GPU reader over their /stats) exactly as on a GPU box: the
script is exercised on every test run, so it cannot rot unseen between GPU runs."""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.slow
def test_gpu_e2e_passes_on_the_fake_gpu_and_its_checks_can_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "e2e.json"
    argv = [sys.executable, str(SCRIPTS / "gpu_e2e.py"), "--fake", "--out", str(out)]
    # A short unload timeout keeps the negative run (which waits for it) brief.
    argv += ["--unload-timeout-s", "3", "--logdir", str(tmp_path / "logs")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=50, check=False)
    assert out.exists(), proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert (proc.returncode, result["ok"], result["failures"]) == (0, True, []), proc.stderr
    main, negative = result["main"], result["negative"]
    assert main["scheduler"]["evictions"] >= 11 and not main["non_200"]
    assert main["nvml"]["samples"] > 0 and main["nvml"]["both_loaded_samples"] == 0
    assert [j["status"] for j in negative["jobs"]] == [200, 503, 507]
    assert negative["after_first_failure"]["consumers"]["a"]["residency"] == "unknown"

    # The same reports, broken, fail the script's checks.
    monkeypatch.syspath_prepend(str(SCRIPTS))
    e2e = importlib.import_module("gpu_e2e")
    cap = main["sizing"]["cap_mib"]
    assert e2e.check_main(main, cap) == [] and e2e.check_negative(negative, cap) == []
    bad_main = copy.deepcopy(main)
    bad_main["scheduler"]["evictions"] = 3
    bad_main["nvml"]["both_loaded_samples"] = 2
    assert e2e.check_main(bad_main, cap) == [
        "main: evictions 3 < 11",
        "main: both services held their models at once in 2 samples",
    ]
    bad_negative = copy.deepcopy(negative)
    bad_negative["jobs"][1] = {**negative["jobs"][1], "status": 200, "error": None}
    bad_negative["services"]["realsvc-b"]["loads"] = 1
    first, *rest = e2e.check_negative(bad_negative, cap)
    assert first == "negative: first stt answered 200 None, expected 503 eviction_failed"
    assert len(rest) == 1 and rest[0].startswith("negative: b allocated or worked: ")
