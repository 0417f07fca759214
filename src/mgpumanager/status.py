"""The `/v1/status` document, as models: one definition that the endpoint, /metrics and the
README's description share."""

from __future__ import annotations

from pydantic import BaseModel


class GpuStatus(BaseModel):
    backend: str
    device: str
    total_mib: int
    used_mib: int | None
    free_mib: int | None
    utilization_pct: int | None
    headroom_mib: int | None
    safety_margin_mib: int
    error: str | None


class ConsumerStatus(BaseModel):
    type: str
    url: str
    healthy: bool | None
    health_detail: str
    residency: str
    residency_detail: str
    vram_declared_mib: int
    vram_measured_mib: int | None
    last_used_s_ago: float | None
    last_unload_s: float | None
    last_load_s: float | None
    pinned: bool
    busy_outside: bool
    priority: int
    max_concurrency: int
    queue_depth: int
    in_flight: int


class SchedulerStatus(BaseModel):
    policy: str
    queue_depth: int
    in_flight: int
    total_jobs: int
    last_wait_ms: float | None
    last_run_ms: float | None
    oldest_queued: float | None
    holder: str | None
    accepting: bool
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    handoffs: int
    swaps: int
    swap_seconds: float
    evictions: int
    eviction_failures: int
    load_failures: int


class Status(BaseModel):
    version: str
    uptime_s: float
    gpu: GpuStatus
    scheduler: SchedulerStatus
    consumers: dict[str, ConsumerStatus]
    routing: dict[str, str]
