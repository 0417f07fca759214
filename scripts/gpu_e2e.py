#!/usr/bin/env python3
"""End to end on a real NVIDIA card: the broker's evictions are confirmed by NVML, and the card
(capped by `gpu.total_mib`) never holds more than the cap.

    python scripts/gpu_e2e.py [--cap-mib 16384] [--mib 9000] [--unload-timeout-s 10]
                              [--out FILE] [--fake]

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
   never frees). tts loads a; the next stt must get `eviction_failed` (503) after
   --unload-timeout-s, a's residency must be `unknown`, and b must not have allocated (no load,
   no OOM, NVML shows only its context). A second stt job, within a's unload timeout, must fail
   fast with `insufficient_vram` (507) naming a's unconfirmed unload.

`--fake` runs the same flow without a GPU (services with `--fake-cuda`, a stand-in reader that
reads the services' /stats), to test the script itself (tests/test_gpu_e2e_script.py does).
Prints one JSON document; exits 1 when a check fails. The steps and their checks are here; the
services, the GPU sampler and the broker set-up are in scripts/gpu_rig.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from gpu_rig import (
    MARGIN_MIB,
    Gpu,
    Sampler,
    Svc,
    brief,
    consumers_view,
    decisions_view,
    declared_mib,
    gpu_view,
    job,
    make_config,
    measure_contexts,
    running_broker,
    sched_view,
    services,
    status,
    svc_view,
)

from mgpumanager.sim.server import wait_until

SEQUENTIAL_JOBS = 12  # alternating tts, stt, ...
BURST = ("tts", "stt", "stt", "tts", "tts", "stt", "tts", "stt")


@dataclass
class Checks:
    """The failed checks of one step, in the order they were made."""

    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return ok


def sizing(cap_mib: int, alloc_mib: int, used0: int, ctx_mib: int) -> dict[str, Any]:
    declared = declared_mib(alloc_mib, ctx_mib)
    return {
        "cap_mib": cap_mib,
        "alloc_mib": alloc_mib,
        "declared_mib": declared,
        "safety_margin_mib": MARGIN_MIB,
        "used_before_services_mib": used0,
        "both_need_mib": 2 * declared,
        "room_for_one_mib": cap_mib - MARGIN_MIB - (used0 + 2 * ctx_mib),
    }


# --------------------------------------------------------------------------------------------
# 1. The main run


async def alternate(
    http: aiohttp.ClientSession, base: str, n: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """n jobs one after another, tts and stt in turn: the jobs, and after each, how long the
    victim's unload and the target's load took (as the status reports them)."""
    jobs: list[dict[str, Any]] = []
    swaps: list[dict[str, Any]] = []
    for i in range(n):
        kind = "tts" if i % 2 == 0 else "stt"
        jobs.append(await job(http, base, kind))
        consumers = (await status(http, base))["consumers"]
        target, victim = ("a", "b") if kind == "tts" else ("b", "a")
        swaps.append(
            {
                "target": target,
                "victim_unload_s": consumers[victim]["last_unload_s"],
                "target_load_s": consumers[target]["last_load_s"],
            }
        )
    return jobs, swaps


def swap_times(swaps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    # The first job has no victim: its unload figure, if any, is not of this run's swaps.
    unload_s = [s["victim_unload_s"] for s in swaps[1:] if s["victim_unload_s"] is not None]
    load_s = [s["target_load_s"] for s in swaps if s["target_load_s"] is not None]
    return {
        "unload_confirmed": [round(x, 3) for x in unload_s],
        "load": [round(x, 3) for x in load_s],
        "unload_median": sorted(unload_s)[len(unload_s) // 2] if unload_s else None,
        "load_median": sorted(load_s)[len(load_s) // 2] if load_s else None,
    }


async def memory_settled(sampler: Sampler, svcs: Sequence[Svc], timeout_s: float = 10.0) -> None:
    """Until no service has a free pending and the sampler has read the GPU since: the last
    unload's memory is back too, and in the figures."""

    def settled() -> bool:
        return not any(s.stats()["free_pending"] for s in svcs)

    await wait_until(
        lambda: asyncio.to_thread(settled), timeout_s=timeout_s, interval_s=0.05, what="frees"
    )
    seen = sampler.samples
    await wait_until(lambda: sampler.samples > seen, timeout_s=timeout_s, what="a GPU sample")


