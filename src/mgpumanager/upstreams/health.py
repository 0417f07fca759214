"""Background liveness probes, one task per consumer; they never take the lease.

The gate is strict: a job for a consumer whose last probe failed gets `consumer_unreachable`
at once (retryable) and is never forwarded elsewhere. One exception: a consumer the broker
itself stopped (type `command`, unloaded) fails its probes by design; its next job starts it.

An on-demand service (one whose unload stops its process) that nothing answers for is
`stopped`, not failing: `health_state` says `ok`, `failing` or `stopped` (None: not probed
yet), and a service found stopped is one INFO line, never `health FAILED`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from mgpumanager.clock import Clock
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.events import Emit, no_emit
from mgpumanager.upstreams.adapters import ConsumerAdapter, HealthResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthState:
    ok: bool | None  # None: not probed yet
    detail: str
    checked_at: float | None
    consecutive_failures: int = 0
    stopped: bool = False  # an on-demand service whose process is not running
    answered: int | None = None  # the HTTP status its last probe got, if it got one

    @property
    def health_state(self) -> str | None:
        """`ok`, `failing` or `stopped`; None before the first probe."""
        if self.ok is None:
            return None
        return "ok" if self.ok else "stopped" if self.stopped else "failing"


class HealthMonitor:
    def __init__(
        self, adapters: Mapping[str, ConsumerAdapter], clock: Clock, *, emit: Emit = no_emit
    ) -> None:
        self.adapters = adapters
        self.clock = clock
        self._emit = emit
        self.states: dict[str, HealthState] = {
            name: HealthState(None, "not probed yet", None) for name in adapters
        }
        self._tasks: list[asyncio.Task[None]] = []
        # Probes of one consumer may overlap (the background loop and a load waiting for
        # readiness): only the verdict of the most recently *started* probe may stand.
        self._started: dict[str, int] = dict.fromkeys(adapters, 0)
        self._applied: dict[str, int] = dict.fromkeys(adapters, 0)

    async def probe(self, name: str) -> HealthState:
        adapter = self.adapters[name]
        self._started[name] += 1
        seq = self._started[name]
        try:
            result = await adapter.health()
        except Exception as exc:  # an adapter bug must not kill the monitor
            log.exception("%s: health probe raised", name)
            result = HealthResult(False, f"probe raised {type(exc).__name__}: {exc}")
        previous = self.states[name]
        if seq < self._applied[name]:
            return previous  # a newer probe already answered: this one is stale
        self._applied[name] = seq
        failures = 0 if result.ok else previous.consecutive_failures + 1
        stopped = not result.ok and result.refused and adapter.stops_process
        state = HealthState(
            result.ok, result.detail, self.clock.now(), failures, stopped, result.answered
        )
        if previous.health_state != state.health_state:
            if state.stopped:
                log.info("%s: not running (started on demand by its next job)", name)
            elif result.ok:
                log.info("%s: health ok (%s)", name, result.detail)
            else:
                log.warning("%s: health FAILED (%s)", name, result.detail)
            self._emit(
                "health.changed",
                consumer=name,
                healthy=result.ok,
                health_state=state.health_state,
                detail=result.detail,
            )
        self.states[name] = state
        return state

    async def probe_ok(self, name: str) -> bool:
        return (await self.probe(name)).ok is True

    async def probe_all(self) -> None:
        await self.probe_all_of(list(self.adapters))

    async def probe_all_of(self, names: list[str]) -> None:
        await asyncio.gather(*(self.probe(name) for name in names))

    def start(self) -> None:
        for name in self.adapters:
            self._tasks.append(asyncio.create_task(self._loop(name), name=f"health:{name}"))

    async def _loop(self, name: str) -> None:
        interval_s = self.adapters[name].config.health.interval_s
        while True:
            await asyncio.sleep(interval_s)
            await self.probe(name)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def gate(self, name: str, *, stopped_by_broker: bool = False) -> None:
        """Raise consumer_unreachable if the last probe failed."""
        state = self.states[name]
        if state.ok is False and not stopped_by_broker:
            message = (
                f"upstream {name} answers, but its health probe failed: {state.detail} "
                "(check its health.path in the registry)"
                if state.answered is not None
                else f"upstream {name} cannot be reached: {state.detail}"
            )
            raise BrokerError(ErrorCode.CONSUMER_UNREACHABLE, message, consumer=name)
