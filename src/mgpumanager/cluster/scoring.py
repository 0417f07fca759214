"""Which host takes a request: a pure function over the hosts' summaries, no I/O, no clock.

Each host's broker says what it holds in its `/v1/status`; `summarize` turns that document into
a `HostSummary`, and `rank_hosts` orders the hosts for one request, best first (the front
tries them in that order: the next one only where the request was never forwarded). For a
request that names a model, tiers first, then the tie-breaks inside a tier:

1. the model is resident (or reserved for it, below): fewest jobs in flight, then the most
   recently used;
2. it fits without eviction: the most headroom on the card;
3. it fits after evicting: the cheapest eviction, counted as the measured reload time of what
   must go (what was loaded may be wanted back);
4. it does not fit even then (pinned or busy residents hold the memory);

and the shortest queue breaks every tie that is left (then the host's name, so the order is
total). A request with no model (a model list, a pull) goes by the shortest queue alone.

Skipped outright: a host whose summary is older than `STALE_PERIODS` periods (its broker stopped
answering; it comes back with its next status), and one whose broker is not accepting work.

Soft reservations: when a cold request is sent to a host, `Reservations.reserve` remembers the
model there for a short time, and `rank_hosts` treats it as resident on that host, so that a
second cold request for the same model arriving before the first one's load shows in a status
goes to the same host instead of loading it on a second one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STALE_PERIODS = 3  # a host whose status is older than this many periods is skipped
RESERVATION_S = 30.0  # how long a cold request's host stays reserved for its model


@dataclass(frozen=True)
class ConsumerSummary:
    """One consumer of a host, as its broker reports it."""

    name: str
    type: str
    resident: bool  # holds memory now
    models: frozenset[str]  # its resident models (per-model consumers); empty for the others
    vram_mib: int  # what it holds (or would hold) as the broker counts it
    reload_s: float  # the measured time of its last load (0 when never measured)
    last_used_s_ago: float | None
    in_flight: int
    queue_depth: int
    pinned: bool
    healthy: bool


@dataclass(frozen=True)
class HostSummary:
    """One host's broker, as the front last read it."""

    name: str
    url: str  # where the front reaches this host's broker (or its front)
    read_at: float  # the front's clock when the status was read
    accepting: bool
    headroom_mib: int | None  # free memory less the safety margin; None: not read
    capacity_mib: int  # total less the safety margin
    queue_depth: int
    in_flight: int
    consumers: Mapping[str, ConsumerSummary] = field(default_factory=dict)

    def serves(self, model: str) -> ConsumerSummary | None:
        """The consumer holding `model` resident, if any."""
        for c in sorted(self.consumers.values(), key=lambda c: c.name):
            if model in c.models:
                return c
        return None


@dataclass(frozen=True)
class Want:
    """What a request needs: its model (None: any host will do), the consumer that serves it
    where the front knows (None: find it by the model), and what it costs to load."""

    model: str | None = None
    consumer: str | None = None
    need_mib: int = 0


class Tier:
    RESIDENT = 0
    FITS = 1
    EVICT = 2
    NO_ROOM = 3


@dataclass(frozen=True)
class Choice:
    host: str
    tier: int
    key: tuple[float, ...]  # the tie-breaks inside the tier, ascending


def is_fresh(host: HostSummary, now: float, period_s: float) -> bool:
    return now - host.read_at <= STALE_PERIODS * period_s


def eviction_cost_s(host: HostSummary, need_mib: int, keep: str | None = None) -> float | None:
    """The reload time lost to make `need_mib` fit on `host`: residents that are neither
    pinned nor busy (nor `keep`), cheapest to reload first, until there is room. None: not even
    evicting every one of them makes room (or the headroom is unknown)."""
    if host.headroom_mib is None or need_mib > host.capacity_mib:
        return None
    room = host.headroom_mib
    if need_mib <= room:
        return 0.0
    movable = sorted(
        (
            c
            for c in host.consumers.values()
            if c.resident and not c.pinned and c.in_flight == 0 and c.name != keep
        ),
        key=lambda c: (c.reload_s, -c.vram_mib, c.name),
    )
    cost = 0.0
    for c in movable:
        room += c.vram_mib
        cost += c.reload_s
        if need_mib <= room:
            return cost
    return None


def score(
    host: HostSummary, want: Want, reserved: frozenset[str] = frozenset()
) -> tuple[int, tuple[float, ...]]:
    """The tier of `host` for `want` and the tie-breaks inside it (smaller is better).
    `reserved`: the models reserved on this host."""
    queue = float(host.queue_depth)
    if want.model is None:
        if want.consumer is None:
            return Tier.NO_ROOM, (queue, float(host.in_flight))
        # A consumer that is one model (ComfyUI, mVoice): resident is the consumer resident.
        own = host.consumers.get(want.consumer)
        holder = own if own is not None and own.resident else None
    else:
        holder = host.serves(want.model)
    if holder is not None or (want.model is not None and want.model in reserved):
        used = holder.last_used_s_ago if holder and holder.last_used_s_ago is not None else 0.0
        return Tier.RESIDENT, (float(host.in_flight), used, queue)
    if host.headroom_mib is not None and want.need_mib <= host.headroom_mib:
        return Tier.FITS, (-float(host.headroom_mib), queue)
    cost = eviction_cost_s(host, want.need_mib, keep=want.consumer)
    if cost is not None:
        return Tier.EVICT, (cost, queue)
    return Tier.NO_ROOM, (queue,)