def check_main(report: dict[str, Any], cap_mib: int) -> list[str]:
    checks = Checks()
    sc, nvml = report["scheduler"], report["nvml"]
    checks.check(not report["non_200"], "main: a job did not answer 200")
    checks.check(sc["evictions"] >= 11, f"main: evictions {sc['evictions']} < 11")
    checks.check(sc["eviction_failures"] == 0, f"main: eviction_failures {sc['eviction_failures']}")
    for s in report["services"].values():
        checks.check(s["oom_count"] == 0, f"main: {s} hit OOM")
        checks.check(not s["errors"], f"main: service errors {s['errors']}")
    checks.check(
        nvml["peak_used_minus_before_mib"] <= cap_mib,
        f"main: NVML peak {nvml['peak_used_minus_before_mib']} MiB > cap",
    )
    checks.check(
        nvml["both_loaded_samples"] == 0,
        f"main: both services held their models at once in {nvml['both_loaded_samples']} samples",
    )
    checks.check(
        nvml["samples"] > 0 and nvml["errors"] == 0,
        f"main: sampler {nvml['samples']} samples, {nvml['errors']} errors",
    )
    return checks.failures


async def main_run(
    args: argparse.Namespace, gpu: Gpu, sampler: Sampler, logdir: Path, used0: int
) -> tuple[dict[str, Any], list[str]]:
    """Step 1: the report and its failed checks."""
    report: dict[str, Any] = {}
    async with services(args, gpu, logdir, tag="main") as svcs:
        ctx = await measure_contexts(gpu, gpu.svcs, used0)
        report["contexts"] = ctx
        report["sizing"] = size = sizing(args.cap_mib, args.mib, used0, int(ctx["ctx_mib"]))
        if size["both_need_mib"] <= args.cap_mib - MARGIN_MIB or (
            size["declared_mib"] > size["room_for_one_mib"]
        ):
            failures = [f"sizing: both must not fit and one must ({size})"]
        else:
            report.update(await swap_back_and_forth(args, gpu, sampler, svcs, ctx, used0))
            failures = check_main(report, args.cap_mib)
    report["service_logs_tail"] = {s.name: s.log_tail()[-400:] for s in svcs.values() if failures}
    return report, failures


