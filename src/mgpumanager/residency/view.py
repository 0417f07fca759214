"""What is in VRAM, as far as anyone can tell: the reading side of residency.

`ResidencyView` holds every consumer's record and keeps it matching the card. Moving a box
over to the broker is gradual: ComfyUI's own web page, an `ollama run` in a terminal, a script
with the old URL all keep working around it. So before every eviction plan and in the
background every few seconds, `reconcile` re-reads each consumer's residency from what its
upstream reports (Ollama and speaches `/api/ps`, vLLM `/is_sleeping`, a `command` consumer's
process, ComfyUI's `/system_stats` and `/queue`) and from the GPU reading where it attributes
memory to a consumer's processes:

- a consumer found holding memory that the broker did not load becomes `resident` ("loaded
  outside the broker"), with that memory as its cost, and is an eviction candidate like any
  other;
- one that left by itself (Ollama's keep_alive ran out) becomes `unloaded`;
- per-model consumers get their list of resident models, with sizes.

It also says what the planner sees (`units`): every consumer holding memory, and for per-model
consumers each resident model, with its cost, LRU time and whether it may be evicted.

Reconciliation never touches a record that is being changed (`loading`, `unloading`), one with
the broker's jobs on it, or one that changed while its upstream was being asked (the record's
generation moved on): what it read may be older than that change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mgpumanager.clock import Clock
from mgpumanager.events import Emit, no_emit
from mgpumanager.registry import Config, ModelEntry
from mgpumanager.residency.device_room import headroom_on, misplaced_devices
from mgpumanager.residency.planner import Resident
from mgpumanager.residency.records import HOLDS_MEMORY, ModelRecord, Record, State, transition
from mgpumanager.upstreams.adapters import ConsumerAdapter, ResidencyReport, residual_allowance_mib
from mgpumanager.upstreams.devices import binding
from mgpumanager.upstreams.gpu import GpuReader, GpuReading, device_uuids, measured_mib
from mgpumanager.upstreams.model_names import registry_entry

log = logging.getLogger("mgpumanager.residency")

OUTSIDE = "loaded outside the broker"  # the detail of a consumer found loaded around it

# Costs of models the upstream lists only by file size: the weights, plus a fifth for the
# context cache, which the file does not hold (a resident model's own figure replaces this).
FILE_SIZE_FACTOR = 1.2


@dataclass
class Counters:
    swaps: int = 0  # loads of a consumer (or model) that was not resident
    evictions: int = 0  # confirmed unloads
    eviction_failures: int = 0
    load_failures: int = 0
    # Lease time spent making consumers resident (evictions, waiting for the memory, loads),
    # failed attempts and admin loads included; not a lazy load inside a job (ComfyUI's).
    swap_seconds: float = 0.0
    outside_loads: int = 0  # consumers found resident that the broker had not loaded


UNIT_SEPARATOR = "/"  # a model's unit in plans and decisions: "ollama/llama3.1:8b"


class ResidencyView:
    def __init__(
        self,
        config: Config,
        adapters: Mapping[str, ConsumerAdapter],
        reader: GpuReader,
        clock: Clock,
        *,
        model_size: Callable[[str, str], int | None] | None = None,
        in_flight: Callable[[str], int] | None = None,
        emit: Emit = no_emit,
    ) -> None:
        self.config = config
        self._emit = emit

        def changed(name: str, record: Record, previous: State) -> None:
            emit(
                "residency.changed",
                consumer=name,
                previous=str(previous),
                residency=str(record.state),
                reason=record.detail,
                resident_models=sorted(record.models),
                vram_mib=record.cost_mib,
            )

        self._changed = changed  # every record's on_change
        self.adapters = adapters
        self.reader = reader
        self.clock = clock
        # What the upstream lists for a model (the catalog: registry figure, else file size).
        self._model_size = model_size or (lambda consumer, model: None)
        # The broker's jobs running on a consumer now (the lease's count, held prompts too).
        self._in_flight = in_flight or (lambda name: 0)
        self.counters = Counters()
        self.last_reading: GpuReading | None = None
        # The box's devices (one on most boxes) and each consumer's (residency/device_room.py).
        self.uuids = device_uuids(reader)
        self.bound = binding(config, self.uuids)
        self.undeclared: dict[str, tuple[str, ...]] = {}  # consumer -> devices, where any
        self.records = {
            name: Record(State.UNKNOWN, c.vram_resident_mib, c.pinned, on_change=self._changed)
            for name, c in config.consumers.items()
        }
        # Sizes per (consumer, model identity) seen while resident: better than any file size.
        self.seen_model_mib: dict[tuple[str, str], int] = {}
        # How each upstream spells a model it listed as resident, per (consumer, identity):
        # what its unload and load calls are sent (model_names).
        self.spellings: dict[tuple[str, str], str] = {}
        # Held while residency changes (evict, load): a reconciliation in the background reads
        # meanwhile but takes nothing in, since the change may be half done.
        self.changing = asyncio.Lock()
        # Clock time each consumer (or one of its models) was last seen letting go by itself
        # or by a client: its memory may still show as used for a while (the driver's lag).
        self.let_go_at: dict[str, float] = {}
        # Consumers a client has just asked to unload (client_unloads): the reason they show.
        self.client_unloading: set[str] = set()

    # -- figures --------------------------------------------------------------------------------

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
        broker has not seen both of are left out (the scheduler treats them as unknown). A
        consumer without a load call (ComfyUI) loads inside its first job: its figure is its
        unload alone, and the scheduler adds what its first job after a swap takes longer
        than its other jobs (SchedulerCore.schedule)."""
        costs: dict[str, float] = {}
        for name, r in self.records.items():
            if r.last_unload_s is None:
                continue
            if r.last_load_s is not None:
                costs[name] = r.last_unload_s + r.last_load_s
            elif not self.adapters[name].has_load:
                costs[name] = r.last_unload_s
        return costs

    def model_cost_mib(self, name: str, model: str) -> int:
        """VRAM one model of a per-model consumer needs: the registry's figure, else what the
        broker saw it hold, else the upstream's listed size (plus the cache), else the
        consumer's declared cost (its largest model)."""
        entry = self.model_entry(name, model)
        if entry is not None and entry.vram_mib is not None:
            return entry.vram_mib
        target = self.model_key(name, model) or model
        seen = self.seen_model_mib.get((name, target))
        if seen is not None:
            return seen
        listed = self._model_size(name, target)
        if listed is not None:
            return int(listed * FILE_SIZE_FACTOR)
        return self.config.consumers[name].vram_resident_mib

    def model_key(self, name: str, model: str | None) -> str | None:
        """The identity of `model` on `name`'s upstream (model_names), under which its records
        are kept: an alias resolved, Ollama's implicit tag and namespace added (so a job for
        "llama3" finds the resident "llama3:latest", however the upstream spells it)."""
        if model is None:
            return None
        entry = self.model_entry(name, model)
        return self.adapters[name].model_key(entry.name if entry is not None else model)

    def model_entry(self, name: str, model: str) -> ModelEntry | None:
        """The registry's entry for `model` as a client names it (an alias too) or as the
        upstream lists it: the registry's `llama3` is Ollama's `llama3:latest`."""
        return registry_entry(self.config.consumers[name], model)

    def upstream_name(self, name: str, key: str) -> str:
        """How `name`'s upstream spells the model whose identity is `key` (as it last listed
        it resident; else the identity itself)."""
        return self.spellings.get((name, key), key)

    def busy(self, name: str) -> bool:
        return self._in_flight(name) > 0

    async def read_gpu(self) -> GpuReading:
        reading = await self.reader.read()
        self.last_reading = reading
        if reading.ok:
            for name, record in self.records.items():
                record.measured_mib = self.measure(name, reading)
            if self.multi_device:
                self._check_devices(reading)
        return reading

    def _check_devices(self, reading: GpuReading) -> None:
        """A consumer whose processes hold memory on a device it did not declare is reported
        (an event and a warning when it is first seen there, and /v1/status), never accepted
        silently: its jobs may run beside another consumer's on that card."""
        for name in self.records:
            found = tuple(misplaced_devices(self, name, reading))
            if found != self.undeclared.get(name, ()):
                self.undeclared[name] = found
                if found:
                    log.warning("%s has processes on undeclared GPU(s) %s", name, ", ".join(found))
                self._emit("device.undeclared", consumer=name, devices=list(found))

    def measure(self, name: str, reading: GpuReading, config: Config | None = None) -> int | None:
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

    @property
    def multi_device(self) -> bool:
        return len(self.uuids) > 1

    def headroom_for(self, target: str, reading: GpuReading, exclude: str | None = None) -> int:
        """The headroom `target` sees: on a box with several GPUs, the least of its devices'
        (it may take its whole cost on any of them); else `headroom_mib`."""
        if not self.multi_device:
            return self.headroom_mib(reading, exclude)
        return min(headroom_on(self, reading, d, exclude) for d in self.bound[target])

    def outside_processes(self, reading: GpuReading) -> list[str]:
        """GPU processes that belong to no consumer, as "name (N MiB)": a training run, a game."""
        patterns = [p for c in self.config.consumers.values() for p in c.gpu_processes]
        return [
            f"{p.name} ({p.used_mib} MiB)" if p.used_mib is not None else p.name
            for p in reading.processes
            if not any(pattern in p.name for pattern in patterns)
        ]

    # -- what the planner sees ---------------------------------------------------------------

    def units(self, target: str, model: str | None) -> list[Resident]:
        """What may be evicted for `target`: every other consumer holding memory, per model
        where it is tracked per model; with `model`, also the target's own other models."""
        out = []
        for name, r in self.records.items():
            if r.state not in HOLDS_MEMORY or (name == target and model is None):
                continue
            # Without an unload call nothing can evict it: as good as pinned.
            pinned = r.pinned or not self.adapters[name].can_unload
            cooling = self.cooling_down(name)
            busy = r.busy_outside or cooling
            why = (
                "busy outside the broker"
                if r.busy_outside
                else "its last unload is not confirmed yet"
                if cooling
                else "busy"
            )
            coexists = name == target or self.config.coexist(name, target)
            if self.adapters[name].per_model and r.models:
                for m, unit in r.models.items():
                    if name == target and m == model:
                        continue
                    out.append(
                        Resident(
                            name=f"{name}{UNIT_SEPARATOR}{m}",
                            cost_mib=unit.cost_mib,
                            last_used=_lru(unit.last_used, r.last_used),
                            pinned=pinned,
                            busy=busy or unit.in_flight > 0,
                            why_busy=why,
                            coexists=coexists,
                        )
                    )
            elif name != target:
                out.append(
                    Resident(
                        name=name,
                        cost_mib=r.cost_mib,
                        last_used=_lru(r.last_used, None),
                        pinned=pinned,
                        busy=busy or self.busy(name),
                        why_busy=why,
                        coexists=coexists,
                    )
                )
        return out

    def cooling_down(self, name: str) -> bool:
        """For one unload_timeout_s after an unconfirmed eviction the consumer is treated as in
        the way (like a busy one): jobs that need its room fail fast, retryable, instead of
        each holding the lease for another unload_timeout_s on the same stuck unload."""
        failed_at = self.records[name].unload_failed_at
        timeout_s = self.config.consumers[name].unload_timeout_s
        return failed_at is not None and self.clock.now() - failed_at < timeout_s

    # -- reconciling ----------------------------------------------------------------------------

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
        reports = await _ask(adapters, names)
        out = {}
        for name, report in zip(names, reports, strict=True):
            c = config.consumers[name]
            record = Record(State.UNKNOWN, c.vram_resident_mib, c.pinned, on_change=self._changed)
            record.measured_mib = self.measure(name, reading, config)
            record.detail = "no residency probe or GPU figure"
            self._apply(name, record, report, at_start=True)
            out[name] = record
        return out

    async def reconcile(
        self, names: list[str] | None = None, *, changing: bool = False
    ) -> GpuReading:
        """Re-read the residency of `names` (default: all) from their upstreams and the GPU,
        and take in what changed, unless a residency change is under way (`changing`: the
        caller is that change). Answers the GPU reading it used."""
        candidates = list(self.records) if names is None else names
        candidates = [n for n in candidates if self._settled(n)]
        generations = {n: self.records[n].generation for n in candidates}
        reading, reports = await asyncio.gather(self.read_gpu(), _ask(self.adapters, candidates))
        if self.changing.locked() and not changing:
            return reading
        for name, report in zip(candidates, reports, strict=True):
            record = self.records.get(name)  # a reload may have removed it meanwhile
            if record is None or record.generation != generations[name] or not self._settled(name):
                continue
            self._apply(name, record, report, at_start=False)
        return reading

    def _settled(self, name: str) -> bool:
        record = self.records.get(name)
        return record is not None and record.state not in (State.LOADING, State.UNLOADING)

    def _apply(
        self, name: str, record: Record, report: ResidencyReport | BaseException, *, at_start: bool
    ) -> None:
        if isinstance(report, BaseException):
            if at_start:
                record.detail = f"residency probe failed: {report}"
            else:
                log.debug("%s: residency probe failed: %s", name, report)
            return
        was_busy_outside, record.busy_outside = record.busy_outside, report.busy
        # Per-model upstreams report their models' sizes, which the models themselves carry.
        record.reported_mib = report.held_mib if report.models is None else None
        busy = self.busy(name)
        if report.models is not None:
            gone = self._take_models(name, record, report.models)
            if gone:
                self.let_go_at[name] = self.clock.now()
            if gone and report.resident and record.state is State.RESIDENT:
                # Some of its models left, others stay: no change of state, but one to see.
                self._models_changed(name, record, gone)
        resident = report.resident
        detail = report.detail
        if resident is None and record.measured_mib is not None:
            # Its upstream cannot tell; its processes on the GPU can.
            resident = record.measured_mib > residual_allowance_mib(record.declared_mib)
            detail = f"GPU reading: {record.measured_mib} MiB"
        if report.busy and not resident and report.held_mib != 0:
            # Work posted around the broker runs or waits on it: it holds its model, or is about
            # to load it. Counted as resident (and busy: not evicted) before it allocates.
            # Not where the upstream says it holds no card memory at all (a CPU ComfyUI).
            resident = True
        if resident and record.state is State.UNLOADED:
            self.counters.outside_loads += 1
            transition(name, record, State.RESIDENT, f"{OUTSIDE} ({detail})")
        elif resident and record.state is State.UNKNOWN:
            transition(name, record, State.RESIDENT, detail or "found resident")
        elif resident is False and record.state is State.UNKNOWN:
            transition(name, record, State.UNLOADED, detail or "found unloaded")
        elif resident is False and record.state is State.RESIDENT and not busy:
            self.let_go_at[name] = self.clock.now()
            how = "unloaded by a client" if name in self.client_unloading else "left by itself"
            transition(name, record, State.UNLOADED, f"{how} ({detail or 'idle'})")
        elif resident and record.detail.startswith(OUTSIDE) and detail:
            record.detail = f"{OUTSIDE} ({detail})"  # what it holds now, not when first seen
        elif detail and (report.busy or was_busy_outside):
            # Work around the broker runs, or has just ended: the detail says what runs and
            # holds now, not what did when the record last changed state.
            record.detail = detail

    def _take_models(
        self, name: str, record: Record, reported: Mapping[str, int | None]
    ) -> list[str]:
        """The upstream's list of resident models replaces the record's, except models with
        the broker's jobs on them (still loading, they may not be listed yet). Answers the
        models that left."""
        models = {}
        for listed, size in reported.items():
            model = self.adapters[name].model_key(listed)  # its identity (model_names)
            self.spellings[(name, model)] = listed
            if size is not None:
                self.seen_model_mib[(name, model)] = size
            known = record.models.get(model)
            cost = size if size is not None else self.model_cost_mib(name, model)
            models[model] = ModelRecord(
                cost, known.last_used if known else None, known.in_flight if known else 0
            )
        for model, known in record.models.items():
            if model not in models and known.in_flight > 0:
                models[model] = known
        # Models it listed before and no longer does (not one a job named that never loaded).
        gone = sorted(m for m in set(record.models) - set(models) if (name, m) in self.spellings)
        if models.keys() != record.models.keys():
            record.generation += 1
        record.models = models
        return gone

    def _models_changed(self, name: str, record: Record, gone: list[str]) -> None:
        how = "unloaded by a client" if name in self.client_unloading else "left by itself"
        self._emit(
            "residency.changed",
            consumer=name,
            previous=str(record.state),
            residency=str(record.state),
            reason=f"{', '.join(gone)} {how}",
            resident_models=sorted(record.models),
            vram_mib=record.cost_mib,
        )

    def reconfigure(
        self,
        config: Config,
        adapters: Mapping[str, ConsumerAdapter],
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
        self.config, self.adapters = config, adapters
        self.bound = binding(config, self.uuids)

    # -- the broker's jobs ----------------------------------------------------------------------

    def job_started(self, name: str, model: str | None) -> None:
        record = self.records.get(name)
        if record is not None and model is not None and model in record.models:
            record.models[model].in_flight += 1

    def job_finished(self, name: str, model: str | None) -> None:
        """Last used (LRU) is when a job ended; gone if a reload removed it meanwhile."""
        record = self.records.get(name)
        if record is None:
            return
        now = self.clock.now()
        record.last_used = now
        unit = record.models.get(model) if model is not None else None
        if unit is not None:
            unit.in_flight = max(0, unit.in_flight - 1)
            unit.last_used = now


async def _ask(
    adapters: Mapping[str, ConsumerAdapter], names: list[str]
) -> list[ResidencyReport | BaseException]:
    return await asyncio.gather(*(adapters[n].residency() for n in names), return_exceptions=True)


def unit_consumer(unit: str) -> str:
    return unit.partition(UNIT_SEPARATOR)[0]


def _lru(*times: float | None) -> float:
    """LRU sort key: the first known time; never used sorts first."""
    return next((t for t in times if t is not None), float("-inf"))