def rank_hosts(
    hosts: Iterable[HostSummary],
    want: Want,
    *,
    now: float,
    period_s: float,
    reservations: Reservations | None = None,
) -> list[Choice]:
    """Every usable host for `want`, best first. Stale and non-accepting hosts, and hosts
    without the consumer `want` names, are left out; an empty list means no host can take it
    now."""
    held = reservations.active(now) if reservations is not None else {}
    choices = []
    for host in hosts:
        if not host.accepting or not is_fresh(host, now, period_s):
            continue
        if want.consumer is not None and want.consumer not in host.consumers:
            continue  # that host has no such service
        models = frozenset(m for m, h in held.items() if h == host.name)
        tier, key = score(host, want, models)
        choices.append(Choice(host.name, tier, key))
    choices.sort(key=lambda c: (c.tier, c.key, c.host))
    return choices


@dataclass(frozen=True)
class Reservation:
    host: str
    until: float


class Reservations:
    """Soft reservations of a model on a host: model -> (host, until). Times come from the
    caller; nothing here reads a clock."""

    def __init__(self, ttl_s: float = RESERVATION_S) -> None:
        self.ttl_s = ttl_s
        self._held: dict[str, Reservation] = {}

    def reserve(self, model: str, host: str, now: float) -> None:
        self._held[model] = Reservation(host, now + self.ttl_s)

    def release(self, model: str) -> None:
        self._held.pop(model, None)

    def active(self, now: float) -> dict[str, str]:
        """model -> host, for the reservations not yet expired (the expired ones go)."""
        for model in [m for m, r in self._held.items() if r.until <= now]:
            del self._held[model]
        return {m: r.host for m, r in self._held.items()}

    def settle(self, hosts: Iterable[HostSummary]) -> None:
        """Drop each reservation whose model now shows resident somewhere: the status says it."""
        hosts = list(hosts)
        for model in list(self._held):
            if any(h.serves(model) is not None for h in hosts):
                del self._held[model]


def need_mib(hosts: Sequence[HostSummary], model: str, consumer: str | None) -> int:
    """What `model` costs to load, as well as the front can tell: the largest figure of a
    consumer holding it on any host (per model: its share), else the declared size of the
    consumer that serves it (`consumer`), else 0."""
    best = 0
    for host in hosts:
        holder = host.serves(model)
        if holder is not None and holder.models:
            best = max(best, holder.vram_mib // len(holder.models))
    if best:
        return best
    for host in hosts:
        c = host.consumers.get(consumer or "")
        if c is not None:
            best = max(best, c.vram_mib)
    return best


def summarize(name: str, url: str, status: Mapping[str, Any], read_at: float) -> HostSummary:
    """A broker's `/v1/status` document (as JSON) as a `HostSummary`."""
    gpu = status.get("gpu") or {}
    sched = status.get("scheduler") or {}
    consumers = {}
    for cname, c in (status.get("consumers") or {}).items():
        residency = str(c.get("residency", ""))
        consumers[cname] = ConsumerSummary(
            name=cname,
            type=str(c.get("type", "")),
            resident=residency in ("resident", "loading", "unloading", "unknown"),
            models=frozenset(c.get("resident_models") or ()),
            vram_mib=int(c.get("vram_mib") or c.get("vram_declared_mib") or 0),
            reload_s=float(c.get("last_load_s") or 0.0),
            last_used_s_ago=c.get("last_used_s_ago"),
            in_flight=int(c.get("in_flight") or 0),
            queue_depth=int(c.get("queue_depth") or 0),
            pinned=bool(c.get("pinned")),
            healthy=c.get("healthy") is not False,
        )
    total = int(gpu.get("total_mib") or 0)
    margin = int(gpu.get("safety_margin_mib") or 0)
    headroom = gpu.get("headroom_mib")
    return HostSummary(
        name=name,
        url=url,
        read_at=read_at,
        accepting=bool(sched.get("accepting", True)),
        headroom_mib=None if headroom is None else int(headroom),
        capacity_mib=max(0, total - margin),
        queue_depth=int(sched.get("queue_depth") or 0),
        in_flight=int(sched.get("in_flight") or 0),
        consumers=consumers,
    )


__all__ = [
    "RESERVATION_S",
    "STALE_PERIODS",
    "Choice",
    "ConsumerSummary",
    "HostSummary",
    "Reservations",
    "Tier",
    "Want",
    "eviction_cost_s",
    "is_fresh",
    "need_mib",
    "rank_hosts",
    "score",
    "summarize",
]
