"""Background liveness probes, one task per consumer; they never take the lease.

The gate is strict: a job for a consumer whose last probe failed gets `consumer_unreachable`
at once (retryable) and is never forwarded elsewhere. One exception: a consumer the broker
itself stopped (type `command`, unloaded) fails its probes by design; its next job starts it.
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
        state = HealthState(result.ok, result.detail, self.clock.now(), failures)
        if previous.ok is not result.ok:
            level = logging.INFO if result.ok else logging.WARNING
            log.log(
                level, "%s: health %s (%s)", name, "ok" if result.ok else "FAILED", result.detail
            )
            self._emit("health.changed", consumer=name, healthy=result.ok, detail=result.detail)
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
            raise BrokerError(
                ErrorCode.CONSUMER_UNREACHABLE,
                f"upstream {name} last probe failed: {state.detail}",
                consumer=name,
            )
