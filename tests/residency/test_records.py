"""The residency state machine, one transition at a time: a recording fake adapter, a fake GPU
reader and the fake clock drive `Residency` directly (no sockets, no sleeps). Each test names
the row of the transition table in records.py that it covers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from aiohttp import web

from conftest import consumer, make_config
from mgpumanager.clock import FakeClock
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import Config, ConsumerConfig, HttpCall
from mgpumanager.relay.job import JobSpec
from mgpumanager.residency.evict import Residency
from mgpumanager.residency.records import (
    TRANSITIONS,
    IllegalTransition,
    ModelRecord,
    Record,
    State,
    transition,
)
from mgpumanager.scheduling.lease import JobHandle
from mgpumanager.upstreams.adapters import HealthResult, ResidencyReport
from mgpumanager.upstreams.gpu import GpuReading

TOTAL_MIB = 24000


class FakeCard:
    """What each consumer holds; the reader reports used/free from it (no per-process data)."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    @property
    def backend(self) -> str:
        return "fake"

    @property
    def total_mib(self) -> int:
        return TOTAL_MIB

    async def read(self) -> GpuReading:
        used = sum(self.held.values())
        return GpuReading("fake", "fake card", TOTAL_MIB, used, TOTAL_MIB - used, 0)

    async def aclose(self) -> None:
        return None


@dataclass
class FakeAdapter:
    """Records every call; `script` decides how each call goes. A `ConsumerAdapter` of a
    consumer not tracked per model (like `BaseAdapter`'s defaults); it runs no jobs."""

    name: str
    config: ConsumerConfig
    card: FakeCard
    calls: list[str] = field(default_factory=list)
    reports: bool | None = None  # what residency() says (None: cannot tell)
    unload_error: BrokerError | None = None
    keeps_memory: bool = False  # unload answers but the memory never comes back
    load_error: BrokerError | None = None
    load_gate: asyncio.Event | None = None  # load waits for it (to cut it off)
    load_started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def has_load(self) -> bool:
        return True

    stops_process: ClassVar[bool] = False
    per_model: ClassVar[bool] = False

    @property
    def can_unload(self) -> bool:
        return True

    def path_for(self, kind: str) -> HttpCall:
        raise AssertionError("no jobs here")

    async def health(self) -> HealthResult:
        return HealthResult(True, "ok")

    async def residency(self) -> ResidencyReport:
        self.calls.append("residency")
        return ResidencyReport(self.reports, detail="fake report")

    async def unload(self) -> None:
        self.calls.append("unload")
        if self.unload_error is not None:
            raise self.unload_error
        if not self.keeps_memory:
            self.card.held.pop(self.name, None)

    async def unloaded(self) -> bool:
        return self.name not in self.card.held

    async def load(self) -> None:
        self.calls.append("load")
        self.load_started.set()
        if self.load_gate is not None:
            await self.load_gate.wait()
        if self.load_error is not None:
            raise self.load_error
        self.card.held[self.name] = self.config.vram_resident_mib

    def model_key(self, model: str) -> str:
        return model

    async def unload_model(self, model: str) -> None:
        raise BrokerError(ErrorCode.SCHEDULER_ERROR, f"{self.name} is not tracked per model")

    async def load_model(self, model: str) -> None:
        raise BrokerError(ErrorCode.SCHEDULER_ERROR, f"{self.name} is not tracked per model")

    def check_body(self, spec: JobSpec) -> None:
        raise AssertionError("no jobs here")

    async def forward(
        self, request: web.Request, spec: JobSpec, job: JobHandle
    ) -> web.StreamResponse:
        raise AssertionError("no jobs here")


