"""ActivityLog: overlaps between different consumers and per-consumer concurrency."""

from __future__ import annotations

from mgpumanager.clock import FakeClock
from mgpumanager.sim import ActivityLog, recording


def test_overlap_between_consumers_and_concurrency() -> None:
    clock = FakeClock(0.0)
    log = ActivityLog(clock.now)
    a1 = log.begin("ollama")
    clock.advance(1)
    a2 = log.begin("ollama")  # same consumer overlapping itself: concurrency, not a clash
    clock.advance(1)
    log.end(a1)
    log.end(a2)
    b = log.begin("comfyui")  # starts exactly when ollama ended: touching is not overlapping
    clock.advance(2)
    c = log.begin("mvoice")
    clock.advance(0.5)
    log.end(b)
    clock.advance(1)
    log.end(c)
    log.end(c)  # ignored
    pairs = log.overlapping_pairs()
    assert [(p.consumer, q.consumer) for p, q in pairs] == [("comfyui", "mvoice")]
    assert log.max_overlap_between_consumers() == 0.5
    assert log.max_concurrency("ollama") == 2
    assert log.max_concurrency("comfyui") == 1
    assert log.max_concurrency() == 2
    assert [i.duration_s for i in log.intervals()] == [2.0, 1.0, 2.5, 1.5]


def test_open_intervals_count_until_now() -> None:
    clock = FakeClock(0.0)
    log = ActivityLog(clock.now)
    log.begin("a")
    clock.advance(1)
    log.begin("b")
    clock.advance(1)
    assert log.busy() and log.active_count == 2
    assert len(log.overlapping_pairs()) == 1
    assert log.overlapping_pairs(include_open=False) == []
    assert log.intervals() == []


async def test_recording_context_manager() -> None:
    log = ActivityLog()
    async with recording(log, "whisper"):
        assert log.active() == ["whisper"]
    async with recording(None, "nobody"):
        pass
    assert [i.consumer for i in log.intervals()] == ["whisper"]
    assert not log.busy()
