"""Idle unload and warm restore: what the broker does with the card while nobody asks.

- **Idle unload** (`idle_unload_s` per consumer, off by default): a resident consumer unused for
  that long is unloaded, confirmed like any eviction, when no job waits or runs.
- **Warm restore** (`idle.warm`, after `idle.warm_after_s` of an idle GPU): the consumers (or
  `consumer/model`) listed are brought back, so the interactive service is resident when the
  next person asks. A warm load never starts while a job waits, and gives way at once when one
  arrives: `interrupt()` cancels it, the job runs first, and the half-done load leaves its
  consumer `unknown` (counted as holding its memory, the safe side).

Both run as exclusive jobs under the lease, like an admin load or unload, so they never race a
job's own residency change. `tick()` makes one decision; the broker calls it every second, the
tests call it on a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from mgpumanager.clock import Clock
from mgpumanager.errors import BrokerError
from mgpumanager.registry import Config
from mgpumanager.residency.evict import Residency
from mgpumanager.residency.records import State
from mgpumanager.scheduling.core import Grant, Outcome
from mgpumanager.scheduling.lease import Lease

log = logging.getLogger(__name__)


class IdleKeeper:
    def __init__(
        self,
        config: Callable[[], Config],
        residency: Residency,
        lease: Lease,
        clock: Clock,
        *,
        interval_s: float = 1.0,
    ) -> None:
        self._config = config
        self.residency = residency
        self.lease = lease
        self.clock = clock
        self.interval_s = interval_s
        self.idle_since: float | None = clock.now()  # None: jobs are running
        self.warming: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None
        lease.core.on_grant.append(self._granted)
        lease.core.on_finish.append(self._finished)

    # -- what the scheduler tells us ------------------------------------------------------------

    def _granted(self, grant: Grant) -> None:
        self.idle_since = None  # busy until the last job ends

    def _finished(self, job_id: int, outcome: Outcome) -> None:
        if self.gpu_idle:
            self.idle_since = self.clock.now()

    @property
    def gpu_idle(self) -> bool:
        core = self.lease.core
        return core.in_flight == 0 and core.queue_depth == 0

    def idle_for_s(self) -> float:
        if not self.gpu_idle or self.idle_since is None:
            return 0.0
        return self.clock.now() - self.idle_since

    # -- deciding -------------------------------------------------------------------------------

    def interrupt(self) -> None:
        """A job arrived: a warm load in progress gives way at once."""
        if self.warming is not None and not self.warming.done():
            log.info("warm restore interrupted by a job")
            self.warming.cancel()

    async def tick(self) -> None:
        """One decision: unload the consumers idle too long, else warm one entry back."""
        if not self.gpu_idle or (self.warming is not None and not self.warming.done()):
            return
        for name in self.idle_consumers():
            await self._exclusive(name, self.residency.unload, f"{name}: idle, unloading")
        entry = self.next_warm()
        if entry is not None and self.idle_for_s() >= self._config().idle.warm_after_s:
            self.warming = asyncio.create_task(self._warm(entry), name=f"warm {entry}")

    def idle_consumers(self) -> list[str]:
        now = self.clock.now()
        out = []
        for name, c in self._config().consumers.items():
            record = self.residency.view.records.get(name)
            if c.idle_unload_s is None or record is None or record.state is not State.RESIDENT:
                continue
            unused_since = record.last_used if record.last_used is not None else self.idle_since
            if unused_since is not None and now - unused_since >= c.idle_unload_s:
                out.append(name)
        return out

    def next_warm(self) -> str | None:
        """The first `idle.warm` entry that is not resident now."""
        for entry in self._config().idle.warm:
            name, _, model = entry.partition("/")
            if name in self.residency.view.records and not self.residency.ready(
                name, model or None
            ):
                return entry
        return None

    # -- doing ----------------------------------------------------------------------------------

    async def _warm(self, entry: str) -> None:
        name, _, model = entry.partition("/")
        if model:
            await self._exclusive(
                name, lambda n: self.residency.load_model(n, model), f"warm restore of {entry}"
            )
        else:
            await self._exclusive(name, self.residency.ensure_resident, f"warm restore of {name}")

    async def _exclusive(
        self, name: str, change: Callable[[str], Awaitable[None]], why: str
    ) -> None:
        log.info("%s", why)
        try:
            async with self.lease.job(
                name,
                priority=0,
                queue_timeout_s=self._config().scheduler.queue_timeout_s,
                exclusive=True,
            ):
                await change(name)
        except BrokerError as exc:
            log.warning("%s failed: %s", why, exc.message)

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="idle-keeper")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:  # a bug here must not stop the broker
                log.exception("idle keeper failed")

    async def aclose(self) -> None:
        for task in (self._loop, self.warming):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
