"""`check-config` on a box with several GPUs: the registry's `devices:` against the devices the
GPU reader finds (NVML, the simulated box; static `gpu.devices` is checked with the file).

A binding to an index or UUID the box does not have is refused; where no GPU can be read (a
laptop checking a file for the GPU box) the bindings are left unchecked, and it says so.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from mgpumanager.registry import Config
from mgpumanager.upstreams.devices import unknown_bindings
from mgpumanager.upstreams.gpu import GpuInitError, device_uuids, make_reader


def checks_devices(config: Config) -> bool:
    """Whether there is anything to read the GPU for: a binding, on a box that is read."""
    return config.gpu.backend != "static" and any(c.devices for c in config.consumers.values())


async def check_devices(config: Config, path: Path, out: TextIO = sys.stderr) -> bool:
    """False (after printing each problem) when a `devices:` entry names no device here."""
    if not checks_devices(config):
        return True
    try:
        reader = await make_reader(config.gpu)
    except GpuInitError as exc:
        print(f"{path}: devices: not checked, no GPU readable here ({exc})", file=out)
        return True
    try:
        if reader.backend == "static":  # `auto` fell back: nothing was read
            print(f"{path}: devices: not checked, no GPU readable here", file=out)
            return True
        problems = unknown_bindings(config, device_uuids(reader))
    finally:
        await reader.aclose()
    for line in problems:
        print(f"{path}: {line}", file=out)
    return not problems
