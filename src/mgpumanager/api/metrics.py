"""/metrics in Prometheus text format, read from the same Status document as /v1/status."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mgpumanager.status import Status

PREFIX = "mgpumanager"


class StatusCollector(Collector):
    def __init__(self, snapshot: Callable[[], Status]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        sched = s.scheduler
        for name, value, doc in (
            ("queue_depth", sched.queue_depth, "jobs waiting for the GPU lease"),
            ("in_flight", sched.in_flight, "jobs running under the lease"),
            ("last_wait_ms", sched.last_wait_ms, "wait of the last job granted, ms"),
            ("last_run_ms", sched.last_run_ms, "run time of the last job finished, ms"),
            ("oldest_queued_ms", sched.oldest_queued, "age of the oldest waiting job, ms"),
        ):
            if value is not None:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        jobs = CounterMetricFamily(f"{PREFIX}_jobs", "jobs by outcome", labels=["outcome"])
        jobs.add_metric(["submitted"], sched.total_jobs)
        for outcome in ("completed", "upstream_error", "failed", "cancelled", "timed_out"):
            jobs.add_metric([outcome], getattr(sched, outcome))
        yield jobs
        for name, doc in (
            ("swaps", "loads of a consumer that was not resident"),
            ("evictions", "confirmed unloads"),
            ("eviction_failures", "unloads the GPU reading did not confirm"),
            ("load_failures", "loads that failed or timed out"),
            ("outside_loads", "consumers found loaded outside the broker"),
            ("handoffs", "lease passed from one consumer to another"),
            ("swap_seconds", "lease time spent evicting and loading (failed tries too), s"),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=getattr(sched, name))
        gpu = s.gpu
        vram = GaugeMetricFamily(
            f"{PREFIX}_gpu_vram_mib",
            "GPU memory per device (gpu: its UUID), MiB",
            labels=["gpu", "kind"],
        )
        for d in s.gpus:
            for kind, value in (
                ("total", d.total_mib),
                ("used", d.used_mib),
                ("free", d.free_mib),
                ("headroom", d.headroom_mib),
            ):
                if value is not None:
                    vram.add_metric([d.uuid, kind], value)
        yield vram
        if gpu.utilization_pct is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_gpu_utilization_pct", "GPU utilisation", value=gpu.utilization_pct
            )
        up = GaugeMetricFamily(f"{PREFIX}_consumer_up", "last probe passed", labels=["consumer"])
        resident = GaugeMetricFamily(
            f"{PREFIX}_consumer_resident",
            "1 for the consumer's residency state",
            labels=["consumer", "state"],
        )
        queue = GaugeMetricFamily(
            f"{PREFIX}_consumer_queue_depth", "jobs waiting", labels=["consumer"]
        )
        running = GaugeMetricFamily(
            f"{PREFIX}_consumer_in_flight", "jobs running", labels=["consumer"]
        )
        vram_c = GaugeMetricFamily(
            f"{PREFIX}_consumer_vram_mib", "VRAM per consumer", labels=["consumer", "kind"]
        )
        planned = GaugeMetricFamily(
            f"{PREFIX}_consumer_vram_planned_mib",
            "the VRAM figure the planner counts per consumer, by its source",
            labels=["consumer", "source"],
        )
        for name, c in s.consumers.items():
            up.add_metric([name], 1.0 if c.healthy else 0.0)
            resident.add_metric([name, c.residency], 1.0)
            queue.add_metric([name], c.queue_depth)
            running.add_metric([name], c.in_flight)
            vram_c.add_metric([name, "declared"], c.vram_declared_mib)
            planned.add_metric([name, c.vram_source], c.vram_mib)
            if c.vram_measured_mib is not None:
                vram_c.add_metric([name, "measured"], c.vram_measured_mib)
        yield from (up, resident, queue, running, vram_c, planned)


def render(snapshot: Callable[[], Status]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(snapshot))
    return generate_latest(registry)
