"""The `/v1/status` document: pydantic models (one definition that the endpoint, /metrics and
docs/endpoints.md describe) and `build_status`, which reads them from the live objects.

The models take their fields from the objects that own them (residency records, health
states, scheduler statistics, residency counters) by name; a field whose public name differs
from its owner's says so with a validation alias, instead of being copied by hand.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, BaseModel, Field

from mgpumanager import __version__
from mgpumanager.registry import redact_url
from mgpumanager.residency.device_room import device_figures, misplaced_devices

if TYPE_CHECKING:
    from mgpumanager.broker import Broker


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


class DeviceStatus(BaseModel):
    """One card of the box (a MIG instance counts as one)."""

    uuid: str
    index: int
    name: str
    total_mib: int
    used_mib: int | None
    free_mib: int | None
    headroom_mib: int
    consumers: list[str]  # bound to it (`devices:`, else every device)
    vram_mib: dict[str, int]  # what each consumer holding memory holds on it
    undeclared: list[str]  # consumers whose processes were found on it, undeclared


def _from(name: str) -> Any:
    return Field(validation_alias=AliasChoices(name))


class ConsumerStatus(BaseModel):
    type: str
    url: str
    healthy: bool | None = _from("ok")
    # ok, failing, or stopped (an on-demand service not running; its next job starts it);
    # None: not probed yet
    health_state: str | None
    health_detail: str
    residency: str = _from("state")
    residency_detail: str = _from("detail")
    # The one figure the planner counts it at (when it holds memory), and where it comes
    # from: measured, reported or declared; the dashboard, `status` and /metrics show it.
    vram_mib: int
    vram_source: str
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
    resident_models: list[str]  # per-model consumers (Ollama, speaches); [] for the others
    front_door: str | None  # where its front door listens, if it has one
    devices: list[str] = []  # the UUIDs of the GPUs it is bound to
    # GPUs its processes were found on that it did not declare (reported, never accepted).
    undeclared_devices: list[str] = []


WAITING_SHOWN = 100  # waiting jobs listed in /v1/status (queue_depth counts every one)


class QueuedJobStatus(BaseModel):
    job: int
    consumer: str
    label: str  # what the job is: its route (and model), or `admin unload`
    priority: int
    age_s: float
    waited_s: float  # the same as age_s, under the name the queue's other figures use
    position: int | None  # jobs expected to start before it (0: next)
    expected_start_s: float | None  # seconds from now; None while a run time is unknown


class RunningJobStatus(BaseModel):
    job: int
    consumer: str
    label: str
    run_s: float | None


class JobStatus(BaseModel):
    """A finished job, or one that left the queue without running (run_s None)."""

    time: float  # Unix seconds
    job: int
    consumer: str
    label: str
    outcome: str  # completed (2xx/3xx), upstream_error, failed, cancelled, timed_out
    wait_s: float | None
    run_s: float | None
    status: int | None = None  # the upstream's HTTP status of an upstream_error


class EvictionStatus(BaseModel):
    """An eviction planned for `target` (None: an unload asked for), with what was known."""

    time: float  # Unix seconds
    target: str | None
    victims: list[str]
    need_mib: int | None
    headroom_mib: int | None  # when it was decided
    outcome: str  # planned (under way), confirmed, failed
    detail: str


class EventsStatus(BaseModel):
    clients: int  # /v1/events followers now
    emitted: int
    dropped_clients: int  # dropped for not reading fast enough


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
    completed: int  # the upstream answered 2xx/3xx
    upstream_error: int  # it answered 4xx/5xx
    failed: int
    cancelled: int
    timed_out: int
    handoffs: int
    swaps: int
    swap_seconds: float
    evictions: int
    eviction_failures: int
    load_failures: int
    outside_loads: int  # consumers found loaded that the broker had not loaded
    waiting: list[QueuedJobStatus]  # the oldest WAITING_SHOWN jobs, in arrival order
    running: list[RunningJobStatus]


class PrefetchStatus(BaseModel):
    """Weights read ahead for the next tenure (docs/residency.md, "Prefetch")."""

    enabled: bool
    started: int
    done: int
    cancelled: int
    bytes_read: int
    warm_loads: int  # forecast tenures that began with all of it read ahead
    cold_loads: int
    last: dict[str, Any] | None  # the one under way, or the last one


class Status(BaseModel):
    version: str
    uptime_s: float
    gpu: GpuStatus  # the box as one card: the sums over `gpus`
    gpus: list[DeviceStatus] = []  # every card
    scheduler: SchedulerStatus
    consumers: dict[str, ConsumerStatus]
    routing: dict[str, str]
    recent_jobs: list[JobStatus]  # newest first
    recent_evictions: list[EvictionStatus]  # newest first
    events: EventsStatus
    prefetch: PrefetchStatus | None = None


def build_status(broker: Broker) -> Status:
    residency = broker.residency
    reading = residency.view.last_reading
    stats = broker.lease.core.stats()
    now = broker.clock.now()
    gpu = GpuStatus(
        backend=residency.view.reader.backend,
        device=reading.device if reading else "not read yet",
        total_mib=residency.view.reader.total_mib,
        used_mib=reading.used_mib if reading else None,
        free_mib=reading.free_mib if reading else None,
        utilization_pct=reading.utilization_pct if reading else None,
        headroom_mib=residency.view.headroom_mib(reading) if reading else None,
        safety_margin_mib=broker.config.gpu.safety_margin_mib,
        error=reading.error if reading else None,
    )
    consumers = {}
    for name, c in broker.config.consumers.items():
        record = residency.view.records[name]
        health = broker.health.states[name]
        consumers[name] = ConsumerStatus.model_validate(
            {
                **c.model_dump(include={"priority", "max_concurrency"}),
                "type": str(c.type),
                "url": redact_url(c.url),  # credentials in a URL are secrets
                **dataclasses.asdict(health),
                "health_detail": health.detail,
                "health_state": health.health_state,
                **_fields(record),  # after health: its `detail` is the residency's
                "state": str(record.state),
                "vram_mib": record.cost_mib,
                "vram_source": record.cost_source,
                "last_used_s_ago": None if record.last_used is None else now - record.last_used,
                "resident_models": sorted(record.models),
                "front_door": broker.front_doors.get(name),
                "devices": sorted(residency.view.bound.get(name, ())),
                "undeclared_devices": misplaced_devices(residency.view, name, reading)
                if reading
                else [],
                **dataclasses.asdict(stats.consumers[name]),
            }
        )
    core = broker.lease.core
    waits = broker.waits.all()
    scheduler = {
        **_fields(stats),
        **dataclasses.asdict(residency.view.counters),
        "waiting": [
            QueuedJobStatus(
                job=j.id,
                consumer=j.consumer,
                label=j.label,
                priority=j.priority,
                age_s=now - j.enqueued_at,
                waited_s=now - j.enqueued_at,
                position=None if (w := waits.get(j.id)) is None else w.position,
                expected_start_s=None if w is None else w.expected_start_s,
            )
            # queue_depth counts them all; listing 10,000 would hold the event loop ~30 ms.
            for j in itertools.islice(core.waiting.values(), WAITING_SHOWN)
        ],
        "running": [
            RunningJobStatus(
                job=j.id, consumer=j.consumer, label=j.label, run_s=broker.jobs.running_s(j.id)
            )
            for j in core.running.values()
        ],
    }
    history, events = broker.history, broker.events
    return Status(
        version=__version__,
        uptime_s=now - broker.started_at,
        gpu=gpu,
        gpus=[DeviceStatus.model_validate(d) for d in device_figures(residency.view, reading)]
        if reading
        else [],
        scheduler=SchedulerStatus.model_validate(scheduler),
        consumers=consumers,
        routing=dict(broker.config.routing),
        recent_jobs=[JobStatus.model_validate(j) for j in reversed(history.jobs)],
        recent_evictions=[
            EvictionStatus.model_validate(_fields(e)) for e in reversed(history.evictions)
        ],
        events=EventsStatus(
            clients=events.subscribers, emitted=events.emitted, dropped_clients=events.dropped
        ),
        prefetch=_prefetch(broker),
    )


def _prefetch(broker: Broker) -> PrefetchStatus | None:
    prefetch = broker.prefetch
    if prefetch is None:
        return None
    last = prefetch.current
    return PrefetchStatus(
        enabled=broker.config.prefetch.enabled,
        **dataclasses.asdict(prefetch.counters),
        last=None if last is None else last.document(),
    )


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields, one level deep (asdict would deep-copy the callbacks a record
    carries)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
