"""Every consumer's own API, unchanged: under `/upstream/<consumer>/` on the main listener, and
at the root of its front door. Methods, query, headers, bodies both ways, websockets; its GPU
routes (`BaseAdapter.uses_gpu`) are scheduled, the rest passes without the lease.

Errors leave through app.error_middleware in each surface's dialect (`request_dialect`: under
/upstream/ and on a front door the consumer's adapter decides, elsewhere the route)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from aiohttp import web

from mgpumanager.api.jobs import Handler, max_body, raw_path, relay_job
from mgpumanager.broker import BROKER
from mgpumanager.errors import BrokerError, Dialect, ErrorCode, route_dialect
from mgpumanager.relay.bodies import find_model, renamed
from mgpumanager.relay.context import context
from mgpumanager.relay.proxy import forward_websocket, is_websocket, safe_path

# The dialect of every error of an application that serves one consumer's API at its root.
DIALECT: web.AppKey[Dialect] = web.AppKey("mgpumanager.dialect", Dialect)


# The consumer whose API an application serves at its root (a front door): its errors take
# that consumer's dialect, read per request (a reload may change the consumer's type).
FRONT_DOOR: web.AppKey[str] = web.AppKey("mgpumanager.front_door", str)


UPSTREAM_PREFIX = "/upstream/"


def consumer_api(prefix: str, name: str | None = None) -> Handler:
    """A handler serving a consumer's own API below `prefix`: consumer `name`, or (None) the
    one the first path segment below `prefix` names (`/upstream/<name>/...`). With prefix "/"
    and a name it is that consumer's API at the root of a listener."""

    async def handle(request: web.Request) -> web.StreamResponse:
        broker = request.app[BROKER]
        raw = raw_path(request)
        if not raw.startswith(prefix):
            raise BrokerError(ErrorCode.BAD_REQUEST, f"path may not leave {prefix}")
        rest = raw[len(prefix) :]
        if name is None:
            raw_name, _, tail = rest.partition("/")
            consumer = unquote(raw_name)
            below = f"{prefix}{raw_name}/"
        else:
            consumer, tail, below = name, rest, prefix
        if consumer not in broker.adapters:
            known = ", ".join(broker.adapters) or "none"
            raise BrokerError(
                ErrorCode.NOT_FOUND, f"no consumer named {consumer!r} (consumers: {known})"
            )
        return await relay_consumer(request, consumer, "/" + safe_path(tail, below))

    return handle


async def relay_consumer(request: web.Request, name: str, path: str) -> web.StreamResponse:
    """One request of consumer `name`'s own API, at its raw `path`."""
    broker = request.app[BROKER]
    adapter = broker.adapters[name]
    context(request).overrides = same_site_origin(request, adapter.config.url)
    if is_websocket(request):
        if broker.session is None:
            raise RuntimeError("broker not started")
        return await forward_websocket(
            request, broker.session, base_url=adapter.config.url, path=path, consumer=name
        )
    plain = unquote(path)
    if not adapter.uses_gpu(request.method, plain):
        return await broker.passthrough(request, name, path)
    found = None
    if adapter.names_model(request.method, plain):
        # Its own API, unchanged: a body that is not what the route expects goes on as sent.
        found = await find_model(request, max_body(broker), strict=False, consumer=name)
        owner = broker.catalog.owner(found.model, [name]) if found.model else None
        if owner is not None:
            found = renamed(found, "model", owner.target)
    return await relay_job(request, name, path, found)


def same_site_origin(request: web.Request, base_url: str) -> dict[str, str]:
    """A browser page served by the broker sends the broker's Origin. ComfyUI refuses a request
    whose Origin does not match the Host it was sent to (its guard against other sites posting
    prompts to a local server); relayed, Host is the upstream's, so the Origin is made the
    upstream's own. Only origins the browser guard let through get here (the listener's own,
    or one in auth.allowed_origins): the broker has judged them already."""
    origin = request.headers.get("Origin")
    if origin is None:
        return {}
    up = urlsplit(base_url)
    return {"Origin": f"{up.scheme}://{up.netloc}"}


def request_dialect(request: web.Request) -> Dialect:
    """The dialect of an error answered to `request`: the application's own where it sets one,
    the consumer's on its front door and under /upstream/<name>/, else the route's."""
    fixed = request.app.get(DIALECT)
    if fixed is not None:
        return fixed
    path = request.path
    door = request.app.get(FRONT_DOOR)
    if door is None and path.startswith(UPSTREAM_PREFIX):
        door = path[len(UPSTREAM_PREFIX) :].split("/")[0]
    if door is not None:
        adapter = request.app[BROKER].adapters.get(door)
        return adapter.dialect if adapter is not None else Dialect.ENVELOPE
    return route_dialect(path)
