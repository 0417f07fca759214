"""The eviction plan on a box with several GPUs (residency/per_device.py): per device of the
target, the union of victims, each victim needed, devices the target does not use untouched."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mgpumanager.residency.per_device import plan_on_devices
from mgpumanager.residency.planner import CannotFit, Evict, Resident

CAPACITY = 16_000


def test_room_on_gpu0_evicts_only_there() -> None:
    plan = plan_on_devices(
        target="mvoice",
        need_mib={"g0": 6000},
        headroom_mib={"g0": 1500},
        capacity_mib={"g0": CAPACITY},
        residents={"g0": [Resident("ollama", 14000, 1.0)]},
    )
    assert plan == Evict(("ollama",), 14000)


def test_a_victim_no_card_needs_in_the_end_stays() -> None:
    both = Resident("speech", 3000, 1.0)  # on both cards
    plan = plan_on_devices(
        target="big",
        need_mib={"g0": 8000, "g1": 8000},
        headroom_mib={"g0": 9000, "g1": 1000},
        capacity_mib={"g0": CAPACITY, "g1": CAPACITY},
        residents={"g0": [both], "g1": [both, Resident("comfyui", 12000, 2.0)]},
    )
    # g0 has room; on g1 the least recently used (speech) goes first, then comfyui, after
    # which speech was not needed: it stays, on both cards.
    assert isinstance(plan, Evict) and plan.victims == ("comfyui",)


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, int], dict[str, list[Resident]]]:
    devices = [f"g{i}" for i in range(draw(st.integers(1, 4)))]
    names = [f"r{i}" for i in range(draw(st.integers(0, 5)))]
    cost = {n: draw(st.integers(100, 9000)) for n in names}
    where = {n: draw(st.sets(st.sampled_from(devices), min_size=1)) for n in names}
    used = draw(st.sets(st.sampled_from(devices), min_size=1))  # the target's devices
    residents = {
        d: [Resident(n, cost[n], float(i)) for i, n in enumerate(names) if d in where[n]]
        for d in used
    }
    headroom = {
        d: CAPACITY - 512 - sum(r.cost_mib for r in residents[d]) - draw(st.integers(0, 3000))
        for d in used
    }
    need = {d: draw(st.integers(100, CAPACITY - 512)) for d in used}
    return need, headroom, residents


@settings(max_examples=300, deadline=None)
@given(cases())
def test_every_victim_is_needed_and_every_card_fits(
    case: tuple[dict[str, int], dict[str, int], dict[str, list[Resident]]],
) -> None:
    need, headroom, residents = case
    plan = plan_on_devices(
        target="t",
        need_mib=need,
        headroom_mib=headroom,
        capacity_mib=dict.fromkeys(need, CAPACITY - 512),
        residents=residents,
    )
    if isinstance(plan, CannotFit):
        # Even every resident on the card is not enough there.
        assert any(headroom[d] + sum(r.cost_mib for r in residents[d]) < need[d] for d in need)
        return
    on_target = {r.name for rs in residents.values() for r in rs}
    assert set(plan.victims) <= on_target  # nothing of a card the target does not use
    assert len(set(plan.victims)) == len(plan.victims)

    def fits(victims: set[str]) -> bool:
        return all(
            headroom[d] + sum(r.cost_mib for r in residents[d] if r.name in victims) >= need[d]
            for d in need
        )

    assert fits(set(plan.victims))
    for v in plan.victims:
        assert not fits(set(plan.victims) - {v}), f"{v} was not needed"
