"""Where each waiting job stands: its position in the queue and when it is expected to start.

Read by /v1/status, the events and the frames a waiting streamed request gets. The core's
`waiting_estimates` sorts the whole queue, so one reading serves every waiting job for
`FRESH_S`: a thousand waiting streams asking once a second cost a few sorts a second, not a
thousand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mgpumanager.clock import Clock
from mgpumanager.scheduling.core import SchedulerCore

# How long one reading of the whole queue stands.
FRESH_S = 0.25
REREADS_PER_READING = 8


@dataclass(frozen=True, slots=True)
class WaitEstimate:
    """`position`: jobs expected to start before it (0: it is next); `expected_start_s`:
    seconds from now, None while a run time it depends on is not known."""

    position: int
    expected_start_s: float | None


class QueueWaits:
    """The estimates of the waiting jobs, read again when older than FRESH_S. A job queued
    since the last reading makes it read again at once, at most REREADS_PER_READING times per
    FRESH_S (a burst of arrivals costs a few sorts, not one per arrival); past that it is
    placed behind the jobs read, without an expected start, until the next reading."""

    def __init__(
        self,
        core: SchedulerCore,
        clock: Clock,
        swap_costs: Callable[[], Mapping[str, float]] = dict,
    ) -> None:
        self._core = core
        self._clock = clock
        self._swap_costs = swap_costs
        self._read_at: float | None = None
        self._table: dict[int, WaitEstimate] = {}
        self._rereads = 0

    def all(self) -> dict[int, WaitEstimate]:
        """Every waiting job's estimate, by job id, as of now (for /v1/status)."""
        now = self._clock.now()
        if (
            self._read_at is None
            or now - self._read_at > FRESH_S
            or self._table.keys() != self._core.waiting.keys()
        ):
            self._refresh(now)
        return self._table

    def of(self, job_id: int) -> WaitEstimate | None:
        """`job_id`'s estimate; None once it waits no more."""
        if job_id not in self._core.waiting:
            return None
        now = self._clock.now()
        if self._read_at is None or now - self._read_at > FRESH_S:
            self._rereads = 0
            self._refresh(now)
        found = self._table.get(job_id)
        if found is None and self._rereads < REREADS_PER_READING:
            self._rereads += 1
            self._refresh(now)
            found = self._table.get(job_id)
        return found or WaitEstimate(len(self._table), None)

    def _refresh(self, now: float) -> None:
        estimates = self._core.waiting_estimates(self._swap_costs())
        self._table = {job.id: WaitEstimate(i, start) for i, (job, start) in enumerate(estimates)}
        self._read_at = now
