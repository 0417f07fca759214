"""What the broker keeps about one request while it serves it, in one object.

Set by the middlewares (the client's idle limit, the caller a token names and the header it
consumed, the CORS origin the browser guard allowed), by the surface (headers sent upstream in
place of the client's) and by the relay (whether the answer has started, and the delivery
writing it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from mgpumanager.registry import Caller

if TYPE_CHECKING:
    from mgpumanager.relay.proxy import Delivery

# How long a client may send or take nothing, where the registry's client_idle_s is not set
# on the request (an application without the broker's middlewares).
DEFAULT_CLIENT_IDLE_S = 60.0


@dataclass(slots=True)
class RequestContext:
    """- `client_idle_s`: how long the client may send or take nothing;
    - `caller`: who the bearer token names (None: no token is required);
    - `consumed`: request headers the broker consumed itself (its own token), never sent on;
    - `overrides`: headers sent upstream in place of the client's (a same-site Origin);
    - `prepared`: the answer has started, so an error can only cut it off;
    - `delivery`: the answer being written to the client while the handler goes on;
    - `cors_origin`: the allowed web origin the answer's CORS headers name."""

    client_idle_s: float = DEFAULT_CLIENT_IDLE_S
    caller: Caller | None = None
    consumed: tuple[str, ...] = ()
    overrides: dict[str, str] = field(default_factory=dict)
    prepared: bool = False
    delivery: Delivery | None = None
    cors_origin: str | None = None


CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("mgpumanager.context", RequestContext)


def context(request: web.Request) -> RequestContext:
    """`request`'s context, made on first use."""
    found = request.get(CONTEXT)
    if found is None:
        found = request[CONTEXT] = RequestContext()
    return found
