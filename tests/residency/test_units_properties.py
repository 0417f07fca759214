"""Property tests of eviction planning over per-model units: `Residency._units` turns records
(whole consumers, and the models of per-model consumers) into the planner's residents, and the
plan must never evict what was not needed, never a pinned or busy unit, and always find room
when the evictable units free enough."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import consumer, make_config
from mgpumanager.clock import FakeClock
from mgpumanager.residency.evict import Residency
from mgpumanager.residency.planner import CannotFit, Evict, plan_eviction
from mgpumanager.residency.records import ModelRecord, State
from mgpumanager.residency.view import UNIT_SEPARATOR

NAMES = ["a", "b", "c", "t"]  # t: the target


class Adapter:
    def __init__(self, per_model: bool, can_unload: bool) -> None:
        self.per_model = per_model
        self.can_unload = can_unload


class Card:
    backend = "fake"
    total_mib = 24000

    async def read(self) -> Any:
        raise AssertionError("no readings here")


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Residency, str | None, int, int]:
    per_model = {n: draw(st.booleans()) for n in NAMES}
    config = make_config(
        {
            n: consumer(
                f"http://127.0.0.1:{i + 1}",
                vram_resident_mib=draw(st.integers(100, 9000)),
                pinned=draw(st.integers(0, 5)) == 0,
            )
            for i, n in enumerate(NAMES)
        }
    )
    adapters = {n: Adapter(per_model[n], draw(st.integers(0, 6)) > 0) for n in NAMES}
    residency = Residency(config, adapters, Card(), FakeClock())  # type: ignore[arg-type]
    for n, record in residency.view.records.items():
        record.state = draw(st.sampled_from([State.RESIDENT, State.UNLOADED, State.UNKNOWN]))
        record.last_used = float(draw(st.integers(0, 5)))
        record.busy_outside = draw(st.integers(0, 6)) == 0
        if per_model[n] and record.state is State.RESIDENT:
            for m in draw(st.lists(st.sampled_from("xyz"), unique=True, max_size=3)):
                record.models[m] = ModelRecord(
                    draw(st.integers(50, 8000)),
                    float(draw(st.integers(0, 5))),
                    in_flight=int(draw(st.integers(0, 5)) == 0),
                )
    target = residency.view.records["t"]
    model = "w" if per_model["t"] and draw(st.booleans()) else None
    if model is not None and target.state is State.RESIDENT and draw(st.booleans()):
        model = next(iter(target.models), model)  # sometimes a model it has already
    need = draw(st.integers(0, 14000))
    headroom = draw(st.integers(-3000, 10000))
    return residency, model, need, headroom


@settings(max_examples=400, deadline=None)
@given(worlds())
def test_plans_over_units_evict_only_what_is_needed_and_never_pinned_or_busy(
    world: tuple[Residency, str | None, int, int],
) -> None:
    residency, model, need, headroom = world
    inside = model is not None and residency.view.records["t"].state is State.RESIDENT
    units = residency.view.units("t", model if inside else None)
    by_name = {u.name: u for u in units}
    assert len(by_name) == len(units)  # unit names are unique
    # The target's own job model is never a candidate; outside a resident target, none of it.
    for u in units:
        consumer_name, _, unit_model = u.name.partition(UNIT_SEPARATOR)
        if consumer_name == "t":
            assert inside and unit_model != model
    capacity = residency.view.capacity_mib
    plan = plan_eviction(
        target="t",
        target_cost_mib=need,
        headroom_mib=headroom,
        capacity_mib=capacity,
        residents=units,
    )
    evictable = [u for u in units if not (u.pinned or u.busy)]
    reachable = headroom + sum(u.cost_mib for u in evictable)
    if isinstance(plan, Evict):
        victims = [by_name[v] for v in plan.victims]
        assert all(not (v.pinned or v.busy) for v in victims)
        freed = sum(v.cost_mib for v in victims)
        assert headroom + freed >= need
        for v in victims:  # each victim was needed
            assert headroom + freed - v.cost_mib < need
        if need <= headroom:
            assert victims == []
    else:
        assert isinstance(plan, CannotFit)
        assert need > capacity or reachable < need
        assert plan.retryable == (need <= capacity)


def test_a_busy_model_is_never_a_candidate_but_its_idle_sibling_is() -> None:
    config = make_config({n: consumer(f"http://127.0.0.1:{i + 1}") for i, n in enumerate("ot")})
    adapters = {"o": Adapter(True, True), "t": Adapter(False, True)}
    residency = Residency(config, adapters, Card(), FakeClock())  # type: ignore[arg-type]
    o = residency.view.records["o"]
    o.state = State.RESIDENT
    o.models = {"busy": ModelRecord(5000, 1.0, in_flight=1), "idle": ModelRecord(5000, 2.0)}
    units = {u.name: u for u in residency.view.units("t", None)}
    assert units["o/busy"].busy and not units["o/idle"].busy
    plan = plan_eviction(
        target="t",
        target_cost_mib=5000,
        headroom_mib=0,
        capacity_mib=23000,
        residents=list(units.values()),
    )
    assert plan == Evict(("o/idle",), 5000)
