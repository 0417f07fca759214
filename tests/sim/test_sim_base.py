"""The fakes' shared plumbing: paced steps of simulated work."""

from __future__ import annotations

from mgpumanager.clock import FakeClock
from mgpumanager.sim._base import paced


async def test_paced_steps_aim_at_their_deadlines_so_lateness_does_not_add_up() -> None:
    clock = FakeClock(100.0)
    asked: list[float] = []

    async def late_sleep(seconds: float) -> None:
        asked.append(seconds)
        clock.advance(max(0.0, seconds) + 0.001)  # every wake-up 1 ms late, as a busy loop is

    steps = [step async for step in paced(0.4, 4, clock=clock.now, sleep=late_sleep)]

    assert steps == [0, 1, 2, 3]
    # The first wait is the full slice; each later one is shortened by the lateness before it.
    assert abs(asked[0] - 0.1) < 1e-9
    assert all(abs(s - 0.099) < 1e-9 for s in asked[1:])
    assert abs(clock.now() - 100.401) < 1e-9  # one step's lateness, not four


async def test_paced_with_no_steps_still_waits_the_whole_time_once() -> None:
    clock = FakeClock(0.0)

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    assert [s async for s in paced(0.2, 0, clock=clock.now, sleep=sleep)] == [0]
    assert abs(clock.now() - 0.2) < 1e-12
