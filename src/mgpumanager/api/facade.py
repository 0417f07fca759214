"""The broker's own routes: a job by kind (`POST /v1/{kind}`, the registry's routing), the
audio proxy (`/audio/*`), what the box is doing (`/v1/status`, `/v1/events`, `/metrics`,
`/healthz`) and steering it (`/v1/admin/consumers/{name}/{unload|load}`)."""

from __future__ import annotations

from aiohttp import web

from mgpumanager.api import dashboard
from mgpumanager.api.jobs import raw_path, scheduled
from mgpumanager.api.metrics import render
from mgpumanager.broker import BROKER
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.relay.proxy import safe_path


async def kind_job(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    broker = request.app[BROKER]
    name = broker.route(kind)
    # A kind the consumer has no path for is refused now, not after a swap.
    return await scheduled(request, name, broker.adapters[name].path_for(kind), kind=kind)


async def audio(request: web.Request) -> web.StreamResponse:
    broker = request.app[BROKER]
    name = broker.config.audio_proxy
    if name is None:
        raise BrokerError(ErrorCode.NO_CONSUMER, "no audio_proxy consumer is configured")
    raw = raw_path(request)
    if not raw.startswith("/audio/"):
        raise BrokerError(ErrorCode.BAD_REQUEST, "path may not leave /audio/")
    tail = safe_path(raw[len("/audio/") :], "/audio/")
    return await broker.passthrough(request, name, "/audio/" + tail)


async def status(request: web.Request) -> web.Response:
    snapshot = request.app[BROKER].status()
    return web.json_response(text=snapshot.model_dump_json(indent=2))


async def events(request: web.Request) -> web.StreamResponse:
    broker = request.app[BROKER]
    return await dashboard.stream_events(request, broker.events, broker.status)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    body = render(request.app[BROKER].status)
    return web.Response(
        body=body,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


async def admin(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    result = await broker.admin(request.match_info["name"], request.match_info["action"])
    return web.json_response(result)
