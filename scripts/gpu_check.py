#!/usr/bin/env python3
"""Check the NVML reader against a real NVIDIA GPU: `python scripts/gpu_check.py [--index N]`.

1. `make_reader(GpuConfig(backend="auto"))` must pick nvml.
2. A reading (device, total/used/free, utilisation, processes) is printed as JSON.
3. ~1 GiB is allocated on the GPU (torch, else cupy, else the CUDA driver through ctypes, or
   the one `--allocator` names; skipped when none is there); the used figure must rise by
   about that much.
   Whether this process shows up among the GPU's processes, with its usage, is reported
   (in a container without the host's PID namespace it may not: that is reported, not failed).
4. The memory is freed; the used figure must drop again within 5 s (polled, no fixed sleep).

Prints one JSON object per step and a summary; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

# CUDA numbers devices fastest first; NVML by PCI bus. Make them agree.
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

try:
    import mgpumanager  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mgpumanager.registry import GpuConfig
from mgpumanager.sim.server import wait_until
from mgpumanager.upstreams.gpu import GpuReading, NvmlReader, make_reader

ALLOC_MIB = 1024
MIB = 1024 * 1024
DEADLINE_S = 5.0

failures: list[str] = []


def emit(step: str, **data: object) -> None:
    print(json.dumps({"step": step, **data}, default=str), flush=True)


def check(condition: bool, what: str) -> bool:
    if not condition:
        failures.append(what)
        emit("FAIL", what=what)
    return condition


def summary(reading: GpuReading) -> dict[str, object]:
    return asdict(reading)


def allocate(index: int, allocator: str) -> tuple[str, Callable[[], None]] | None:
    """Allocate ALLOC_MIB on the GPU; (how, free) or None when nothing can allocate."""
    n = ALLOC_MIB * MIB
    if allocator in ("auto", "torch"):
        try:
            torch = importlib.import_module("torch")
            if torch.cuda.is_available():
                held = [torch.ones(n, dtype=torch.uint8, device=f"cuda:{index}")]
                torch.cuda.synchronize()

                def free_torch() -> None:
                    held.clear()
                    torch.cuda.empty_cache()  # hand the cached block back to the driver
                    torch.cuda.synchronize()

                return "torch", free_torch
        except ImportError:
            pass
    if allocator in ("auto", "cupy"):
        try:
            cupy = importlib.import_module("cupy")
            with cupy.cuda.Device(index):
                held_cp = [cupy.ones(n, dtype=cupy.uint8)]
                cupy.cuda.Device(index).synchronize()

            def free_cupy() -> None:
                held_cp.clear()
                cupy.get_default_memory_pool().free_all_blocks()

            return "cupy", free_cupy
        except ImportError:
            pass
    if allocator not in ("auto", "cuda"):
        return None
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None

    def ok(rc: int, call: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{call} failed with CUDA error {rc}")

    dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    ok(cuda.cuInit(0), "cuInit")
    ok(cuda.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    ok(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    ok(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    ok(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(n)), "cuMemAlloc")
    ok(cuda.cuMemsetD8_v2(ptr, ctypes.c_ubyte(1), ctypes.c_size_t(n)), "cuMemsetD8")
    ok(cuda.cuCtxSynchronize(), "cuCtxSynchronize")

    def free_driver() -> None:
        ok(cuda.cuMemFree_v2(ptr), "cuMemFree")
        ok(cuda.cuCtxSynchronize(), "cuCtxSynchronize")

    return "cuda driver (ctypes)", free_driver


async def poll(
    read: Callable[[], Awaitable[GpuReading]], done: Callable[[GpuReading], bool]
) -> GpuReading:
    """Read until `done` or the deadline; the last reading either way."""
    last: list[GpuReading] = []

    async def reached() -> bool:
        last[:] = [await read()]
        return last[0].ok and done(last[0])

    with contextlib.suppress(TimeoutError):  # the caller checks the last reading
        await wait_until(reached, timeout_s=DEADLINE_S, interval_s=0.1)
    return last[0]


async def main(index: int, allocator: str) -> int:
    auto = await make_reader(GpuConfig(backend="auto", index=index))
    emit("auto", backend=auto.backend, total_mib=auto.total_mib)
    check(isinstance(auto, NvmlReader), f"backend auto picked {auto.backend!r}, not nvml")
    await auto.aclose()

    reader = NvmlReader(index)
    await reader.start()
    try:
        before = await reader.read()
        emit("reading", **summary(before))
        if not check(before.ok, f"first reading failed: {before.error}"):
            return 1
        used0, free0 = before.used_mib or 0, before.free_mib or 0
        check(before.total_mib > 0, "total is 0")
        check(used0 + free0 <= before.total_mib, "used + free exceeds total")
        allocated = allocate(index, allocator)
        if allocated is None:
            emit("allocate", skipped=f"no allocator available ({allocator})")
            return 1 if failures else 0
        how, free = allocated
        want_mib = int(ALLOC_MIB * 0.9)
        after = await poll(reader.read, lambda r: (r.used_mib or 0) - used0 >= want_mib)
        used1 = after.used_mib or 0
        delta = used1 - used0
        mine = [p for p in after.processes if p.pid == os.getpid()]
        emit(
            "allocated",
            how=how,
            alloc_mib=ALLOC_MIB,
            used_delta_mib=delta,
            free_delta_mib=(after.free_mib or 0) - free0,
            own_pid=os.getpid(),
            own_pid_seen=bool(mine),
            own_used_mib=[p.used_mib for p in mine],
            reading=summary(after),
        )
        check(after.ok, f"reading after allocation failed: {after.error}")
        check(delta >= want_mib, f"used rose by {delta} MiB, expected >= {want_mib}")
        if mine and mine[0].used_mib is not None:
            check(mine[0].used_mib >= want_mib, f"own process shows {mine[0].used_mib} MiB")
        free()
        released = await poll(reader.read, lambda r: (r.used_mib or 0) <= used1 - want_mib)
        emit(
            "freed",
            used_delta_mib=(released.used_mib or 0) - used1,
            reading=summary(released),
        )
        check(
            released.ok and (released.used_mib or 0) <= used1 - want_mib,
            f"used did not drop by {want_mib} MiB within {DEADLINE_S} s after freeing",
        )
    finally:
        await reader.aclose()
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, default=0, help="NVML device index")
    parser.add_argument(
        "--allocator",
        choices=("auto", "torch", "cupy", "cuda"),
        default="auto",
        help="what allocates the test memory (auto: torch, else cupy, else libcuda)",
    )
    args = parser.parse_args()
    try:
        rc = asyncio.run(main(args.index, args.allocator))
    except Exception as exc:  # any crash is a failure, with its reason on one line
        failures.append(f"{type(exc).__name__}: {exc}")
        emit("FAIL", what=failures[-1])
        rc = 1
    emit("summary", ok=rc == 0, failures=failures)
    sys.exit(rc)
