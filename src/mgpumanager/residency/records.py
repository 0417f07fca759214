"""Residency records and their state machine: the one place a consumer's residency changes.

States and what moves a record between them (docs/residency.md has the same table with the
reasoning behind each row)::

    from        to          trigger
    unknown     resident    a probe (start-up, reload) finds it holding memory
    unknown     unloaded    a probe finds it holding nothing
    unknown     loading     a job needs it: the broker loads it over whatever it held
    unknown     unloading   an eviction or admin unload of a consumer nobody could read
    unloaded    loading     a job needs it
    unloaded    resident    reconciliation finds it holding memory: loaded outside the broker
    unloaded    unloading   an admin unload, whatever the record says (it may be wrong)
    loading     resident    its load call returned and its health passed (or: lazy load)
    loading     unknown     the load failed, timed out or was cut off (it may hold memory)
    resident    unloading   an eviction or admin unload starts
    resident    unloaded    it left by itself (Ollama's keep_alive ran out)
    resident    unknown     an unload of one of its models was not confirmed
    unloading   unloaded    the upstream let go and the GPU reading confirmed it
    unloading   unknown     the unload failed, was not confirmed in time, or was cut off

`unknown` counts as holding its memory (the safe side) until an unload confirms otherwise.
Everything else is refused as a bug (`IllegalTransition`).

Ollama and speaches are also tracked per model: `Record.models` holds the models resident now,
each with its cost, so that a job for a resident model evicts nothing and a small model does
not cost the consumer's largest.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger("mgpumanager.residency")


class State(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    RESIDENT = "resident"
    UNLOADING = "unloading"
    UNKNOWN = "unknown"


# States whose memory counts as taken (unknown: the safe side, until an unload confirms).
HOLDS_MEMORY = frozenset({State.LOADING, State.RESIDENT, State.UNLOADING, State.UNKNOWN})

TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.UNKNOWN: frozenset({State.RESIDENT, State.UNLOADED, State.LOADING, State.UNLOADING}),
    State.UNLOADED: frozenset({State.LOADING, State.RESIDENT, State.UNLOADING}),
    State.LOADING: frozenset({State.RESIDENT, State.UNKNOWN}),
    State.RESIDENT: frozenset({State.UNLOADING, State.UNLOADED, State.UNKNOWN}),
    State.UNLOADING: frozenset({State.UNLOADED, State.UNKNOWN}),
}


class IllegalTransition(RuntimeError):
    """A residency change the state machine does not allow: a bug in the caller."""


@dataclass
class ModelRecord:
    """One resident model of a per-model consumer."""

    cost_mib: int
    last_used: float | None = None
    in_flight: int = 0  # jobs of the broker on it now: never evicted meanwhile


@dataclass
class Record:
    state: State
    declared_mib: int
    pinned: bool
    measured_mib: int | None = None
    last_used: float | None = None  # clock time; LRU order
    last_unload_s: float | None = None
    last_load_s: float | None = None
    busy_outside: bool = False
    unload_failed_at: float | None = None  # clock time of the last unconfirmed eviction
    detail: str = ""  # why it is in its state (shown in /v1/status)
    reported_mib: int | None = None  # what the upstream says it holds (ComfyUI, Ollama)
    models: dict[str, ModelRecord] = field(default_factory=dict)  # per-model consumers
    in_flight: int = 0  # the broker's jobs running on it now
    # Bumped by every change; a reconciliation that read the upstream before a change made
    # meanwhile must not overwrite it with what it read.
    generation: int = 0
    # Told of every change of state, after it (name, record, previous state): the event
    # stream's residency.changed. A plain function, so that dataclasses.asdict copies it as is.
    on_change: Callable[[str, Record, State], None] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def cost_mib(self) -> int:
        """What planning assumes it holds: its models' costs where it is tracked per model
        (else the declared cost), or more where the GPU or the upstream says more."""
        base = sum(m.cost_mib for m in self.models.values()) if self.models else self.declared_mib
        return max(base, self.measured_mib or 0, self.reported_mib or 0)

    @property
    def cost_source(self) -> str:
        """Where `cost_mib` comes from: `measured` (the GPU's per-process figures), `reported`
        (the upstream's own), or `declared` (the registry's, per model where it has models)."""
        cost = self.cost_mib
        if self.measured_mib and self.measured_mib == cost:
            return "measured"
        if self.reported_mib and self.reported_mib == cost:
            return "reported"
        return "declared"


def transition(name: str, record: Record, to: State, reason: str) -> None:
    """Move `record` to `to`, or raise IllegalTransition; logs the change with its reason."""
    if to not in TRANSITIONS[record.state]:
        raise IllegalTransition(f"{name}: {record.state} -> {to} is not allowed ({reason})")
    log.info("%s: %s -> %s (%s)", name, record.state, to, reason)
    previous = record.state
    record.state, record.detail = to, reason
    record.generation += 1
    if to is State.UNLOADED:
        record.models.clear()
        record.reported_mib = None
    if record.on_change is not None:
        record.on_change(name, record, previous)
