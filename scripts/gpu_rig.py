"""The machinery of scripts/gpu_e2e.py: the stand-in services (scripts/gpu_service.py) as
processes, the GPU as NVML (or, with --fake, the services' /stats) shows it, a thread sampling
it, the broker in front of the services, and the views of its status the report keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
try:
    import mgpumanager  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import aiohttp
import yaml

from mgpumanager.broker import Broker
from mgpumanager.daemon import Server, start_server
from mgpumanager.registry import Config, parse_config
from mgpumanager.sim.server import bind_loopback, wait_until
from mgpumanager.upstreams.gpu import GpuProcess, GpuReading

MIB = 1024 * 1024
SERVICE = Path(__file__).resolve().parent / "gpu_service.py"
FAKE_CTX_MIB = 500
MARGIN_MIB = 512  # gpu.safety_margin_mib


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


# --------------------------------------------------------------------------------------------
# Services


@dataclass
class Svc:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        return dict(get_json(self.url + "/stats"))

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""


def start_service(
    name: str, mib: int, logdir: Path, *, fake: bool, never_free: bool = False, tag: str = "main"
) -> Svc:
    """The service serves on a socket this process bound to port 0 and hands over: its port is
    known at once and cannot be taken by anyone else meanwhile."""
    argv = [sys.executable, str(SERVICE), "--name", name, "--mib", str(mib)]
    argv += ["--free-delay-s", "0.3"]
    if never_free:
        argv.append("--never-free")
    if fake:
        argv.append("--fake-cuda")
    log = logdir / f"{tag}-{name}.log"
    with bind_loopback() as sock, log.open("wb") as fh:
        fd = sock.fileno()
        proc = subprocess.Popen(
            [*argv, "--fd", str(fd)], stdout=fh, stderr=subprocess.STDOUT, pass_fds=(fd,)
        )
        port = int(sock.getsockname()[1])
    return Svc(name, port, proc, log)


async def wait_healthy(svcs: Sequence[Svc], timeout_s: float = 60.0) -> None:
    async def healthy(s: Svc) -> bool:
        if s.proc.poll() is not None:
            raise RuntimeError(f"{s.name} exited ({s.proc.returncode}): {s.log_tail()}")
        try:
            await asyncio.to_thread(get_json, s.url + "/health", 1.0)
        except OSError:
            return False
        return True

    for s in svcs:
        try:
            await wait_until(functools.partial(healthy, s), timeout_s=timeout_s, interval_s=0.1)
        except TimeoutError as exc:
            raise RuntimeError(f"{s.name} not healthy in {timeout_s} s: {s.log_tail()}") from exc


def stop_services(svcs: Sequence[Svc]) -> None:
    for s in svcs:
        if s.proc.poll() is None:
            s.proc.terminate()
    for s in svcs:
        try:
            s.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


@contextlib.asynccontextmanager
async def services(
    args: argparse.Namespace, gpu: Gpu, logdir: Path, *, tag: str, a_never_frees: bool = False
) -> AsyncIterator[dict[str, Svc]]:
    """The two services, `a` and `b`, healthy; stopped on the way out."""
    svcs = {
        "a": start_service(
            "realsvc-a", args.mib, logdir, fake=args.fake, never_free=a_never_frees, tag=tag
        ),
        "b": start_service("realsvc-b", args.mib, logdir, fake=args.fake, tag=tag),
    }
    gpu.svcs = list(svcs.values())
    try:
        await wait_healthy(gpu.svcs)
        yield svcs
    finally:
        stop_services(list(svcs.values()))


# --------------------------------------------------------------------------------------------
# GPU: NVML, or the fake (the services' /stats) for --fake


class Gpu:
    """Whole-card used MiB and per-pid MiB, the way the broker's reader reads them."""

    def __init__(self, fake: bool, index: int = 0) -> None:
        self.fake = fake
        self.svcs: list[Svc] = []
        self.device = "fake GPU"
        self.total_mib = 0
        self.memory_call = "fake"
        if fake:
            self.total_mib = 81920
            return
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.device = name.decode() if isinstance(name, bytes) else name
        self.v2 = hasattr(pynvml, "nvmlMemory_v2")
        self.total_mib = self._memory().total // MIB
        self.memory_call = "v2" if self.v2 else "v1"

    def _memory(self) -> Any:
        if self.v2:
            try:
                return self.nv.nvmlDeviceGetMemoryInfo(self.handle, version=self.nv.nvmlMemory_v2)
            except Exception:
                self.v2 = False
        return self.nv.nvmlDeviceGetMemoryInfo(self.handle)

    def used_mib(self) -> int:
        if self.fake:
            return sum(v or 0 for v in self.per_pid().values())
        return int(self._memory().used // MIB)

    def per_pid(self) -> dict[int, int | None]:
        if self.fake:
            out: dict[int, int | None] = {}
            for s in self.svcs:
                if s.proc.poll() is None:
                    with contextlib.suppress(OSError):
                        out[s.proc.pid] = FAKE_CTX_MIB + s.stats()["holds_mib"]
            return out
        procs = self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
        return {
            int(p.pid): (int(p.usedGpuMemory) // MIB if p.usedGpuMemory is not None else None)
            for p in procs
        }

    def close(self) -> None:
        if not self.fake:
            self.nv.nvmlShutdown()


class FakeReader:
    """`--fake` only: the broker's GPU reader over the fake services (GpuReader protocol)."""

    backend = "fake-nvml"

    def __init__(self, gpu: Gpu, cap_mib: int) -> None:
        self.gpu = gpu
        self._total = cap_mib

    @property
    def total_mib(self) -> int:
        return self._total

    async def read(self) -> GpuReading:
        per = await asyncio.to_thread(self.gpu.per_pid)
        names = {s.proc.pid: " ".join(map(str, s.proc.args)) for s in self.gpu.svcs}  # type: ignore[arg-type]
        used = sum(v or 0 for v in per.values())
        return GpuReading(
            backend=self.backend,
            device="fake GPU",
            total_mib=self._total,
            used_mib=used,
            free_mib=max(0, self._total - used),
            utilization_pct=None,
            processes=tuple(GpuProcess(pid, names.get(pid, "?"), mib) for pid, mib in per.items()),
        )

    async def aclose(self) -> None:
        return None


@dataclass
class Sampler:
    """A thread reading the GPU every 20 ms: peak used, and per-service peaks / overlap."""

    gpu: Gpu
    period_s: float = 0.02
    peak_used_mib: int = 0
    samples: int = 0
    errors: int = 0
    pid_peak: dict[int, int] = field(default_factory=dict)
    # samples in which both services held more than `loaded_above_mib` (both models in VRAM)
    both_loaded_samples: int = 0
    loaded_above_mib: int = 10**9
    pids: tuple[int, ...] = ()
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def reset(self, pids: tuple[int, ...], loaded_above_mib: int) -> None:
        self.peak_used_mib, self.samples, self.errors = 0, 0, 0
        self.pid_peak, self.both_loaded_samples = {}, 0
        self.pids, self.loaded_above_mib = pids, loaded_above_mib

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                used = self.gpu.used_mib()
                per = self.gpu.per_pid()
                self.samples += 1
                self.peak_used_mib = max(self.peak_used_mib, used)
                for pid in self.pids:
                    mib = per.get(pid)
                    if mib is not None:
                        self.pid_peak[pid] = max(self.pid_peak.get(pid, 0), mib)
                if self.pids and all((per.get(p) or 0) > self.loaded_above_mib for p in self.pids):
                    self.both_loaded_samples += 1
            except Exception:
                self.errors += 1
            self._stop.wait(self.period_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def view(self, svcs: Sequence[Svc], used0: int) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "errors": self.errors,
            "peak_used_mib": self.peak_used_mib,
            "peak_used_minus_before_mib": self.peak_used_mib - used0,
            "per_service_peak_mib": {s.name: self.pid_peak.get(s.proc.pid) for s in svcs},
            "both_loaded_samples": self.both_loaded_samples,
        }


async def measure_contexts(gpu: Gpu, svcs: Sequence[Svc], used0: int) -> dict[str, Any]:
    """Each service's CUDA context as NVML attributes it (per pid), before any allocation."""
    seen: dict[str, int | None] = {}

    def all_seen() -> bool:
        per = gpu.per_pid()
        seen.update({s.name: per.get(s.proc.pid) for s in svcs})
        return all(v is not None for v in seen.values())

    with contextlib.suppress(TimeoutError):  # PIDs hidden (container): estimated below
        await wait_until(all_seen, timeout_s=10, interval_s=0.1)
    used = gpu.used_mib()
    visible = all(v is not None for v in seen.values())
    if visible:
        ctx = max(int(v or 0) for v in seen.values())
    else:  # the used delta, split
        ctx = max(0, used - used0) // max(1, len(svcs))
    return {
        "pids_visible": visible,
        "per_service_mib": seen,
        "used_delta_mib": used - used0,
        "ctx_mib": ctx,
    }


def declared_mib(alloc_mib: int, ctx_mib: int) -> int:
    """What a consumer declares: its model and its context, rounded up to 64 MiB."""
    return -(-(alloc_mib + ctx_mib) // 64) * 64


# --------------------------------------------------------------------------------------------
# Broker


def make_config(
    svcs: dict[str, Svc], cap_mib: int, declared: int, unload_timeout_s: float
) -> Config:
    kinds = {"a": "tts", "b": "stt"}
    data = {
        "listen": "127.0.0.1:0",
        "gpu": {"backend": "nvml", "total_mib": cap_mib, "safety_margin_mib": MARGIN_MIB},
        "routing": {"tts": "a", "stt": "b"},
        "consumers": {
            key: {
                "type": "generic",
                "url": svc.url,
                "health": {"interval_s": 0.5, "timeout_s": 2},
                "vram_resident_mib": declared,
                "unload": {"path": "/unload"},
                "load": {"path": "/load"},
                "paths": {kinds[key]: {"path": "/work"}},
                "gpu_processes": [svc.name],
                "unload_timeout_s": unload_timeout_s,
            }
            for key, svc in svcs.items()
        },
    }
    return parse_config(yaml.safe_dump(data), "<gpu_e2e>")


@contextlib.asynccontextmanager
async def running_broker(config: Config, gpu: Gpu, fake: bool) -> AsyncIterator[Server]:
    """The broker on port 0, once its status shows every consumer healthy; stopped after."""
    reader = FakeReader(gpu, config.gpu.total_mib or 0) if fake else None
    server = await start_server(Broker(config, reader=reader), port=0)
    try:
        async with aiohttp.ClientSession() as http:

            async def all_healthy() -> bool:
                st = await status(http, server.url)
                return all(c["healthy"] for c in st["consumers"].values())

            await wait_until(all_healthy, timeout_s=20, interval_s=0.1, what="healthy consumers")
        yield server
    finally:
        await server.stop()


async def job(http: aiohttp.ClientSession, base: str, kind: str) -> dict[str, Any]:
    started = time.monotonic()
    async with http.post(f"{base}/v1/{kind}", json={"text": "hello"}) as resp:
        body = await resp.text()
        out: dict[str, Any] = {"kind": kind, "status": resp.status}
    out["ms"] = round((time.monotonic() - started) * 1000, 1)
    try:
        data = json.loads(body)
        if resp.status == 200:
            out["was_loaded"] = data.get("loaded")
        else:
            out["error"] = data.get("error")
            out["message"] = str(data.get("message", ""))[:300]
    except ValueError:
        out["body"] = body[:200]
    return out


def brief(j: dict[str, Any]) -> str:
    """One job as `kind status ms` (`lazy` when the service had to load on the job itself)."""
    lazy = " lazy" if j.get("was_loaded") is False else ""
    return f"{j['kind']} {j['status']} {j['ms']:.0f}ms{lazy}"


async def status(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(base + "/v1/status") as resp:
        return dict(await resp.json())


def consumers_view(st: dict[str, Any]) -> dict[str, Any]:
    keys = ("residency", "vram_declared_mib", "vram_measured_mib", "last_unload_s", "last_load_s")
    return {n: {k: c[k] for k in keys} for n, c in st["consumers"].items()}


def sched_view(st: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "total_jobs",
        "completed",
        "failed",
        "handoffs",
        "swaps",
        "evictions",
        "eviction_failures",
        "load_failures",
    )
    return {k: st["scheduler"][k] for k in keys}


def gpu_view(st: dict[str, Any]) -> dict[str, Any]:
    keys = ("backend", "device", "total_mib", "used_mib", "free_mib", "headroom_mib")
    return {k: st["gpu"][k] for k in keys}


def svc_view(s: Svc) -> dict[str, Any]:
    st = s.stats()
    keep = (
        "pid",
        "loaded",
        "holds_mib",
        "oom_count",
        "errors",
        "loads",
        "lazy_loads",
        "unloads",
        "frees",
        "works",
        "reloads_while_freeing",
    )
    out = {k: st[k] for k in keep}
    out["load_s_max"] = max(st["load_s"], default=None)
    return out


def decisions_view(server: Server, last: int = 3) -> list[dict[str, Any]]:
    return [
        {
            "target": d.target,
            "need_mib": d.need_mib,
            "headroom_mib": d.headroom_mib,
            "victims": list(d.victims),
        }
        for d in server.broker.residency.decisions[-last:]
    ]
