"""Who is in VRAM, and making room: the effects side of DESIGN §4.

`Residency` owns every consumer's residency record. It is only changed while the lease is held
(`ensure_resident` is the lease's prepare step; admin load/unload run as jobs), so no two
residency changes ever race. The decision of whom to evict is the pure `planner.plan_eviction`;
this module carries it out: unload, confirm through the upstream and the GPU reading, and only
then load — an unconfirmed eviction never leads to a load (that is the OOM we exist to prevent).
Every change of a record's state goes through `records.transition`, which holds the table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from .adapters import ConsumerAdapter
from .clock import Clock
from .config import Config
from .errors import BrokerError, ErrorCode
from .gpu import GpuReader, GpuReading, measured_mib
from .planner import CannotFit, Resident, plan_eviction
from .records import HOLDS_MEMORY, Record, State, transition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvictionDecision:
    """One plan carried out: who was evicted for whom, and what was known when deciding."""

    at: float
    target: str
    need_mib: int
    headroom_mib: int
    victims: tuple[str, ...]
    residents: tuple[str, ...]


@dataclass
class Counters:
    swaps: int = 0  # loads of a consumer that was not resident
    evictions: int = 0  # confirmed unloads
    eviction_failures: int = 0
    load_failures: int = 0
    # Lease time spent making consumers resident (evictions, waiting for the memory, loads),
    # failed attempts and admin loads included; not a lazy load inside a job (ComfyUI's).
    swap_seconds: float = 0.0


def residual_allowance_mib(declared_mib: int) -> int:
    """Memory a process may keep after unloading its models (CUDA context, allocator cache):
    ComfyUI keeps a few hundred MiB, speaches some too. Below this, the unload is confirmed."""
    return max(512, declared_mib // 10)


class Residency:
    def __init__(
        self,
        config: Config,
        adapters: Mapping[str, ConsumerAdapter],
        reader: GpuReader,
        clock: Clock,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        probe: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.config = config
        self.adapters = adapters
        self.reader = reader
        self.clock = clock
        self._sleep = sleep
        # How "ready" is checked after a load; the broker passes its health monitor's probe so
        # that the monitor's verdict follows the load.
        self._probe = probe or self._adapter_healthy
        self.counters = Counters()
        self.decisions: list[EvictionDecision] = []  # the last 100, newest last
        self.last_reading: GpuReading | None = None
        self.records = {
            name: Record(State.UNKNOWN, c.vram_resident_mib, c.pinned)
            for name, c in config.consumers.items()
        }

    # -- reading the world ----------------------------------------------------------------------

    @property
    def total_mib(self) -> int:
        return self.reader.total_mib

    @property
    def capacity_mib(self) -> int:
        return self.total_mib - self.config.gpu.safety_margin_mib

    def resident_set(self) -> frozenset[str]:
        return frozenset(n for n, r in self.records.items() if r.state is State.RESIDENT)

    def swap_costs(self) -> dict[str, float]:
        """Seconds of one measured swap cycle (last unload + last load) per consumer; those the
        broker has not seen both of are left out (the scheduler treats them as unknown)."""
        return {
            name: r.last_unload_s + r.last_load_s
            for name, r in self.records.items()
            if r.last_unload_s is not None and r.last_load_s is not None
        }

    async def read_gpu(self) -> GpuReading:
        reading = await self.reader.read()
        self.last_reading = reading
        if reading.ok:
            for name, record in self.records.items():
                record.measured_mib = self._measure(name, reading)
        return reading

    def _measure(self, name: str, reading: GpuReading, config: Config | None = None) -> int | None:
        patterns = (config or self.config).consumers[name].gpu_processes
        if not patterns or not reading.ok:
            return None
        measured = measured_mib(reading, patterns)
        if measured is not None:
            return measured
        # No matching process means it holds nothing (a stopped whisper-server, say) — but only
        # when the reading can attribute memory at all: an empty card, or processes with named
        # figures. A reader with no per-process data (static, hidden PIDs) knows nothing.
        if reading.used_mib == 0 or any(
            p.used_mib is not None and not p.name.startswith("pid:") for p in reading.processes
        ):
            return 0
        return None

    def headroom_mib(self, reading: GpuReading, exclude: str | None = None) -> int:
        """min(free VRAM the GPU reports, total - what residents are known to hold) - margin.
        Both terms matter: the driver's free figure lags after an unload. `exclude`: the
        consumer the room is for, whatever its state (it is not in its own way)."""
        held = sum(
            r.cost_mib
            for name, r in self.records.items()
            if r.state in HOLDS_MEMORY and name != exclude
        )
        by_accounting = self.total_mib - held
        free = reading.free_mib if reading.ok else None
        headroom = by_accounting if free is None else min(free, by_accounting)
        return headroom - self.config.gpu.safety_margin_mib

    async def discover(self) -> None:
        """At start-up: ask every adapter and the GPU who is resident, instead of assuming an
        empty card. What nobody can tell stays `unknown` and counts as taken."""
        self.records.update(await self.probe(self.config, self.adapters, list(self.records)))

    async def probe(
        self, config: Config, adapters: Mapping[str, ConsumerAdapter], names: list[str]
    ) -> dict[str, Record]:
        """Fresh records for `names`, from their adapters' residency reports and a GPU reading.
        Changes nothing itself: the caller decides when to take them in."""
        reading = await self.read_gpu()
        reports = await asyncio.gather(
            *(adapters[name].residency() for name in names), return_exceptions=True
        )
        out = {}
        for name, report in zip(names, reports, strict=True):
            c = config.consumers[name]
            measured = self._measure(name, reading, config)
            state, detail = State.UNKNOWN, "no residency probe or GPU figure"
            if isinstance(report, BaseException):
                detail = f"residency probe failed: {report}"
            elif report.resident is not None:
                state = State.RESIDENT if report.resident else State.UNLOADED
                detail = report.detail
            elif measured is not None and reading.ok:
                resident = measured >= c.vram_resident_mib // 2
                state = State.RESIDENT if resident else State.UNLOADED
                detail = f"GPU reading: {measured} MiB"
            log.info("%s: found %s (%s)", name, state, detail)
            out[name] = Record(state, c.vram_resident_mib, c.pinned, measured, detail=detail)
        return out

    def reconfigure(
        self,
        config: Config,
        adapters: Mapping[str, ConsumerAdapter],
        probe: Callable[[str], Awaitable[bool]],
        added: Mapping[str, Record],
    ) -> None:
        """A reloaded registry, taken in at once (no await: nothing sees a half-applied one).
        Known consumers keep their residency, their declared cost and pin following the new
        file; `added` come from `probe`; removed ones (the broker refuses to remove one that
        still holds memory) are dropped."""
        for name in set(self.records) - set(config.consumers):
            del self.records[name]
        self.records.update(added)
        for name, c in config.consumers.items():
            record = self.records[name]
            record.declared_mib, record.pinned = c.vram_resident_mib, c.pinned
        self.config, self.adapters, self._probe = config, adapters, probe

    def touch(self, name: str) -> None:
        record = self.records.get(name)  # gone if a reload removed it while its job ran
        if record is not None:
            record.last_used = self.clock.now()

    # -- changing it (lease held) ----------------------------------------------------------------

    async def ensure_resident(self, target: str) -> None:
        """The lease's prepare step: make `target` resident, evicting whoever is in the way."""
        if self.records[target].state is State.RESIDENT:
            return
        started = self.clock.now()
        try:
            await self._make_resident(target)
        finally:
            self.counters.swap_seconds += self.clock.now() - started

    async def _make_resident(self, target: str) -> None:
        record = self.records[target]
        reading = await self.read_gpu()
        # Its state stays as it is until the load: an `unknown` target keeps counting as taken
        # on every failure path (DESIGN §8); here it is only left out of its own way.
        residents = await self._residents_for_plan(target)  # may find some left by themselves
        headroom = self.headroom_mib(reading, exclude=target)
        plan = plan_eviction(
            target=target,
            target_cost_mib=record.cost_mib,
            headroom_mib=headroom,
            capacity_mib=self.capacity_mib,
            residents=residents,
        )
        if isinstance(plan, CannotFit):
            stuck = [r.name for r in residents if self._cooling_down(r.name)]
            reason = plan.reason
            if stuck:
                reason += f" ({', '.join(stuck)}: last unload not confirmed, state unknown)"
            raise BrokerError(
                ErrorCode.INSUFFICIENT_VRAM, reason, consumer=target, retryable=plan.retryable
            )
        if plan.victims:
            self.decisions.append(
                EvictionDecision(
                    self.clock.now(),
                    target,
                    record.cost_mib,
                    headroom,
                    plan.victims,
                    tuple(r.name for r in residents),
                )
            )
            del self.decisions[:-100]
            log.info(
                "%s needs %d MiB, headroom %d MiB: evicting %s",
                target,
                record.cost_mib,
                headroom,
                ", ".join(plan.victims),
            )
        for victim in plan.victims:
            await self.evict(victim, for_consumer=target)
        await self._wait_for_room(target)
        await self.load(target)

    async def _residents_for_plan(self, target: str) -> list[Resident]:
        names = [n for n, r in self.records.items() if n != target and r.state in HOLDS_MEMORY]
        # Each upstream's word on work posted around the broker (ComfyUI's /queue), asked at once.
        reports = await asyncio.gather(
            *(self.adapters[n].residency() for n in names), return_exceptions=True
        )
        out = []
        for name, report in zip(names, reports, strict=True):
            r = self.records[name]
            if isinstance(report, BaseException):
                log.debug("%s: residency probe failed while planning: %s", name, report)
            elif report.resident is False and r.state is State.RESIDENT:
                # It left by itself (Ollama's keep_alive ran out): nothing to evict. Its memory
                # is back in the free figure, which the load still waits for.
                transition(name, r, State.UNLOADED, f"left by itself ({report.detail or 'idle'})")
                continue
            else:
                r.busy_outside = report.busy
            out.append(
                Resident(
                    name=name,
                    cost_mib=r.cost_mib,
                    last_used=r.last_used if r.last_used is not None else float("-inf"),
                    # Without an unload call nothing can evict it: as good as pinned.
                    pinned=r.pinned or not self.adapters[name].can_unload,
                    busy=r.busy_outside or self._cooling_down(name),
                    coexists=self.config.coexist(name, target),
                )
            )
        return out

    async def evict(self, name: str, *, for_consumer: str | None = None) -> None:
        """Unload `name` and confirm that the memory came back, or raise eviction_failed."""
        record = self.records[name]
        adapter = self.adapters[name]
        timeout_s = self.config.consumers[name].unload_timeout_s
        started = self.clock.now()
        before = await self.read_gpu()
        # Known to hold its memory (the broker loaded it or saw it): then the GPU must show the
        # memory coming back. An `unknown` one may hold nothing, and no drop is owed.
        known = record.state in (State.RESIDENT, State.LOADING)
        why = f"evicted for {for_consumer}" if for_consumer else "unload asked for"
        transition(name, record, State.UNLOADING, why)
        blame = for_consumer or name
        try:
            await adapter.unload()
        except BrokerError as exc:
            self._eviction_failed(name, f"unload call failed: {exc.message}")
            raise BrokerError(
                ErrorCode.EVICTION_FAILED,
                f"unloading {name} failed: {exc.message}",
                consumer=blame,
            ) from exc
        except BaseException:
            # Cut off half-way: nobody knows (the safe side).
            transition(name, record, State.UNKNOWN, "unload cut off")
            raise
        try:
            await self._confirm_unloaded(name, before, known, started, timeout_s, blame)
        except BaseException:
            if record.state is State.UNLOADING:
                transition(name, record, State.UNKNOWN, "unload confirmation cut off")
            raise

    async def _confirm_unloaded(
        self,
        name: str,
        before: GpuReading,
        known: bool,
        started: float,
        timeout_s: float,
        blame: str,
    ) -> None:
        record = self.records[name]
        adapter = self.adapters[name]
        deadline = self.clock.now() + timeout_s
        while True:
            gone = await self._upstream_let_go(adapter)
            after = await self.read_gpu()
            if gone and self._gpu_confirms(name, before, after, known=known):
                break
            if self.clock.now() >= deadline:
                self._eviction_failed(name, f"memory not back within {timeout_s:g} s")
                raise BrokerError(
                    ErrorCode.EVICTION_FAILED,
                    f"{name} was asked to unload but its memory did not come back within "
                    f"{timeout_s:g} s (upstream let go: {gone}; GPU: {_describe(after)}); "
                    f"{name} is now 'unknown' and nothing was loaded",
                    consumer=blame,
                )
            await self._sleep(self.config.gpu.poll_interval_s)
        record.unload_failed_at = None
        record.last_unload_s = self.clock.now() - started
        self.counters.evictions += 1
        transition(
            name, record, State.UNLOADED, f"unload confirmed in {record.last_unload_s:.2f} s"
        )

    def _eviction_failed(self, name: str, reason: str) -> None:
        record = self.records[name]
        transition(name, record, State.UNKNOWN, f"{reason}; state unknown")
        record.unload_failed_at = self.clock.now()
        self.counters.eviction_failures += 1

    def _cooling_down(self, name: str) -> bool:
        """For one unload_timeout_s after an unconfirmed eviction the consumer is treated as in
        the way (like a busy one): jobs that need its room fail fast, retryable, instead of
        each holding the lease for another unload_timeout_s on the same stuck unload."""
        failed_at = self.records[name].unload_failed_at
        timeout_s = self.config.consumers[name].unload_timeout_s
        return failed_at is not None and self.clock.now() - failed_at < timeout_s

    async def _upstream_let_go(self, adapter: ConsumerAdapter) -> bool:
        try:
            return await adapter.unloaded()
        except BrokerError as exc:
            log.debug("%s: unload check failed: %s", adapter.name, exc)
            return False

    def _gpu_confirms(
        self, name: str, before: GpuReading, after: GpuReading, *, known: bool = True
    ) -> bool:
        """The GPU's word that `name`'s memory is back. With per-process figures for it: its
        processes hold no more than a CUDA context. Without them: used memory dropped by half its
        declared cost, when it was known to hold it. With no readings at all (static backend)
        the upstream's word is all there is."""
        record = self.records[name]
        if self.reader.backend == "static":
            return True
        if not after.ok:
            return False
        held = self._measure(name, after)
        if held is not None:
            return held <= residual_allowance_mib(record.declared_mib)
        if not known:
            # Nothing to watch for: whatever it may still hold shows in the free figure, which
            # _wait_for_room checks before anything loads.
            return True
        if before.used_mib is None or after.used_mib is None:
            return False
        return before.used_mib - after.used_mib >= record.declared_mib // 2

    async def _wait_for_room(self, target: str) -> None:
        """Victims are confirmed; the free figure must agree before anything loads."""
        need = self.records[target].cost_mib
        deadline = self.clock.now() + max(
            (c.unload_timeout_s for c in self.config.consumers.values()), default=1.0
        )
        while True:
            reading = await self.read_gpu()
            headroom = self.headroom_mib(reading, exclude=target)
            if headroom >= need:
                return
            if self.clock.now() >= deadline:
                raise BrokerError(
                    ErrorCode.EVICTION_FAILED,
                    f"{target} needs {need} MiB but only {headroom} MiB are free after evicting "
                    f"(GPU: {_describe(reading)}); not loading",
                    consumer=target,
                )
            await self._sleep(self.config.gpu.poll_interval_s)

    async def _adapter_healthy(self, name: str) -> bool:
        return (await self.adapters[name].health()).ok

    async def load(self, name: str) -> None:
        """Load with the consumer's load call and wait until its health passes; without a load
        call, the first job loads it lazily (its memory is counted from now on)."""
        record = self.records[name]
        adapter = self.adapters[name]
        config = self.config.consumers[name]
        started = self.clock.now()
        transition(name, record, State.LOADING, "needed by a job")
        if adapter.has_load:
            try:
                async with asyncio.timeout(config.load_timeout_s):
                    await adapter.load()
                    while not await self._probe(name):
                        await self._sleep(self.config.gpu.poll_interval_s)
            except asyncio.CancelledError:
                transition(name, record, State.UNKNOWN, "load cut off")  # the safe side
                raise
            except (TimeoutError, BrokerError) as exc:
                self.counters.load_failures += 1
                message = (
                    f"not ready within load_timeout_s ({config.load_timeout_s:g} s)"
                    if isinstance(exc, TimeoutError)
                    else exc.message
                )
                # It may hold part of its memory: the safe side.
                transition(name, record, State.UNKNOWN, f"load failed: {message}")
                raise BrokerError(
                    ErrorCode.LOAD_FAILED, f"loading {name} failed: {message}", consumer=name
                ) from exc
            record.last_load_s = self.clock.now() - started
        how = "loaded by the broker" if adapter.has_load else "loads lazily on its first job"
        transition(name, record, State.RESIDENT, how)
        self.counters.swaps += 1
        if adapter.has_load:
            await self.read_gpu()  # so /v1/status shows the loaded figure, not the one before


def _describe(reading: GpuReading) -> str:
    if not reading.ok:
        return f"unknown ({reading.error})"
    return f"{reading.used_mib} MiB used, {reading.free_mib} MiB free of {reading.total_mib}"