class World:
    """Two consumers that cannot both fit: `a` (14000 MiB) and `b` (12000 MiB)."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.card = FakeCard()
        self.config: Config = make_config(
            {
                "a": consumer("http://127.0.0.1:1", vram_resident_mib=14000, unload_timeout_s=2),
                "b": consumer("http://127.0.0.1:2", vram_resident_mib=12000, unload_timeout_s=2),
            },
            gpu={"safety_margin_mib": 0},
        )
        self.adapters = {
            name: FakeAdapter(name, c, self.card) for name, c in self.config.consumers.items()
        }
        self.residency = Residency(
            self.config, self.adapters, self.card, self.clock, sleep=self.sleep
        )

    async def sleep(self, seconds: float) -> None:
        self.clock.advance(seconds)  # time passes only when the residency layer waits

    def state(self, name: str) -> State:
        return self.residency.view.records[name].state

    def set(self, name: str, state: State) -> None:
        """Put a record in `state` as its start (the table's own rows are tested separately)."""
        self.residency.view.records[name].state = state
        if state is State.RESIDENT:
            self.card.held[name] = self.config.consumers[name].vram_resident_mib


# -- the table ---------------------------------------------------------------------------------


def test_every_state_has_a_row_and_nothing_moves_to_itself() -> None:
    assert set(TRANSITIONS) == set(State)
    for source, targets in TRANSITIONS.items():
        assert source not in targets


@pytest.mark.parametrize(
    ("source", "target"),
    [(s, t) for s in State for t in State if t not in TRANSITIONS[s]],
)
def test_a_move_outside_the_table_is_refused_and_changes_nothing(
    source: State, target: State
) -> None:
    record = Record(source, 1000, pinned=False, detail="before")
    with pytest.raises(IllegalTransition):
        transition("x", record, target, "test")
    assert record.state is source and record.detail == "before"


def test_a_move_records_its_reason_as_the_detail(caplog: pytest.LogCaptureFixture) -> None:
    record = Record(State.UNLOADED, 1000, pinned=False)
    with caplog.at_level("INFO", logger="mgpumanager.residency"):
        transition("x", record, State.LOADING, "needed by a job")
    assert record.state is State.LOADING and record.detail == "needed by a job"
    assert "x: unloaded -> loading (needed by a job)" in caplog.text


# -- each row, driven through Residency ----------------------------------------------------------


@pytest.mark.parametrize(("reports", "expected"), [(True, State.RESIDENT), (False, State.UNLOADED)])
async def test_unknown_to_what_a_probe_finds(reports: bool, expected: State) -> None:
    """unknown -> resident / unloaded: start-up discovery asks each adapter."""
    world = World()
    assert world.state("a") is State.UNKNOWN
    world.adapters["a"].reports = reports
    await world.residency.view.discover()
    assert world.state("a") is expected
    assert world.state("b") is State.UNKNOWN  # could not tell, no GPU figure of its own


async def test_unknown_target_is_loaded_over_whatever_it_held() -> None:
    """unknown -> loading -> resident: a job for a consumer nobody could read."""
    world = World()
    world.set("b", State.UNLOADED)
    await world.residency.ensure_resident("a")
    assert world.state("a") is State.RESIDENT
    assert world.adapters["a"].calls[-1] == "load"
    assert world.residency.view.records["a"].detail == "loaded by the broker"


async def test_unknown_victim_is_unloaded_and_confirmed() -> None:
    """unknown -> unloading -> unloaded: `b` counts as taken until its unload is confirmed."""
    world = World()
    world.set("a", State.UNLOADED)
    await world.residency.ensure_resident("a")
    assert world.adapters["b"].calls.count("unload") == 1
    assert world.state("b") is State.UNLOADED
    assert world.state("a") is State.RESIDENT
    assert world.residency.view.counters.evictions == 1


async def test_unloaded_to_loading_to_resident() -> None:
    world = World()
    world.set("a", State.UNLOADED)
    world.set("b", State.UNLOADED)
    await world.residency.ensure_resident("b")
    assert world.state("b") is State.RESIDENT
    assert "unload" not in world.adapters["a"].calls  # nothing was in the way
    assert world.residency.view.counters.swaps == 1


async def test_resident_victim_is_evicted_for_the_target() -> None:
    """resident -> unloading -> unloaded, then the target loads: the card never holds both."""
    world = World()
    world.set("a", State.RESIDENT)
    world.set("b", State.UNLOADED)
    await world.residency.ensure_resident("b")
    assert world.state("a") is State.UNLOADED
    assert world.state("b") is State.RESIDENT
    assert world.card.held == {"b": 12000}
    [decision] = world.residency.decisions
    assert decision.victims == ("a",) and decision.target == "b"


async def test_resident_that_left_by_itself_is_not_evicted_again() -> None:
    """resident -> unloaded: its upstream says it holds nothing (keep_alive ran out)."""
    world = World()
    world.set("a", State.RESIDENT)
    world.set("b", State.UNLOADED)
    world.adapters["a"].reports = False
    world.card.held.pop("a")  # Ollama freed it on its own
    await world.residency.ensure_resident("b")
    assert "unload" not in world.adapters["a"].calls
    assert world.state("a") is State.UNLOADED
    assert world.residency.view.records["a"].detail.startswith("left by itself")
    assert world.residency.view.counters.evictions == 0


async def test_loading_to_unknown_when_the_load_fails() -> None:
    world = World()
    world.set("a", State.UNLOADED)
    world.set("b", State.UNLOADED)
    world.adapters["a"].load_error = BrokerError(ErrorCode.UPSTREAM_ERROR, "answered 500")
    with pytest.raises(BrokerError) as caught:
        await world.residency.ensure_resident("a")
    assert caught.value.code is ErrorCode.LOAD_FAILED
    assert world.state("a") is State.UNKNOWN  # it may hold part of its memory
    assert world.residency.view.counters.load_failures == 1


async def test_loading_to_unknown_when_the_load_is_cut_off() -> None:
    world = World()
    world.set("a", State.UNLOADED)
    world.set("b", State.UNLOADED)
    gate = world.adapters["a"].load_gate = asyncio.Event()
    task = asyncio.create_task(world.residency.ensure_resident("a"))
    await world.adapters["a"].load_started.wait()
    assert world.state("a") is State.LOADING
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert world.state("a") is State.UNKNOWN
    gate.set()


async def test_unloading_to_unknown_when_the_unload_call_fails() -> None:
    world = World()
    world.set("a", State.RESIDENT)
    world.set("b", State.UNLOADED)
    world.adapters["a"].unload_error = BrokerError(ErrorCode.UPSTREAM_ERROR, "answered 500")
    with pytest.raises(BrokerError) as caught:
        await world.residency.ensure_resident("b")
    assert caught.value.code is ErrorCode.EVICTION_FAILED
    assert world.state("a") is State.UNKNOWN
    assert world.state("b") is State.UNLOADED  # nothing was loaded over it
    assert "load" not in world.adapters["b"].calls


async def test_unloading_to_unknown_when_the_memory_does_not_come_back() -> None:
    """The unload answers, the GPU never shows the memory back: after unload_timeout_s on the
    fake clock the eviction fails and nothing is loaded (the OOM the broker exists to prevent)."""
    world = World()
    world.set("a", State.RESIDENT)
    world.set("b", State.UNLOADED)
    world.adapters["a"].keeps_memory = True
    started = world.clock.now()
    with pytest.raises(BrokerError) as caught:
        await world.residency.ensure_resident("b")
    assert caught.value.code is ErrorCode.EVICTION_FAILED
    assert world.clock.now() - started >= 2  # waited its unload_timeout_s, on the fake clock
    assert world.state("a") is State.UNKNOWN
    assert "load" not in world.adapters["b"].calls
    assert world.residency.view.counters.eviction_failures == 1


class PerModelAdapter(FakeAdapter):
    """A per-model fake (like Ollama): each model unloads on its own."""

    per_model = True

    def model_key(self, model: str) -> str:
        return model

    async def unload_model(self, model: str) -> None:
        self.calls.append(f"unload {model}")
        if self.unload_error is not None:
            raise self.unload_error


async def test_a_failed_model_unload_of_an_unknown_consumer_stays_retryable() -> None:
    """unknown stays unknown: `a` could not be read (say its /api/ps hangs) and still has two
    models on record; unloading one of them fails. The job gets eviction_failed (retryable),
    not an internal error, and `a` cools down so the next job does not try again at once."""
    world = World()
    a = world.adapters["a"] = PerModelAdapter("a", world.config.consumers["a"], world.card)
    world.residency.view.adapters = world.adapters
    record = world.residency.view.records["a"]
    record.state = State.UNKNOWN
    record.models = {"m1": ModelRecord(7000, 1.0), "m2": ModelRecord(7000, 2.0)}
    world.card.held["a"] = 14000
    world.set("b", State.UNLOADED)
    a.unload_error = BrokerError(ErrorCode.UPSTREAM_ERROR, "answered 500")
    a.reports = None  # it cannot tell
    with pytest.raises(BrokerError) as caught:
        await world.residency.ensure_resident("b")
    assert caught.value.code is ErrorCode.EVICTION_FAILED and caught.value.retryable
    assert world.state("a") is State.UNKNOWN
    assert record.unload_failed_at is not None
    assert world.residency.view.counters.eviction_failures == 1
    assert "load" not in world.adapters["b"].calls
