"""Who holds a port the broker cannot bind: a broker already (say so), or something else."""

from __future__ import annotations

import aiohttp

from mgpumanager.registry import split_listen
from mgpumanager.relay.proxy import UPSTREAM_FAILURES
from mgpumanager.tools.discover import Service, ServiceKind, Target, probe

PROBE_TIMEOUT_S = 2.0


async def broker_holds(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an mgpumanager broker answers at HOST:PORT `address` (its /healthz and
    /v1/status, as init tells one). A wildcard address is asked on loopback."""
    host, port = split_listen(address)
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    async with aiohttp.ClientSession() as session:
        try:
            found = await probe(session, Target(host, port), timeout_s)
        except UPSTREAM_FAILURES:
            return False
    return isinstance(found, Service) and found.kind is ServiceKind.BROKER


__all__ = ["broker_holds"]
