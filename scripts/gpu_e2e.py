#!/usr/bin/env python3
"""End to end on a real NVIDIA card: the broker's evictions are confirmed by NVML, and the card
(capped by `gpu.total_mib`) never holds more than the cap.

    python scripts/gpu_e2e.py [--cap-mib 16384] [--mib 9000] [--out FILE] [--fake]

Two `scripts/gpu_service.py` processes stand in for GPU inference servers (each a CUDA context,
`/load` allocates --mib MiB, `/unload` answers at once and frees 0.3 s later). The broker runs
in this process with `gpu.backend: nvml` capped at --cap-mib, two `generic` consumers `a` (tts)
and `b` (stt) that cannot both fit under the cap, and `gpu_processes` per service. A thread
samples NVML every 20 ms for the peak.

1. Main run: 12 alternating jobs (tts, stt, ...) one after another, then 8 concurrent mixed.
   Passes when every job answered 200, evictions >= 11, eviction_failures == 0, neither service
   hit CUDA out-of-memory, the two services never held their models at the same time, and the
   NVML peak (minus what was used before the services started) stayed <= the cap.
2. Negative run: fresh services, `a` started with `--never-free` (its unload answers 200 but
   never frees). tts loads a; the next stt must get `eviction_failed` (503), a's residency must
   be `unknown`, and b must not have allocated (no load, no OOM, NVML shows only its context).
   A second stt job must fail the same way (unknown memory counts as taken).

`--fake` runs the same flow without a GPU (services with `--fake-cuda`, a stand-in reader that
reads the services' /stats), to test the script itself. Prints one JSON document; exits 1 when
a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
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

from mgpumanager.app import Server, start_server
from mgpumanager.broker import Broker
from mgpumanager.config import Config, parse_config
from mgpumanager.gpu import GpuProcess, GpuReading

MIB = 1024 * 1024
SERVICE = Path(__file__).resolve().parent / "gpu_service.py"
FAKE_CTX_MIB = 500
failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    if not ok:
        failures.append(what)
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = free_port()
    argv = [
        sys.executable,
        str(SERVICE),
        "--name",
        name,
        "--port",
        str(port),
        "--mib",
        str(mib),
        "--free-delay-s",
        "0.3",
    ]
    if never_free:
        argv.append("--never-free")
    if fake:
        argv.append("--fake-cuda")
    log = logdir / f"{tag}-{name}.log"
    fh = log.open("wb")
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    fh.close()
    return Svc(name, port, proc, log)


def wait_healthy(svcs: list[Svc], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    for s in svcs:
        while True:
            if s.proc.poll() is not None:
                raise RuntimeError(f"{s.name} exited ({s.proc.returncode}): {s.log_tail()}")
            try:
                get_json(s.url + "/health", timeout=1.0)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{s.name} not healthy in {timeout_s} s: {s.log_tail()}"
                    ) from exc
                time.sleep(0.1)


def stop_services(svcs: list[Svc]) -> None:
    for s in svcs:
        if s.proc.poll() is None:
            s.proc.terminate()
    for s in svcs:
        try:
            s.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


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


# --------------------------------------------------------------------------------------------
# Broker


def make_config(
    svcs: dict[str, Svc], cap_mib: int, declared_mib: int, unload_timeout_s: float
) -> Config:
    kinds = {"a": "tts", "b": "stt"}
    data = {
        "listen": "127.0.0.1:0",
        "gpu": {"backend": "nvml", "total_mib": cap_mib, "safety_margin_mib": 512},
        "routing": {"tts": "a", "stt": "b"},
        "consumers": {
            key: {
                "type": "generic",
                "url": svc.url,
                "health": {"interval_s": 0.5, "timeout_s": 2},
                "vram_resident_mib": declared_mib,
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


async def start_broker(config: Config, gpu: Gpu, fake: bool) -> Server:
    reader = FakeReader(gpu, config.gpu.total_mib or 0) if fake else None
    server = await start_server(Broker(config, reader=reader), port=0)
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(server.url + "/v1/status") as resp:
                st = await resp.json()
            if all(c["healthy"] for c in st["consumers"].values()):
                return server
            if time.monotonic() > deadline:
                raise RuntimeError(f"consumers not healthy: {st['consumers']}")
            await asyncio.sleep(0.1)


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


# --------------------------------------------------------------------------------------------


async def measure_contexts(gpu: Gpu, svcs: list[Svc], used0: int) -> dict[str, Any]:
    """Each service's CUDA context as NVML attributes it (per pid), before any allocation."""
    deadline = time.monotonic() + 10
    while True:
        per = gpu.per_pid()
        seen = {s.name: per.get(s.proc.pid) for s in svcs}
        if all(v is not None for v in seen.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    used = gpu.used_mib()
    visible = all(v is not None for v in seen.values())
    if visible:
        ctx = max(int(v or 0) for v in seen.values())
    else:  # PIDs hidden (container): the used delta, split
        ctx = max(0, used - used0) // max(1, len(svcs))
    return {
        "pids_visible": visible,
        "per_service_mib": seen,
        "used_delta_mib": used - used0,
        "ctx_mib": ctx,
    }


async def main_run(
    args: argparse.Namespace, gpu: Gpu, sampler: Sampler, logdir: Path, used0: int
) -> dict[str, Any]:
    svcs = {
        "a": start_service("realsvc-a", args.mib, logdir, fake=args.fake),
        "b": start_service("realsvc-b", args.mib, logdir, fake=args.fake),
    }
    gpu.svcs = list(svcs.values())
    server: Server | None = None
    report: dict[str, Any] = {}
    try:
        wait_healthy(list(svcs.values()))
        ctx = await measure_contexts(gpu, list(svcs.values()), used0)
        report["contexts"] = ctx
        ctx_mib = int(ctx["ctx_mib"])
        declared = -(-(args.mib + ctx_mib) // 64) * 64  # models + context, rounded up
        margin = 512
        room_for_one = args.cap_mib - margin - (used0 + 2 * ctx_mib)
        report["sizing"] = {
            "cap_mib": args.cap_mib,
            "alloc_mib": args.mib,
            "declared_mib": declared,
            "safety_margin_mib": margin,
            "used_before_services_mib": used0,
            "both_need_mib": 2 * declared,
            "room_for_one_mib": room_for_one,
        }
        if not check(
            2 * declared > args.cap_mib - margin and declared <= room_for_one,
            f"sizing: both must not fit and one must ({report['sizing']})",
        ):
            return report
        config = make_config(svcs, args.cap_mib, declared, unload_timeout_s=10)
        server = await start_broker(config, gpu, args.fake)
        pids = tuple(s.proc.pid for s in svcs.values())
        # "holding its model": more than its context + a quarter of the allocation
        sampler.reset(pids, ctx_mib + args.mib // 4)
        base = server.url
        async with aiohttp.ClientSession() as http:
            st0 = await status(http, base)
            report["initial_residency"] = {n: c["residency"] for n, c in st0["consumers"].items()}
            seq: list[dict[str, Any]] = []
            swaps: list[dict[str, Any]] = []
            for i in range(12):
                kind = "tts" if i % 2 == 0 else "stt"
                seq.append(await job(http, base, kind))
                st = await status(http, base)
                target, victim = ("a", "b") if kind == "tts" else ("b", "a")
                swaps.append(
                    {
                        "target": target,
                        "victim_unload_s": st["consumers"][victim]["last_unload_s"],
                        "target_load_s": st["consumers"][target]["last_load_s"],
                    }
                )
            kinds = ["tts", "stt", "stt", "tts", "tts", "stt", "tts", "stt"]
            burst = await asyncio.gather(*(job(http, base, k) for k in kinds))
            st = await status(http, base)
        # the last freed memory must come back too (not part of the checks' timing)
        await asyncio.sleep(0.6)
        sampler_view: dict[str, Any] = {
            "samples": sampler.samples,
            "errors": sampler.errors,
            "peak_used_mib": sampler.peak_used_mib,
            "peak_used_minus_before_mib": sampler.peak_used_mib - used0,
            "per_service_peak_mib": {
                s.name: sampler.pid_peak.get(s.proc.pid) for s in svcs.values()
            },
            "both_loaded_samples": sampler.both_loaded_samples,
        }
        decisions = [
            {
                "target": d.target,
                "need_mib": d.need_mib,
                "headroom_mib": d.headroom_mib,
                "victims": list(d.victims),
            }
            for d in server.broker.residency.decisions[-3:]
        ]
        unload_s = [s["victim_unload_s"] for s in swaps[1:] if s["victim_unload_s"] is not None]
        load_s = [s["target_load_s"] for s in swaps if s["target_load_s"] is not None]
        report.update(
            {
                "sequential": [brief(j) for j in seq],
                "burst": [brief(j) for j in burst],
                "non_200": [j for j in seq + burst if j["status"] != 200],
                "scheduler": sched_view(st),
                "consumers": consumers_view(st),
                "gpu_status": {
                    k: st["gpu"][k]
                    for k in (
                        "backend",
                        "device",
                        "total_mib",
                        "used_mib",
                        "free_mib",
                        "headroom_mib",
                    )
                },
                "swap_times_s": {
                    "unload_confirmed": [round(x, 3) for x in unload_s],
                    "load": [round(x, 3) for x in load_s],
                    "unload_median": sorted(unload_s)[len(unload_s) // 2] if unload_s else None,
                    "load_median": sorted(load_s)[len(load_s) // 2] if load_s else None,
                },
                "last_decisions": decisions,
                "services": {s.name: svc_view(s) for s in svcs.values()},
                "nvml": sampler_view,
            }
        )
        sc = report["scheduler"]
        check(all(j["status"] == 200 for j in seq + burst), "main: a job did not answer 200")
        check(sc["evictions"] >= 11, f"main: evictions {sc['evictions']} < 11")
        check(sc["eviction_failures"] == 0, f"main: eviction_failures {sc['eviction_failures']}")
        for s in report["services"].values():
            check(s["oom_count"] == 0, f"main: {s} hit OOM")
            check(not s["errors"], f"main: service errors {s['errors']}")
        check(
            sampler_view["peak_used_minus_before_mib"] <= args.cap_mib,
            f"main: NVML peak {sampler_view['peak_used_minus_before_mib']} MiB > cap",
        )
        check(
            sampler_view["both_loaded_samples"] == 0,
            f"main: both services held their models at once in "
            f"{sampler_view['both_loaded_samples']} samples",
        )
        check(
            sampler_view["samples"] > 0 and sampler_view["errors"] == 0,
            f"main: sampler {sampler_view['samples']} samples, {sampler_view['errors']} errors",
        )
        return report
    finally:
        if server is not None:
            await server.stop()
        stop_services(list(svcs.values()))
        report["service_logs_tail"] = {
            s.name: s.log_tail()[-400:] for s in svcs.values() if failures
        }


async def negative_run(
    args: argparse.Namespace, gpu: Gpu, sampler: Sampler, logdir: Path, used0: int, ctx_mib: int
) -> dict[str, Any]:
    svcs = {
        "a": start_service(
            "realsvc-a", args.mib, logdir, fake=args.fake, never_free=True, tag="negative"
        ),
        "b": start_service("realsvc-b", args.mib, logdir, fake=args.fake, tag="negative"),
    }
    gpu.svcs = list(svcs.values())
    server: Server | None = None
    report: dict[str, Any] = {}
    try:
        wait_healthy(list(svcs.values()))
        ctx = await measure_contexts(gpu, list(svcs.values()), used0)
        declared = -(-(args.mib + ctx_mib) // 64) * 64
        config = make_config(svcs, args.cap_mib, declared, unload_timeout_s=10)
        server = await start_broker(config, gpu, args.fake)
        b_pid = svcs["b"].proc.pid
        sampler.reset((svcs["a"].proc.pid, b_pid), ctx_mib + args.mib // 4)
        base = server.url
        async with aiohttp.ClientSession() as http:
            first = await job(http, base, "tts")
            second = await job(http, base, "stt")
            st1 = await status(http, base)
            third = await job(http, base, "stt")
            st2 = await status(http, base)
        b_now = gpu.per_pid().get(b_pid)
        b_peak = sampler.pid_peak.get(b_pid)
        report.update(
            {
                "contexts": ctx,
                "jobs": [first, second, third],
                "after_first_failure": {
                    "scheduler": sched_view(st1),
                    "consumers": consumers_view(st1),
                },
                "after_second_failure": {
                    "scheduler": sched_view(st2),
                    "consumers": consumers_view(st2),
                },
                "services": {s.name: svc_view(s) for s in svcs.values()},
                "b_nvml_mib": {"now": b_now, "peak": b_peak, "context": ctx["per_service_mib"]},
                "nvml_peak_used_minus_before_mib": sampler.peak_used_mib - used0,
            }
        )
        b = report["services"]["realsvc-b"]
        check(first["status"] == 200, f"negative: tts answered {first['status']}")
        check(
            second["status"] == 503 and second.get("error") == "eviction_failed",
            f"negative: first stt answered {second['status']} {second.get('error')}, "
            "expected 503 eviction_failed",
        )
        # Within a's unload_timeout_s after the failure, a counts as in the way: the next job
        # fails fast (507 insufficient_vram, retryable) instead of retrying the stuck unload.
        check(
            third["status"] == 507
            and third.get("error") == "insufficient_vram"
            and "not confirmed" in str(third.get("message")),
            f"negative: second stt answered {third['status']} {third.get('error')}, "
            "expected 507 insufficient_vram naming a's unconfirmed unload",
        )
        check(
            st1["consumers"]["a"]["residency"] == "unknown",
            f"negative: a is {st1['consumers']['a']['residency']}, expected unknown",
        )
        check(
            st1["scheduler"]["eviction_failures"] == 1,
            f"negative: eviction_failures {st1['scheduler']['eviction_failures']} != 1",
        )
        check(st2["consumers"]["b"]["residency"] != "resident", "negative: b became resident")
        check(
            b["loads"] == 0 and b["works"] == 0 and b["holds_mib"] == 0,
            f"negative: b allocated or worked: {b}",
        )
        check(b["oom_count"] == 0, f"negative: b OOM {b['oom_count']}")
        ctx_b = ctx["per_service_mib"].get("realsvc-b")
        if ctx_b is not None:
            check(
                (b_peak or 0) <= ctx_b + 64 and (b_now or 0) <= ctx_b + 64,
                f"negative: NVML shows b growing: context {ctx_b}, peak {b_peak}, now {b_now}",
            )
        check(
            report["nvml_peak_used_minus_before_mib"] <= args.cap_mib,
            "negative: NVML peak above cap",
        )
        return report
    finally:
        if server is not None:
            await server.stop()
        stop_services(list(svcs.values()))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    gpu = Gpu(args.fake, args.index)
    out: dict[str, Any] = {
        "device": gpu.device,
        "device_total_mib": gpu.total_mib,
        "nvml_memory_call": gpu.memory_call,
        "fake": args.fake,
    }
    sampler = Sampler(gpu)
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="gpu_e2e_"))
    os.makedirs(logdir, exist_ok=True)
    used0 = gpu.used_mib()
    out["used_before_services_mib"] = used0
    sampler.start()
    t0 = time.monotonic()
    try:
        out["main"] = await main_run(args, gpu, sampler, logdir, used0)
        out["main_s"] = round(time.monotonic() - t0, 1)
        if not args.skip_negative and "contexts" in out["main"]:
            ctx_mib = int(out["main"]["contexts"]["ctx_mib"])
            t1 = time.monotonic()
            out["negative"] = await negative_run(args, gpu, sampler, logdir, used0, ctx_mib)
            out["negative_s"] = round(time.monotonic() - t1, 1)
    finally:
        sampler.stop()
        gpu.close()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-mib", type=int, default=16384, help="gpu.total_mib (the cap)")
    parser.add_argument("--mib", type=int, default=9000, help="what each service allocates")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--logdir", help="services' logs (default: a temp folder)")
    parser.add_argument("--fake", action="store_true", help="no GPU: fake services and reader")
    parser.add_argument("--skip-negative", action="store_true")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    import logging

    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = asyncio.run(main(args))
    except Exception as exc:  # a crash is a failure, with its reason
        import traceback

        traceback.print_exc()
        failures.append(f"crash: {type(exc).__name__}: {exc}")
        result = {}
    result["ok"] = not failures
    result["failures"] = failures
    text = json.dumps(result, indent=1, default=str)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    sys.exit(0 if not failures else 1)
