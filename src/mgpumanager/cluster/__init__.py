"""Past one box: several brokers behind one front, each the only authority over its own cards
(docs/cluster.md). `scoring` is pure and imports nothing of Ray; `front` is the aiohttp front
that forwards each request to the host it scores best; `ray_app` (the `ray` extra) places one
front and status reader per host on a Ray cluster and is the only module that imports Ray."""

from mgpumanager.cluster.scoring import HostSummary, Reservations, Want, rank_hosts, summarize

__all__ = ["HostSummary", "Reservations", "Want", "rank_hosts", "summarize"]
