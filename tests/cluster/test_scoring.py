"""The host scoring of the cluster front, step by step and with hypothesis: resident first,
then fits, then the cheapest eviction, then the shortest queue; stale and closed hosts skipped;
soft reservations keep a second cold request on the first one's host."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mgpumanager.cluster.scoring import (
    ConsumerSummary,
    HostSummary,
    Reservations,
    Tier,
    Want,
    eviction_cost_s,
    need_mib,
    rank_hosts,
    summarize,
)

PERIOD = 1.0


def consumer(name: str = "ollama", **kw: Any) -> ConsumerSummary:
    fields: dict[str, Any] = {
        "name": name,
        "type": "ollama",
        "resident": False,
        "models": frozenset(),
        "vram_mib": 0,
        "reload_s": 0.0,
        "last_used_s_ago": None,
        "in_flight": 0,
        "queue_depth": 0,
        "pinned": False,
        "healthy": True,
    }
    fields.update(kw)
    return ConsumerSummary(**fields)


def host(name: str, *consumers: ConsumerSummary, **kw: Any) -> HostSummary:
    fields: dict[str, Any] = {
        "name": name,
        "url": f"http://{name}",
        "read_at": 0.0,
        "accepting": True,
        "headroom_mib": 10000,
        "capacity_mib": 24000,
        "queue_depth": 0,
        "in_flight": 0,
        "consumers": {c.name: c for c in consumers},
    }
    fields.update(kw)
    return HostSummary(**fields)


def order(hosts: list[HostSummary], want: Want, **kw: Any) -> list[str]:
    kw.setdefault("now", 0.0)
    kw.setdefault("period_s", PERIOD)
    return [c.host for c in rank_hosts(hosts, want, **kw)]


def llama(**kw: Any) -> ConsumerSummary:
    return consumer(resident=True, models=frozenset({"llama"}), vram_mib=9000, **kw)


def test_the_host_holding_the_model_comes_first_even_with_less_room() -> None:
    a = host("a", headroom_mib=20000)
    b = host("b", llama(), headroom_mib=1000)
    assert order([a, b], Want("llama", need_mib=9000)) == ["b", "a"]


def test_among_holders_fewest_in_flight_then_most_recently_used() -> None:
    a = host("a", llama(last_used_s_ago=1.0), in_flight=2)
    b = host("b", llama(last_used_s_ago=50.0), in_flight=0)
    c = host("c", llama(last_used_s_ago=5.0), in_flight=0)
    assert order([a, b, c], Want("llama")) == ["c", "b", "a"]


def test_a_cold_model_goes_where_it_fits_with_the_most_headroom() -> None:
    a = host("a", headroom_mib=9500)
    b = host("b", headroom_mib=15000)
    small = host("c", headroom_mib=100)
    assert order([small, a, b], Want("llama", need_mib=9000)) == ["b", "a", "c"]


def test_where_nothing_fits_the_cheapest_eviction_by_reload_time() -> None:
    slow = consumer("comfyui", resident=True, vram_mib=12000, reload_s=20.0)
    fast = consumer("mvoice", resident=True, vram_mib=12000, reload_s=2.0)
    a = host("a", slow, headroom_mib=0)
    b = host("b", fast, headroom_mib=0)
    ranked = rank_hosts([a, b], Want("llama", need_mib=9000), now=0, period_s=PERIOD)
    assert [(c.host, c.tier) for c in ranked] == [("b", Tier.EVICT), ("a", Tier.EVICT)]


def test_pinned_or_busy_residents_are_never_counted_as_room() -> None:
    pinned = consumer("comfyui", resident=True, vram_mib=20000, pinned=True)
    busy = consumer("mvoice", resident=True, vram_mib=20000, in_flight=1)
    assert eviction_cost_s(host("a", pinned, headroom_mib=0), 9000) is None
    assert eviction_cost_s(host("b", busy, headroom_mib=0), 9000) is None
    assert eviction_cost_s(host("c", headroom_mib=None), 1) is None
    assert eviction_cost_s(host("d", capacity_mib=8000), 9000) is None


def test_the_shortest_queue_breaks_the_tie_and_alone_routes_modelless_requests() -> None:
    a = host("a", queue_depth=3)
    b = host("b", queue_depth=1)
    assert order([a, b], Want(None)) == ["b", "a"]
    assert order([a, b], Want("llama", need_mib=0)) == ["b", "a"]


def test_a_consumer_of_one_model_counts_as_resident_and_hosts_without_it_are_left_out() -> None:
    comfy = consumer("comfyui", resident=True, vram_mib=12000)
    a = host("a", consumer("comfyui", vram_mib=12000), headroom_mib=20000)
    b = host("b", comfy, headroom_mib=1000)
    c = host("c")
    assert order([a, b, c], Want(None, "comfyui", 12000)) == ["b", "a"]


def test_a_status_older_than_three_periods_is_skipped_and_returns_when_fresh() -> None:
    old = host("a", llama(), read_at=0.0)
    b = host("b", read_at=3.0)
    assert order([old, b], Want("llama"), now=3.0) == ["a", "b"]
    assert order([old, b], Want("llama"), now=3.5) == ["b"]
    fresh = host("a", llama(), read_at=3.4)
    assert order([fresh, b], Want("llama"), now=3.5) == ["a", "b"]


def test_a_host_not_accepting_is_skipped() -> None:
    assert order([host("a", llama(), accepting=False), host("b")], Want("llama")) == ["b"]


def test_two_cold_requests_for_one_model_load_it_on_one_host() -> None:
    a = host("a", headroom_mib=15000, read_at=11.0)
    b = host("b", headroom_mib=14000, read_at=11.0)
    held = Reservations(ttl_s=10.0)
    first = order([a, b], Want("llama", need_mib=9000), reservations=held)[0]
    held.reserve("llama", first, now=0.0)
    # The first load took room on `a`; the second must not load it again on `b`.
    a_loading = host("a", headroom_mib=6000, read_at=11.0)
    assert order([a_loading, b], Want("llama", need_mib=9000), now=1.0, reservations=held) == [
        "a",
        "b",
    ]
    # Expired: an ordinary cold request again.
    assert order([a_loading, b], Want("llama", need_mib=9000), now=11.0, reservations=held) == [
        "b",
        "a",
    ]


def test_a_reservation_settles_once_the_model_shows_resident() -> None:
    held = Reservations()
    held.reserve("llama", "a", now=0.0)
    held.settle([host("b")])
    assert held.active(1.0) == {"llama": "a"}
    held.settle([host("a", llama())])
    assert held.active(1.0) == {}


def test_need_mib_from_a_holder_else_the_declared_size() -> None:
    ollama = consumer(resident=True, models=frozenset({"llama", "qwen"}), vram_mib=10000)
    assert need_mib([host("a", ollama)], "llama", "ollama") == 5000
    declared = consumer(vram_mib=7000)
    assert need_mib([host("a", declared)], "llama", "ollama") == 7000
    assert need_mib([host("a")], "llama", None) == 0


def test_summarize_reads_a_broker_status() -> None:
    status = {
        "gpu": {"total_mib": 24576, "safety_margin_mib": 512, "headroom_mib": 4000},
        "scheduler": {"accepting": True, "queue_depth": 2, "in_flight": 1},
        "consumers": {
            "ollama": {
                "type": "ollama",
                "residency": "resident",
                "resident_models": ["llama"],
                "vram_mib": 9000,
                "last_load_s": 1.5,
                "last_used_s_ago": 3.0,
                "in_flight": 1,
                "queue_depth": 2,
                "pinned": False,
                "healthy": True,
            },
            "comfyui": {"type": "comfyui", "residency": "unloaded", "vram_declared_mib": 12000},
        },
    }
    s = summarize("a", "http://a", status, read_at=5.0)
    assert (s.capacity_mib, s.headroom_mib, s.queue_depth, s.in_flight) == (24064, 4000, 2, 1)
    assert s.serves("llama") is s.consumers["ollama"]
    assert s.consumers["ollama"].reload_s == 1.5
    assert not s.consumers["comfyui"].resident
    assert s.consumers["comfyui"].vram_mib == 12000


# Property tests: random hosts and requests.

names = st.sampled_from(["a", "b", "c", "d"])


@st.composite
def hosts_st(draw: st.DrawFn) -> list[HostSummary]:
    out = []
    for name in sorted(draw(st.sets(names, min_size=1))):
        cs = []
        for cname in draw(st.sets(st.sampled_from(["ollama", "comfyui", "mvoice"]))):
            resident = draw(st.booleans())
            models = (
                frozenset(draw(st.sets(st.sampled_from(["llama", "qwen"]))))
                if resident
                else frozenset()
            )
            cs.append(
                consumer(
                    cname,
                    resident=resident,
                    models=models if cname == "ollama" else frozenset(),
                    vram_mib=draw(st.integers(0, 20000)),
                    reload_s=draw(st.floats(0, 60)),
                    last_used_s_ago=draw(st.none() | st.floats(0, 600)),
                    in_flight=draw(st.integers(0, 2)),
                    pinned=draw(st.booleans()),
                )
            )
        out.append(
            host(
                name,
                *cs,
                read_at=draw(st.floats(0, 10)),
                accepting=draw(st.booleans()),
                headroom_mib=draw(st.none() | st.integers(-2000, 24000)),
                queue_depth=draw(st.integers(0, 5)),
                in_flight=draw(st.integers(0, 3)),
            )
        )
    return out


wants = st.builds(
    Want,
    model=st.none() | st.sampled_from(["llama", "qwen", "flux"]),
    consumer=st.none() | st.just("ollama"),
    need_mib=st.integers(0, 30000),
)


@settings(max_examples=300, deadline=None)
@given(hosts_st(), wants, st.floats(0, 20))
def test_ranking_is_a_total_order_over_exactly_the_usable_hosts(
    hosts: list[HostSummary], want: Want, now: float
) -> None:
    ranked = rank_hosts(hosts, want, now=now, period_s=PERIOD)
    usable = {
        h.name
        for h in hosts
        if h.accepting
        and now - h.read_at <= 3 * PERIOD
        and (want.consumer is None or want.consumer in h.consumers)
    }
    assert sorted(c.host for c in ranked) == sorted(usable)
    keys = [(c.tier, c.key, c.host) for c in ranked]
    assert keys == sorted(keys)
    # Order of the input does not matter.
    again = rank_hosts(list(reversed(hosts)), want, now=now, period_s=PERIOD)
    assert [c.host for c in again] == [c.host for c in ranked]


@settings(max_examples=300, deadline=None)
@given(hosts_st(), wants)
def test_a_host_holding_the_model_is_never_ranked_below_one_that_does_not(
    hosts: list[HostSummary], want: Want
) -> None:
    ranked = rank_hosts(hosts, want, now=10.0, period_s=100.0)
    if want.model is None:
        return
    by_name = {h.name: h for h in hosts}
    holds = [by_name[c.host].serves(want.model) is not None for c in ranked]
    assert holds == sorted(holds, reverse=True)


@settings(max_examples=300, deadline=None)
@given(hosts_st(), st.sampled_from(["llama", "qwen", "flux"]), st.integers(0, 30000))
def test_a_host_where_it_fits_outranks_one_that_must_evict(
    hosts: list[HostSummary], model: str, need: int
) -> None:
    ranked = rank_hosts(hosts, Want(model, need_mib=need), now=10.0, period_s=100.0)
    by_name = {h.name: h for h in hosts}
    tiers = [c.tier for c in ranked]
    assert tiers == sorted(tiers)
    for c in ranked:
        h = by_name[c.host]
        if c.tier == Tier.FITS:
            assert h.headroom_mib is not None and need <= h.headroom_mib
        if c.tier == Tier.EVICT:
            assert eviction_cost_s(h, need) is not None


@settings(max_examples=200, deadline=None)
@given(hosts_st(), st.sampled_from(["llama", "qwen", "flux"]), st.integers(0, 30000))
def test_a_reserved_cold_model_stays_on_its_host(
    hosts: list[HostSummary], model: str, need: int
) -> None:
    held = Reservations(ttl_s=5.0)
    first = rank_hosts(
        hosts, Want(model, need_mib=need), now=10.0, period_s=100.0, reservations=held
    )
    if not first or first[0].tier == Tier.RESIDENT:
        return
    held.reserve(model, first[0].host, now=10.0)
    second = rank_hosts(
        hosts, Want(model, need_mib=need), now=11.0, period_s=100.0, reservations=held
    )
    assert second[0].host == first[0].host