async def swap_back_and_forth(
    args: argparse.Namespace,
    gpu: Gpu,
    sampler: Sampler,
    svcs: dict[str, Svc],
    ctx: dict[str, Any],
    used0: int,
) -> dict[str, Any]:
    """The jobs of step 1 through a broker, and what they left behind."""
    config = make_config(
        svcs, args.cap_mib, declared_mib(args.mib, ctx["ctx_mib"]), args.unload_timeout_s
    )
    async with running_broker(config, gpu, args.fake) as server:
        # "holding its model": more than its context + a quarter of the allocation
        sampler.reset(tuple(s.proc.pid for s in gpu.svcs), ctx["ctx_mib"] + args.mib // 4)
        async with aiohttp.ClientSession() as http:
            st0 = await status(http, server.url)
            seq, swaps = await alternate(http, server.url, SEQUENTIAL_JOBS)
            burst = await asyncio.gather(*(job(http, server.url, k) for k in BURST))
            st = await status(http, server.url)
        await memory_settled(sampler, gpu.svcs)  # not part of the checks' timing
        return {
            "initial_residency": {n: c["residency"] for n, c in st0["consumers"].items()},
            "sequential": [brief(j) for j in seq],
            "burst": [brief(j) for j in burst],
            "non_200": [j for j in seq + burst if j["status"] != 200],
            "scheduler": sched_view(st),
            "consumers": consumers_view(st),
            "gpu_status": gpu_view(st),
            "swap_times_s": swap_times(swaps),
            "last_decisions": decisions_view(server),
            "services": {s.name: svc_view(s) for s in gpu.svcs},
            "nvml": sampler.view(gpu.svcs, used0),
        }


# --------------------------------------------------------------------------------------------
# 2. The negative run: a's unload never frees


def check_negative(report: dict[str, Any], cap_mib: int) -> list[str]:
    checks = Checks()
    first, second, third = report["jobs"]
    after_first = report["after_first_failure"]
    b = report["services"]["realsvc-b"]
    checks.check(first["status"] == 200, f"negative: tts answered {first['status']}")
    checks.check(
        second["status"] == 503 and second.get("error") == "eviction_failed",
        f"negative: first stt answered {second['status']} {second.get('error')}, "
        "expected 503 eviction_failed",
    )
    # Within a's unload_timeout_s after the failure, a counts as in the way: the next job
    # fails fast (507 insufficient_vram, retryable) instead of retrying the stuck unload.
    checks.check(
        third["status"] == 507
        and third.get("error") == "insufficient_vram"
        and "not confirmed" in str(third.get("message")),
        f"negative: second stt answered {third['status']} {third.get('error')}, "
        "expected 507 insufficient_vram naming a's unconfirmed unload",
    )
    a_state = after_first["consumers"]["a"]["residency"]
    checks.check(a_state == "unknown", f"negative: a is {a_state}, expected unknown")
    failed = after_first["scheduler"]["eviction_failures"]
    checks.check(failed == 1, f"negative: eviction_failures {failed} != 1")
    checks.check(
        report["after_second_failure"]["consumers"]["b"]["residency"] != "resident",
        "negative: b became resident",
    )
    checks.check(
        b["loads"] == 0 and b["works"] == 0 and b["holds_mib"] == 0,
        f"negative: b allocated or worked: {b}",
    )
    checks.check(b["oom_count"] == 0, f"negative: b OOM {b['oom_count']}")
    b_nvml = report["b_nvml_mib"]
    ctx_b = report["contexts"]["per_service_mib"].get("realsvc-b")
    if ctx_b is not None:
        peak, now = b_nvml["peak"] or 0, b_nvml["now"] or 0
        checks.check(
            peak <= ctx_b + 64 and now <= ctx_b + 64,
            f"negative: NVML shows b growing: context {ctx_b}, peak {peak}, now {now}",
        )
    checks.check(
        report["nvml_peak_used_minus_before_mib"] <= cap_mib, "negative: NVML peak above cap"
    )
    return checks.failures


async def negative_run(
    args: argparse.Namespace, gpu: Gpu, sampler: Sampler, logdir: Path, used0: int, ctx_mib: int
) -> tuple[dict[str, Any], list[str]]:
    """Step 2: the report and its failed checks."""
    async with services(args, gpu, logdir, tag="negative", a_never_frees=True) as svcs:
        ctx = await measure_contexts(gpu, gpu.svcs, used0)
        declared = declared_mib(args.mib, ctx_mib)
        config = make_config(svcs, args.cap_mib, declared, args.unload_timeout_s)
        b_pid = svcs["b"].proc.pid
        async with running_broker(config, gpu, args.fake) as server:
            sampler.reset((svcs["a"].proc.pid, b_pid), ctx_mib + args.mib // 4)
            async with aiohttp.ClientSession() as http:
                first = await job(http, server.url, "tts")
                second = await job(http, server.url, "stt")
                st1 = await status(http, server.url)
                third = await job(http, server.url, "stt")
                st2 = await status(http, server.url)
        report = {
            "contexts": ctx,
            "jobs": [first, second, third],
            "after_first_failure": {"scheduler": sched_view(st1), "consumers": consumers_view(st1)},
            "after_second_failure": {
                "scheduler": sched_view(st2),
                "consumers": consumers_view(st2),
            },
            "services": {s.name: svc_view(s) for s in gpu.svcs},
            "b_nvml_mib": {
                "now": gpu.per_pid().get(b_pid),
                "peak": sampler.pid_peak.get(b_pid),
                "context": ctx["per_service_mib"],
            },
            "nvml_peak_used_minus_before_mib": sampler.peak_used_mib - used0,
        }
    return report, check_negative(report, args.cap_mib)


# --------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    """Both steps; the report with `ok` and every failed check in `failures`."""
    gpu = Gpu(args.fake, args.index)
    out: dict[str, Any] = {
        "device": gpu.device,
        "device_total_mib": gpu.total_mib,
        "nvml_memory_call": gpu.memory_call,
        "fake": args.fake,
    }
    failures: list[str] = []
    sampler = Sampler(gpu)
    used0 = gpu.used_mib()
    out["used_before_services_mib"] = used0
    sampler.start()
    try:
        t0 = time.monotonic()
        out["main"], failed = await main_run(args, gpu, sampler, logdir, used0)
        out["main_s"] = round(time.monotonic() - t0, 1)
        failures += failed
        if not args.skip_negative and "contexts" in out["main"]:
            ctx_mib = int(out["main"]["contexts"]["ctx_mib"])
            t1 = time.monotonic()
            out["negative"], failed = await negative_run(args, gpu, sampler, logdir, used0, ctx_mib)
            out["negative_s"] = round(time.monotonic() - t1, 1)
            failures += failed
    except Exception as exc:  # a crash is a failure, with its reason
        traceback.print_exc()
        failures.append(f"crash: {type(exc).__name__}: {exc}")
    finally:
        sampler.stop()
        gpu.close()
    out["ok"] = not failures
    out["failures"] = failures
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-mib", type=int, default=16384, help="gpu.total_mib (the cap)")
    parser.add_argument("--mib", type=int, default=9000, help="what each service allocates")
    parser.add_argument(
        "--unload-timeout-s", type=float, default=10.0, help="the consumers' unload_timeout_s"
    )
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--logdir", help="services' logs (default: a temp folder)")
    parser.add_argument("--fake", action="store_true", help="no GPU: fake services and reader")
    parser.add_argument("--skip-negative", action="store_true")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="gpu_e2e_"))
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(run(args, logdir))
    except Exception as exc:  # Gpu() itself failed (no NVML): a failure, with its reason
        traceback.print_exc()
        result = {"ok": False, "failures": [f"crash: {type(exc).__name__}: {exc}"]}
    text = json.dumps(result, indent=1, default=str)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
