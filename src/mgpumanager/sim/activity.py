"""Who ran GPU work when, as measured at the (fake) upstreams.

A real GPU does not tell you which service's kernels overlapped; the fakes do. Each fake wraps
every unit of GPU work (a generate, a synthesis, a ComfyUI prompt execution, a transcription) in
``begin``/``end`` on an :class:`ActivityLog`. Broker tests then assert that work of different
consumers never overlapped (``overlapping_pairs() == []``) and that one consumer never ran
more jobs at once than its ``max_concurrency`` (``max_concurrency(name)``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Interval:
    consumer: str
    start: float
    end: float

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def overlap_s(self, other: Interval) -> float:
        return max(0.0, min(self.end, other.end) - max(self.start, other.start))


class ActivitySink(Protocol):
    """What a fake records its work into: an ActivityLog here, or one over HTTP."""

    async def work_begin(self, consumer: str) -> int: ...

    async def work_end(self, token: int) -> None: ...


class ActivityLog:
    """Work intervals on ``time.monotonic`` (or an injected clock); one event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens = itertools.count(1)
        self._open: dict[int, tuple[str, float]] = {}
        self._done: list[Interval] = []

    def begin(self, consumer: str) -> int:
        token = next(self._tokens)
        self._open[token] = (consumer, self._clock())
        return token

    def end(self, token: int) -> None:
        """Close the interval; an unknown or already closed token is ignored."""
        started = self._open.pop(token, None)
        if started is not None:
            self._done.append(Interval(started[0], started[1], self._clock()))

    async def work_begin(self, consumer: str) -> int:
        return self.begin(consumer)

    async def work_end(self, token: int) -> None:
        self.end(token)

    @property
    def active_count(self) -> int:
        return len(self._open)

    def busy(self) -> bool:
        return bool(self._open)

    def active(self) -> list[str]:
        """Consumers with work running now (one entry per open interval)."""
        return [consumer for consumer, _ in self._open.values()]

    def intervals(self, *, include_open: bool = False) -> list[Interval]:
        """Finished intervals in the order they ended; open ones end "now" if included."""
        out = list(self._done)
        if include_open:
            now = self._clock()
            out.extend(Interval(c, s, now) for c, s in self._open.values())
        return out

    def overlapping_pairs(self, *, include_open: bool = True) -> list[tuple[Interval, Interval]]:
        """Pairs of intervals of DIFFERENT consumers that overlapped by more than zero time."""
        spans = sorted(self.intervals(include_open=include_open), key=lambda i: i.start)
        pairs: list[tuple[Interval, Interval]] = []
        for n, a in enumerate(spans):
            for b in spans[n + 1 :]:
                if b.start >= a.end:
                    break
                if a.consumer != b.consumer and a.overlap_s(b) > 0:
                    pairs.append((a, b))
        return pairs

    def max_overlap_between_consumers(self) -> float:
        """The longest overlap (seconds) of two different consumers' work; 0.0 if none."""
        return max((a.overlap_s(b) for a, b in self.overlapping_pairs()), default=0.0)

    def max_concurrency(self, consumer: str | None = None) -> int:
        """Most intervals (of ``consumer``, or of anyone) open at the same moment."""
        edges: list[tuple[float, int]] = []
        for i in self.intervals(include_open=True):
            if consumer is None or i.consumer == consumer:
                # An end sorts before a start at the same instant: touching is not overlapping.
                edges.extend(((i.start, 1), (i.end, -1)))
        edges.sort(key=lambda e: (e[0], e[1]))
        level = peak = 0
        for _, step in edges:
            level += step
            peak = max(peak, level)
        return peak

    def clear(self) -> None:
        self._done.clear()


@asynccontextmanager
async def recording(sink: ActivitySink | None, consumer: str) -> AsyncIterator[None]:
    """``async with recording(log, "ollama"):`` around one unit of GPU work."""
    if sink is None:
        yield
        return
    token = await sink.work_begin(consumer)
    try:
        yield
    finally:
        await sink.work_end(token)
