"""The `/v1/status` document: pydantic models (one definition that the endpoint, /metrics and
the README's description share) and `build_status`, which reads them from the live objects.

The models take their fields from the objects that own them (residency records, health
states, scheduler statistics, residency counters) by name; a field whose public name differs
from its owner's says so with a validation alias, instead of being copied by hand.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, BaseModel, Field

from . import __version__
from .config import redact_url

if TYPE_CHECKING:
    from .broker import Broker


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


def _from(name: str) -> Any:
    return Field(validation_alias=AliasChoices(name))


class ConsumerStatus(BaseModel):
    type: str
    url: str
    healthy: bool | None = _from("ok")
    health_detail: str
    residency: str = _from("state")
    residency_detail: str = _from("detail")
    vram_declared_mib: int = _from("declared_mib")
    vram_measured_mib: int | None = _from("measured_mib")
    last_used_s_ago: float | None
    last_unload_s: float | None
    last_load_s: float | None
    pinned: bool
    busy_outside: bool
    priority: int
    max_concurrency: int
    queue_depth: int
    in_flight: int
    front_door: str | None


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


def build_status(broker: Broker) -> Status:
    residency = broker.residency
    reading = residency.last_reading
    stats = broker.lease.core.stats()
    now = broker.clock.now()
    gpu = GpuStatus(
        backend=residency.reader.backend,
        device=reading.device if reading else "not read yet",
        total_mib=residency.reader.total_mib,
        used_mib=reading.used_mib if reading else None,
        free_mib=reading.free_mib if reading else None,
        utilization_pct=reading.utilization_pct if reading else None,
        headroom_mib=residency.headroom_mib(reading) if reading else None,
        safety_margin_mib=broker.config.gpu.safety_margin_mib,
        error=reading.error if reading else None,
    )
    consumers = {}
    for name, c in broker.config.consumers.items():
        record = residency.records[name]
        health = broker.health.states[name]
        consumers[name] = ConsumerStatus.model_validate(
            {
                **c.model_dump(include={"priority", "max_concurrency"}),
                "type": str(c.type),
                "url": redact_url(c.url),  # credentials in a URL are secrets
                **dataclasses.asdict(health),
                "health_detail": health.detail,
                **dataclasses.asdict(record),  # after health: its `detail` is the residency's
                "state": str(record.state),
                "last_used_s_ago": None if record.last_used is None else now - record.last_used,
                "front_door": broker.front_doors.get(name),
                **dataclasses.asdict(stats.consumers[name]),
            }
        )
    scheduler = {
        **{f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)},
        **dataclasses.asdict(residency.counters),
    }
    return Status(
        version=__version__,
        uptime_s=now - broker.started_at,
        gpu=gpu,
        scheduler=SchedulerStatus.model_validate(scheduler),
        consumers=consumers,
        routing=dict(broker.config.routing),
    )
