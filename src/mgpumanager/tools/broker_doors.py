"""Init and a broker already running: every address it listens on is the broker, never a
service to propose.

A broker is told by its answers at its `listen` address (`/v1/status`, `/healthz`). Its front
doors cannot be: each answers with the API of the service behind it (a ComfyUI front door is a
ComfyUI to anyone who asks), so init run after a front door was opened would propose the door
as a second ComfyUI and route image jobs to the broker itself, a loop. The broker says where its
doors are: `front_door` of each consumer in its `/v1/status` (read with `MGPUMANAGER_TOKEN`
where the broker wants a token). Every service found on one of those addresses is left out of
the proposal and reported as the door it is.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import aiohttp

from mgpumanager.relay.proxy import UPSTREAM_FAILURES
from mgpumanager.tools.discover import Scan, Service, ServiceKind, Target, parse_target
from mgpumanager.tools.remote import TOKEN_ENV

STATUS_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Door:
    """A service found on an address that is a broker's front door."""

    target: Target
    broker: Target
    consumer: str  # the broker's consumer behind this door


async def front_doors(
    broker: Target, session: aiohttp.ClientSession, timeout_s: float = STATUS_TIMEOUT_S
) -> dict[str, Target]:
    """consumer name -> its front door's address, as the broker at `broker` says; {} where it
    does not say (no answer, a token it refuses)."""
    token = os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(broker.url + "/v1/status", headers=headers) as resp:
                if resp.status != 200:
                    return {}
                doc = await resp.json(content_type=None)
    except UPSTREAM_FAILURES:
        return {}
    consumers = doc.get("consumers") if isinstance(doc, dict) else None
    doors: dict[str, Target] = {}
    for name, c in (consumers or {}).items():
        address = c.get("front_door") if isinstance(c, dict) else None
        if isinstance(address, str):
            try:
                doors[str(name)] = parse_target(address)
            except ValueError:
                continue
    return doors


def _same_address(found: Target, door: Target) -> bool:
    """A door bound to every interface (0.0.0.0, ::) answers on each local address."""
    if found.port != door.port:
        return False
    return found.host == door.host or (door.host in ("0.0.0.0", "::") and found.local)


async def leave_out_doors(scan: Scan, session: aiohttp.ClientSession | None = None) -> list[Door]:
    """Drop from `scan.services` every service found on a front door of a broker in the scan;
    answers those doors."""
    brokers = [s.target for s in scan.services if s.kind is ServiceKind.BROKER]
    if not brokers:
        return []
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        lists = await asyncio.gather(*(front_doors(b, session) for b in brokers))
    finally:
        if own:
            await session.close()
    doors: list[Door] = []
    kept: list[Service] = []
    for service in scan.services:
        door = next(
            (
                Door(service.target, broker, name)
                for broker, listed in zip(brokers, lists, strict=True)
                for name, address in listed.items()
                if service.kind is not ServiceKind.BROKER and _same_address(service.target, address)
            ),
            None,
        )
        if door is None:
            kept.append(service)
        else:
            doors.append(door)
    scan.services[:] = kept
    return doors


__all__ = ["Door", "front_doors", "leave_out_doors"]
