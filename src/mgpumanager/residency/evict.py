"""Making room: the changing side of residency (docs/residency.md).

`Residency` adds the changes to the records and readings of its `ResidencyView` (view.py):
it makes a consumer, or one model of a per-model consumer, resident, evicting whoever is in the
way. The decision of whom to evict is the pure `planner.plan_eviction`; this module carries it
out: unload, confirm through the upstream and the GPU reading, and only then load — an
unconfirmed eviction never leads to a load (that is the OOM we exist to prevent).

Changes run under the lease (`ensure_resident` is the lease's prepare step; admin, idle and
warm changes run as exclusive jobs) and, within a tenure whose jobs run concurrently, one at a
time under `self.view.changing`. Every change of a record's state goes through `records.transition`,
which holds the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from mgpumanager.clock import Clock
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.events import Emit, no_emit
from mgpumanager.registry import Config
from mgpumanager.residency import device_room
from mgpumanager.residency.planner import CannotFit, Evict, Resident, plan_eviction
from mgpumanager.residency.records import HOLDS_MEMORY, ModelRecord, State, transition
from mgpumanager.residency.view import UNIT_SEPARATOR, Counters, ResidencyView, unit_consumer
from mgpumanager.upstreams.adapters import ConsumerAdapter, residual_allowance_mib
from mgpumanager.upstreams.gpu import GpuReader, GpuReading

log = logging.getLogger("mgpumanager.residency")

__all__ = ["Counters", "EvictionDecision", "Residency"]

# How long after an upstream let go (by itself, or asked by a client) its memory may still show
# as used: the driver frees it 0.5-1.5 s later (Ollama reports the same lag), with room to spare.
# A plan waits that long for it, rather than blame it on processes of no consumer.
LET_GO_LAG_S = 3.0


class NotConfirmed(BrokerError):
    """An unload whose memory did not come back in time (eviction_failed)."""


@dataclass(frozen=True)
class EvictionDecision:
    """One plan carried out: who was evicted for whom, and what was known when deciding."""

    at: float
    target: str
    need_mib: int
    headroom_mib: int
    victims: tuple[str, ...]
    residents: tuple[str, ...]


class Residency:
    """The changing side of residency over its reading side (`view`: the records, the GPU
    readings, reconciliation). The lease's Tenure: it makes each tenure's consumer resident."""

    def __init__(
        self,
        config: Config,
        adapters: Mapping[str, ConsumerAdapter],
        reader: GpuReader,
        clock: Clock,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        probe: Callable[[str], Awaitable[bool]] | None = None,
        model_size: Callable[[str, str], int | None] | None = None,
        in_flight: Callable[[str], int] | None = None,
        has_model: Callable[[str, str], Awaitable[bool | None]] | None = None,
        emit: Emit = no_emit,
    ) -> None:
        self.view = ResidencyView(
            config, adapters, reader, clock, model_size=model_size, in_flight=in_flight, emit=emit
        )
        self._emit = emit
        self._sleep = sleep
        # How "ready" is checked after a load; the broker passes its health monitor's probe so
        # that the monitor's verdict follows the load.
        self._probe = probe or self._adapter_healthy
        self.decisions: list[EvictionDecision] = []  # the last 100, newest last
        # False where a per-model upstream has just answered 404 for a model (None: no such
        # answer): never "not in its list", which is no proof (model_names, a late list).
        self._has_model = has_model or _cannot_tell
        self._reads: set[asyncio.Task[GpuReading]] = set()  # readings off the swap's path

    def reconfigure_probe(self, probe: Callable[[str], Awaitable[bool]]) -> None:
        self._probe = probe

    def _read_soon(self) -> None:
        """A GPU reading in the background, for the figures /v1/status shows."""
        task = asyncio.ensure_future(self.view.read_gpu())
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    def resident_set(self) -> frozenset[str]:
        return self.view.resident_set()

    def swap_costs(self) -> dict[str, float]:
        return self.view.swap_costs()

    def ready(self, name: str, model: str | None = None) -> bool:
        """Resident, and where it is tracked per model, with `model` resident too."""
        record = self.view.records[name]
        if record.state is not State.RESIDENT:
            return False
        if model is None or not self.view.adapters[name].per_model:
            return True
        return self.view.model_key(name, model) in record.models

    # -- making room ----------------------------------------------------------------------------

    async def ensure_resident(self, target: str, model: str | None = None) -> None:
        """The lease's prepare step: make `target` (and its `model`, for per-model consumers)
        resident, evicting whoever is in the way."""
        if self.view.adapters[target].per_model:
            model = self.view.model_key(target, model)  # as the upstream lists it (aliases, tags)
        if self.ready(target, model):
            return
        async with self.view.changing:
            if self.ready(target, model):
                return
            started = self.view.clock.now()
            try:
                await self._make_resident(target, model)
            finally:
                self.view.counters.swap_seconds += self.view.clock.now() - started

    async def _make_resident(self, target: str, model: str | None) -> None:
        # The upstreams' word first: someone may have loaded or unloaded around the broker.
        reading = await self.view.reconcile(changing=True)
        if self.ready(target, model):
            return
        record = self.view.records[target]
        per_model = model if self.view.adapters[target].per_model else None
        if per_model is not None and await self._has_model(target, per_model) is False:
            # The upstream has just answered 404 for it: nothing to make room for, nothing to
            # load; its own 404 follows again.
            log.info("%s has no model %r: nothing evicted, its own answer follows", target, model)
            return
        if per_model is not None and record.state is State.RESIDENT and record.models:
            # Room for one more model inside a resident consumer: its other models stay counted.
            # (Resident with none listed: its upstream holds nothing, though the record could
            # not say `unloaded` while the broker's own job on it was still counted.)
            need, exclude = self.view.model_cost_mib(target, per_model), None
        else:
            # Its state stays as it is until the load: an `unknown` target keeps counting as
            # taken on every failure path; here it is only left out of its own way.
            need = (
                record.cost_mib
                if per_model is None
                else self.view.model_cost_mib(target, per_model)
            )
            exclude = target
        unit_model = per_model if exclude is None else None
        headroom = self.view.headroom_for(target, reading, exclude)
        residents = self.view.units(target, unit_model)
        plan = self._plan(target, need, headroom, residents, reading, exclude)
        if isinstance(plan, CannotFit) or (plan.victims and self._lagging(reading, exclude)):
            # A second look before blaming anyone, or evicting for memory that is coming back.
            reading = await self._second_look(need, exclude)
            if self.ready(target, model):
                return
            headroom = self.view.headroom_for(target, reading, exclude)
            residents = self.view.units(target, unit_model)
            plan = self._plan(target, need, headroom, residents, reading, exclude)
        if isinstance(plan, CannotFit):
            raise self._cannot_fit(target, plan, residents, reading)
        if plan.victims:
            self._decided(target, need, headroom, plan.victims, residents)
        # The reading just taken is each first unload's "before", and the last confirming
        # reading the free figure's first word: no GPU read on the swap's path is repeated.
        reading = await self._evict_units(plan.victims, target, reading)
        await self._wait_for_room(target, need, exclude=exclude, reading=reading)
        if per_model is not None:
            await self._take_model(target, per_model, need)
        else:
            await self.load(target)

    def _plan(
        self,
        target: str,
        need: int,
        headroom: int,
        residents: list[Resident],
        reading: GpuReading,
        exclude: str | None,
    ) -> Evict | CannotFit:
        if self.view.multi_device:  # per device of the target, the others untouched
            return device_room.plan(self.view, reading, target, need, exclude, residents)
        return plan_eviction(
            target=target,
            target_cost_mib=need,
            headroom_mib=headroom,
            capacity_mib=self.view.capacity_mib,
            residents=residents,
        )

    def unattributed_mib(self, reading: GpuReading, exclude: str | None = None) -> int:
        """Memory the GPU says is used that no record accounts for (`exclude`: the consumer
        the room is for, not counted, as in headroom_mib): processes of no consumer, or a
        consumer's memory still on its way back after it let go."""
        if not reading.ok or reading.used_mib is None:
            return 0
        held = sum(
            r.cost_mib
            for name, r in self.view.records.items()
            if r.state in HOLDS_MEMORY and name != exclude
        )
        return reading.used_mib - held

    def _lag_left_s(self) -> float:
        """How long memory let go a moment ago may still show as used: LET_GO_LAG_S after the
        last consumer (or model) was seen letting go by itself or by a client."""
        now = self.view.clock.now()
        return max((at + LET_GO_LAG_S - now for at in self.view.let_go_at.values()), default=0.0)

    def _lagging(self, reading: GpuReading, exclude: str | None) -> bool:
        return self.unattributed_mib(reading, exclude) > 0 and self._lag_left_s() > 0

    async def _second_look(self, need: int, exclude: str | None) -> GpuReading:
        """Before a plan says "cannot fit" (or evicts for memory nobody accounts for): re-read
        every consumer whose figures it would blame, then the memory no record accounts for,
        again — until it comes back while something let go a moment ago (the driver frees it
        0.5-1.5 s after the upstream said so), else once, a poll interval later. What is still
        there after that is held outside the broker's consumers."""
        reading = await self.view.reconcile(changing=True)
        deadline = self.view.clock.now() + max(
            self._lag_left_s(), self.view.config.gpu.poll_interval_s
        )
        while (
            self.unattributed_mib(reading, exclude) > 0
            and self.view.headroom_mib(reading, exclude) < need
        ):
            if self.view.clock.now() >= deadline:
                break
            await self._sleep(self.view.config.gpu.poll_interval_s)
            reading = await self.view.read_gpu()
        return reading

    async def follow_client_unload(self, name: str, model: str | None) -> None:
        """A client has just unloaded `name` (or its `model`) through the broker: re-read it
        now, and again every poll interval until the upstream shows it (within its
        unload_timeout_s), so that status, events and the next plan see it at once."""
        if name not in self.view.records:
            return
        config = self.view.config.consumers[name]
        key = self.view.model_key(name, model) if self.view.adapters[name].per_model else None
        deadline = self.view.clock.now() + config.unload_timeout_s
        self.view.let_go_at[name] = self.view.clock.now()
        self.view.client_unloading.add(name)
        try:
            while True:
                await self.view.reconcile([name])
                record = self.view.records.get(name)
                if record is None or self.view.clock.now() >= deadline:
                    return
                # Gone: unloaded, or that model left the list (while others stay, or while
                # the record cannot say `resident` anyway). Resident with no model left: the
                # record says `unloaded` once the broker's last job on it is counted out.
                left = key is not None and key not in record.models
                if record.state is State.UNLOADED or (
                    left and (record.models or record.state is not State.RESIDENT)
                ):
                    self.view.let_go_at[name] = self.view.clock.now()  # its memory follows from now
                    return
                await self._sleep(self.view.config.gpu.poll_interval_s)
        finally:
            self.view.client_unloading.discard(name)

    def _cannot_fit(
        self, target: str, plan: CannotFit, residents: list[Resident], reading: GpuReading
    ) -> BrokerError:
        reason = plan.reason
        stuck = [r.name for r in residents if self.view.cooling_down(unit_consumer(r.name))]
        if stuck:
            reason += f" ({', '.join(stuck)}: last unload not confirmed, state unknown)"
        outside = self.view.outside_processes(reading)
        if outside:
            reason += f"; processes of no consumer hold memory: {', '.join(outside)}"
        return BrokerError(
            ErrorCode.INSUFFICIENT_VRAM, reason, consumer=target, retryable=plan.retryable
        )

    def _decided(
        self,
        target: str,
        need: int,
        headroom: int,
        victims: tuple[str, ...],
        residents: list[Resident],
    ) -> None:
        self.decisions.append(
            EvictionDecision(
                self.view.clock.now(),
                target,
                need,
                headroom,
                victims,
                tuple(r.name for r in residents),
            )
        )
        del self.decisions[:-100]
        self._emit(
            "eviction.planned",
            target=target,
            need_mib=need,
            headroom_mib=headroom,
            victims=list(victims),
            residents=[r.name for r in residents],
        )
        log.info(
            "%s needs %d MiB, headroom %d MiB: evicting %s",
            target,
            need,
            headroom,
            ", ".join(victims),
        )

    async def _evict_units(
        self, victims: tuple[str, ...], target: str, reading: GpuReading
    ) -> GpuReading:
        """Carry out a plan: a consumer all of whose models go is unloaded whole. `reading`:
        one taken for the plan, before any unload: the first unload's "before"; each later
        one starts from the reading that confirmed the one before. Answers the last reading."""
        by_consumer: dict[str, list[str]] = {}
        for victim in victims:
            name, _, model = victim.partition(UNIT_SEPARATOR)
            by_consumer.setdefault(name, []).append(model)
        for name, models in by_consumer.items():
            record = self.view.records[name]
            if "" in models or set(models) >= set(record.models):
                reading = await self.evict(name, for_consumer=target, before=reading)
            else:
                for model in models:
                    reading = await self.evict_model(
                        name, model, for_consumer=target, before=reading
                    )
        return reading

    # -- unloading ------------------------------------------------------------------------------

    async def evict(
        self, name: str, *, for_consumer: str | None = None, before: GpuReading | None = None
    ) -> GpuReading:
        """Unload `name` and confirm that the memory came back, or raise eviction_failed.
        Whatever its record says: an admin unload of an `unloaded` consumer still asks.
        `before`: a reading taken under the same change, before this unload (else one now).
        Answers the reading that confirmed it."""
        record = self.view.records[name]
        adapter = self.view.adapters[name]
        timeout_s = self.view.config.consumers[name].unload_timeout_s
        started = self.view.clock.now()
        if before is None:
            before = await self.view.read_gpu()
        # Known to hold its memory (the broker loaded it or saw it): then the GPU must show the
        # memory coming back. An `unknown` one may hold nothing, and no drop is owed.
        expect_mib = record.cost_mib if record.state is State.RESIDENT else 0
        why = f"evicted for {for_consumer}" if for_consumer else "unload asked for"
        transition(name, record, State.UNLOADING, why)
        blame = for_consumer or name
        async with self._unloading(name, name, blame, timeout_s):
            await adapter.unload()
            after = await self._confirm(
                name, adapter.unloaded, before, expect_mib, timeout_s, blame
            )
        record.unload_failed_at = None
        record.last_unload_s = self.view.clock.now() - started
        confirmed = f"unload confirmed in {record.last_unload_s:.2f} s"
        transition(name, record, State.UNLOADED, confirmed)
        self._emit(
            "eviction.confirmed",
            consumer=name,
            for_consumer=for_consumer,
            unload_s=record.last_unload_s,
        )
        return after

    async def evict_model(
        self, name: str, model: str, *, for_consumer: str, before: GpuReading | None = None
    ) -> GpuReading:
        """Unload one model of a per-model consumer that keeps others resident."""
        record = self.view.records[name]
        adapter = self.view.adapters[name]
        unit = record.models[model]
        timeout_s = self.view.config.consumers[name].unload_timeout_s
        if before is None:
            before = await self.view.read_gpu()
        log.info("%s: unloading model %s for %s", name, model, for_consumer)

        async def gone() -> bool:
            report = await adapter.residency()
            listed = report.models
            return listed is not None and all(adapter.model_key(m) != model for m in listed)

        async with self._unloading(name, f"{name}/{model}", for_consumer, timeout_s):
            await adapter.unload_model(self.view.upstream_name(name, model))
            after = await self._confirm(name, gone, before, unit.cost_mib, timeout_s, for_consumer)
        del record.models[model]
        record.generation += 1
        self._emit("eviction.confirmed", consumer=name, model=model, for_consumer=for_consumer)
        return after

    @contextlib.asynccontextmanager
    async def _unloading(
        self, name: str, what: str, blame: str, timeout_s: float
    ) -> AsyncIterator[None]:
        """Around one unload and its confirmation (`what`: a consumer, or consumer/model). A
        refused call or memory not back within `timeout_s` is eviction_failed for `blame`, and
        the record is left `unknown`, marked as failed; an unload cut off half-way leaves it
        `unknown` too: nobody knows (the safe side). Done: one eviction more."""
        record = self.view.records[name]
        try:
            yield
        except NotConfirmed:
            self._eviction_failed(name, f"memory not back within {timeout_s:g} s")
            raise
        except BrokerError as exc:
            self._eviction_failed(name, f"unload call failed: {exc.message}")
            raise BrokerError(
                ErrorCode.EVICTION_FAILED,
                f"unloading {what} failed: {exc.message}",
                consumer=blame,
            ) from exc
        except BaseException:
            if record.state is not State.UNKNOWN:
                transition(name, record, State.UNKNOWN, f"unload of {what} cut off")
            raise
        self.view.counters.evictions += 1

    async def _confirm(
        self,
        name: str,
        upstream_let_go: Callable[[], Awaitable[bool]],
        before: GpuReading,
        expect_mib: int,
        timeout_s: float,
        blame: str,
    ) -> GpuReading:
        """Poll until the upstream says it let go and the GPU shows `expect_mib` back: both
        asked at once, every gpu.confirm_poll_s, so that the swap goes on within a few
        milliseconds of the card freeing (the background readings keep their own pace)."""
        deadline = self.view.clock.now() + timeout_s
        gone_since: float | None = None
        while True:
            asked_at = self.view.clock.now()
            gone, after = await asyncio.gather(_asked(name, upstream_let_go), self.view.read_gpu())
            if gone and gone_since is None:
                gone_since = self.view.clock.now()
            settled_s = 0.0 if gone_since is None else self.view.clock.now() - gone_since
            if gone and self._gpu_confirms(name, before, after, expect_mib, settled_s):
                return after
            if self.view.clock.now() >= deadline:
                raise NotConfirmed(
                    ErrorCode.EVICTION_FAILED,
                    f"{name} was asked to unload but its memory did not come back within "
                    f"{timeout_s:g} s (upstream let go: {gone}; GPU: {_describe(after)}); "
                    f"{name} is now 'unknown' and nothing was loaded",
                    consumer=blame,
                )
            # At a steady rate, the asking included: the card is seen free no later than one
            # interval after it freed.
            poll_s = self.view.config.gpu.confirm_poll_s
            await self._sleep(max(0.0, asked_at + poll_s - self.view.clock.now()))

    def _eviction_failed(self, name: str, reason: str) -> None:
        record = self.view.records[name]
        if record.state is State.UNKNOWN:  # a model of a consumer nobody could read already
            record.detail = f"{reason}; state unknown"
        else:
            transition(name, record, State.UNKNOWN, f"{reason}; state unknown")
        record.unload_failed_at = self.view.clock.now()
        self.view.counters.eviction_failures += 1
        self._emit("eviction.failed", consumer=name, reason=reason)

    def _gpu_confirms(
        self,
        name: str,
        before: GpuReading,
        after: GpuReading,
        expect_mib: int,
        settled_s: float,
    ) -> bool:
        """The GPU's word that `expect_mib` of `name`'s memory is back. With per-process
        figures for it: they dropped by half of that, or (a whole unload) to no more than a
        CUDA context. Without them: used memory dropped by half of it. Nothing expected (it was
        `unknown`): the free figure decides later. No readings at all (static backend): the
        upstream's word, `settled_s` ago, once the driver's usual lag (gpu.static_settle_s)
        has passed since.
        """
        if self.view.reader.backend == "static":
            return settled_s >= self.view.config.gpu.static_settle_s
        if not after.ok:
            return False
        record = self.view.records[name]
        held_after = self.view.measure(name, after)
        if held_after is not None:
            if record.state is State.UNLOADING:
                return held_after <= residual_allowance_mib(record.declared_mib)
            held_before = self.view.measure(name, before)
            return held_before is None or held_before - held_after >= expect_mib // 2
        if expect_mib == 0:
            # Nothing to watch for: whatever it may still hold shows in the free figure, which
            # _wait_for_room checks before anything loads.
            return True
        if before.used_mib is None or after.used_mib is None:
            return False
        return before.used_mib - after.used_mib >= expect_mib // 2

    async def _wait_for_room(
        self, target: str, need: int, exclude: str | None, reading: GpuReading | None = None
    ) -> None:
        """Victims are confirmed; the free figure must agree before anything loads. `reading`:
        the newest one, taken after the last victim was confirmed (else one is taken now)."""
        deadline = self.view.clock.now() + max(
            (c.unload_timeout_s for c in self.view.config.consumers.values()), default=1.0
        )
        while True:
            if reading is None:
                reading = await self.view.read_gpu()
            headroom = self.view.headroom_for(target, reading, exclude)
            if headroom >= need:
                return
            if self.view.clock.now() >= deadline:
                raise NotConfirmed(
                    ErrorCode.EVICTION_FAILED,
                    f"{target} needs {need} MiB but only {headroom} MiB are free after evicting "
                    f"(GPU: {_describe(reading)}); not loading",
                    consumer=target,
                )
            reading = None
            await self._sleep(self.view.config.gpu.confirm_poll_s)

    # -- loading --------------------------------------------------------------------------------

    async def _adapter_healthy(self, name: str) -> bool:
        return (await self.view.adapters[name].health()).ok

    async def load(self, name: str) -> None:
        """Load with the consumer's load call and wait until its health passes; without a load
        call, the first job loads it lazily (its memory is counted from now on)."""
        record = self.view.records[name]
        adapter = self.view.adapters[name]
        config = self.view.config.consumers[name]
        started = self.view.clock.now()
        transition(name, record, State.LOADING, "needed by a job")
        self._emit("load.started", consumer=name, vram_mib=record.cost_mib)
        if adapter.has_load:
            try:
                async with asyncio.timeout(config.load_timeout_s):
                    await adapter.load()
                    # Ready as soon as it says so: probes start at the card's pace and back
                    # off to gpu.poll_interval_s for a load that takes its time.
                    pause_s = self.view.config.gpu.confirm_poll_s
                    while not await self._probe(name):
                        await self._sleep(pause_s)
                        pause_s = min(2 * pause_s, self.view.config.gpu.poll_interval_s)
            except asyncio.CancelledError:
                transition(name, record, State.UNKNOWN, "load cut off")  # the safe side
                self._emit("load.failed", consumer=name, reason="load cut off")
                raise
            except (TimeoutError, BrokerError) as exc:
                self.view.counters.load_failures += 1
                message = (
                    f"not ready within load_timeout_s ({config.load_timeout_s:g} s)"
                    if isinstance(exc, TimeoutError)
                    else exc.message
                )
                # It may hold part of its memory: the safe side.
                transition(name, record, State.UNKNOWN, f"load failed: {message}")
                self._emit("load.failed", consumer=name, reason=message)
                raise BrokerError(
                    ErrorCode.LOAD_FAILED, f"loading {name} failed: {message}", consumer=name
                ) from exc
            record.last_load_s = self.view.clock.now() - started
        how = "loaded by the broker" if adapter.has_load else "loads lazily on its first job"
        if adapter.per_model:
            # Its preloaded models are what it holds now (and what a later eviction confirms).
            for model in config.preload_models if adapter.has_load else ():
                key = adapter.model_key(model)
                record.models[key] = ModelRecord(self.view.model_cost_mib(name, key))
        transition(name, record, State.RESIDENT, how)
        self._emit(
            "load.ready", consumer=name, load_s=record.last_load_s, lazy=not adapter.has_load
        )
        self.view.counters.swaps += 1
        if adapter.has_load:
            # So /v1/status shows the loaded figure, not the one before; off the job's path.
            self._read_soon()

    async def _take_model(self, name: str, model: str, cost_mib: int) -> None:
        """Room is made for `model`: the job loads it (Ollama and speaches load on first use);
        its memory is counted from now on, and reconciliation corrects the figure later."""
        record = self.view.records[name]
        record.models[model] = ModelRecord(cost_mib)
        record.generation += 1
        if record.state is not State.RESIDENT:
            if record.state is not State.LOADING:
                transition(name, record, State.LOADING, f"model {model} needed by a job")
            transition(name, record, State.RESIDENT, f"model {model} loads on its first job")
        self.view.counters.swaps += 1

    async def load_model(self, name: str, model: str) -> None:
        """Load one model now (warm restore), with room made for it first."""
        await self.ensure_resident(name, model)
        try:
            key = self.view.model_key(name, model) or model
            await self.view.adapters[name].load_model(self.view.upstream_name(name, key))
        except BrokerError as exc:
            self.view.counters.load_failures += 1
            message = f"loading {name}/{model} failed: {exc.message}"
            self._emit("load.failed", consumer=name, model=model, reason=exc.message)
            raise BrokerError(ErrorCode.LOAD_FAILED, message, consumer=name) from exc

    async def unload(self, name: str) -> None:
        """An admin (or idle) unload: always asks and confirms, whatever the record says."""
        async with self.view.changing:
            await self.evict(name)


async def _cannot_tell(name: str, model: str) -> bool | None:
    return None


async def _asked(name: str, question: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return await question()
    except BrokerError as exc:
        log.debug("%s: unload check failed: %s", name, exc)
        return False


def _describe(reading: GpuReading) -> str:
    if not reading.ok:
        return f"unknown ({reading.error})"
    if reading.used_mib is None or reading.free_mib is None:  # static: a size, no readings
        return f"{reading.total_mib} MiB, memory in use not read ({reading.backend})"
    return f"{reading.used_mib} MiB used, {reading.free_mib} MiB free of {reading.total_mib}"
