"""A request as a GPU job: the JobSpec built from it (the consumer, the call, the model and
body a surface read, the priority a caller may ask for, the label the queue shows) and handed
to the broker. Every surface that schedules work goes through `scheduled`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web

from mgpumanager.broker import BROKER, MIB, Broker
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import HttpCall
from mgpumanager.relay.bodies import Found
from mgpumanager.relay.context import context
from mgpumanager.relay.job import JobSpec
from mgpumanager.upstreams.catalog import ModelOwner
from mgpumanager.upstreams.client_unloads import client_unload

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def requested_priority(request: web.Request) -> int | None:
    """`X-Priority: 0..4` (clamped), honoured only where `scheduler.allow_priority_header` is on;
    None: the consumer's own priority."""
    raw = request.headers.get("X-Priority")
    if raw is None or not request.app[BROKER].config.scheduler.allow_priority_header:
        return None
    try:
        wanted = max(0, min(4, int(raw)))
    except ValueError:
        raise BrokerError(
            ErrorCode.BAD_REQUEST, f"X-Priority must be an integer 0..4, got {raw!r}"
        ) from None
    caller = context(request).caller  # a token asks for no more than its max_priority
    return wanted if caller is None else min(wanted, caller.max_priority)


async def scheduled(
    request: web.Request,
    name: str,
    call: HttpCall,
    found: Found | None = None,
    *,
    kind: str | None = None,
    streams: bool = False,
) -> web.StreamResponse:
    """Run `request` as a GPU job of consumer `name` sent to its `call` (queue, lease,
    residency, relay), with the model and body a surface has read, if any."""
    found = found or Found(None, None)
    try:
        spec = JobSpec(
            consumer=name,
            call=call,
            kind=kind,
            model=found.model,
            body=found.body,
            priority=requested_priority(request),
            label=job_label(request, found.model),
            streams=streams,
        )
        return await request.app[BROKER].run_job(request, spec)
    finally:
        found.close()


def job_label(request: web.Request, model: str | None) -> str:
    """What a job is, as the queue, the events and recent jobs show it: its route, its model,
    and who sent it where a named token says (`auth.tokens`)."""
    label = request.path if model is None else f"{request.path} {model}"
    caller = context(request).caller
    return label if caller is None else f"{label} ({caller.name})"


def relay_call(request: web.Request, path: str | None = None) -> HttpCall:
    """The client's own method, sent to `path` upstream (default: the request's own path)."""
    return HttpCall(method=request.method, path=request.path if path is None else path)


async def relay_job(
    request: web.Request, name: str, path: str, found: Found | None, *, streams: bool = False
) -> web.StreamResponse:
    """A GPU request of `name`'s own API at `path` (as sent): scheduled, unless it only
    unloads; one that unloads after its work (keep_alive 0 with a prompt) is followed by a
    re-read of the consumer."""
    if found is not None:
        unloaded = await unload_only(request, name, path, found)
        if unloaded is not None:
            return unloaded
    obj = found.obj if found is not None else None
    response = await scheduled(request, name, relay_call(request, path), found, streams=streams)
    request.app[BROKER].answered(name, request.method, unquote(path), response.status, obj)
    return response


async def unload_only(
    request: web.Request, name: str, path: str, found: Found
) -> web.StreamResponse | None:
    """A request that only unloads (Ollama's keep_alive 0 without a prompt, as Open WebUI's
    unload button sends it) runs nothing: it passes without the lease (no room is made for a
    model about to go), and the consumer is re-read at once. None: it is no such request."""
    broker = request.app[BROKER]
    unload = client_unload(broker.config.consumers[name], request.method, unquote(path), found.obj)
    if unload is None or unload.runs:
        return None
    try:
        response = await broker.passthrough(request, name, path, body=found.body)
    finally:
        found.close()
    broker.answered(name, request.method, unquote(path), response.status, found.obj)
    return response


def max_body(broker: Broker) -> int:
    return broker.config.max_body_mib * MIB


def raw_path(request: web.Request) -> str:
    """The path as the client sent it (still percent-encoded), without the query."""
    return request.raw_path.split("?", 1)[0]


async def owner_of(
    broker: Broker, model: str, among: list[str], *, refresh: bool
) -> ModelOwner | None:
    """Who serves `model` among `among`. `refresh`: on a miss, re-read their lists once (a
    model pulled a moment ago), then ask again."""
    owner = broker.catalog.owner(model, among)
    if owner is None and refresh and among:
        await broker.catalog.refresh(among)
        owner = broker.catalog.owner(model, among)
    return owner
