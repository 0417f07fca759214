"""The HTTP applications: the broker's facade on `listen`, and a consumer's own API on its
front door. The daemon that serves them (listeners, signals, reload, drain) is daemon.py.

Routes are thin: they resolve a consumer and hand the request to the broker. The broker's own
facade is here; the protocols the box's clients already speak (Ollama's API at the root, the
OpenAI-compatible /v1 routes, every consumer's API under /upstream/<name>/) are in compat.py.
Every error the broker itself answers leaves through `error_middleware`, the one place a
BrokerError becomes an answer — 404 and 405 included — in the dialect of the route it came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

from aiohttp import web
from aiohttp.typedefs import Middleware

from mgpumanager.api import browser_guard, compat, dashboard
from mgpumanager.api.compat import Handler, scheduled
from mgpumanager.api.compat import (
    requested_priority as requested_priority,  # its home before compat.py
)
from mgpumanager.api.metrics import render
from mgpumanager.broker import BROKER, CALLER, MIB, Broker
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import KINDS, AuthConfig, Caller
from mgpumanager.relay.logs import shown
from mgpumanager.relay.proxy import (
    CLIENT_IDLE_S,
    CONSUMED,
    PREPARED,
    abandon_delivery,
    finish_delivery,
    safe_path,
)
from mgpumanager.relay.redaction import install_log_redaction
from mgpumanager.relay.responses import error_response

log = logging.getLogger(__name__)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[CLIENT_IDLE_S] = request.app[BROKER].config.client_idle_s
    try:
        return await _answered(request, handler)
    except BrokerError as err:
        if request.get(PREPARED):
            # The answer had started: no error can follow. Cutting the connection is the
            # only honest signal left (the client sees a truncated answer, never a fake end).
            log.warning("%s after the answer started: %s", err.code, err.message)
            raise ConnectionResetError(err.message) from None
        if err.status >= 500:
            log.warning(
                "%s %s -> %s: %s", request.method, shown(request.path), err.code, err.message
            )
        response = error_response(err, compat.request_dialect(request))
        if err.code is ErrorCode.CLIENT_TIMEOUT:
            response.force_close()  # the rest of its body is not waited for
        return response
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        refused = BrokerError(
            ErrorCode.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed on {request.path} (allowed: {allowed})",
            headers={"Allow": allowed},
        )
    except web.HTTPNotFound:
        refused = BrokerError(ErrorCode.NOT_FOUND, f"no route {request.path}")
    except web.HTTPRequestEntityTooLarge as exc:
        refused = BrokerError(ErrorCode.PAYLOAD_TOO_LARGE, exc.text or "too large")
    return error_response(refused, compat.request_dialect(request))


async def _answered(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's answer, written to the client to its end: a relayed answer is still
    being delivered from its buffer when the handler returns (the lease is gone already).
    After a failure, what the upstream had sent goes out before the connection is cut."""
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        abandon_delivery(request)  # the client left, or the daemon is stopping
        raise
    except BaseException:
        with contextlib.suppress(ConnectionError):
            await finish_delivery(request)
        raise
    await finish_delivery(request)
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a token in `auth`, every route but the broker's /healthz and the dashboard's own
    files (not its data) needs `Authorization: Bearer <token>`, on every listener (front doors
    included); the token names the caller (request[CALLER]). Reads the registry on each
    request, so a SIGHUP reload applies to it."""
    auth = request.app[BROKER].config.auth
    # /healthz and /ui/ are the broker's own; on a front door those paths are the consumer's.
    if auth.required and (
        compat.FRONT_DOOR in request.app or not dashboard.needs_no_token(request)
    ):
        caller = bearer_caller(auth, request.headers.get("Authorization", ""))
        if caller is None:
            raise BrokerError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
        request[CALLER] = caller
        request[CONSUMED] = ("authorization",)  # the broker's token is not the upstream's
    return await handler(request)


def bearer_caller(auth: AuthConfig, header: str) -> Caller | None:
    """The caller whose token `header` carries, or None. Every token is compared, in constant
    time, so timing tells neither the token nor which one is close."""
    if not header.isascii():  # undecodable bytes arrive as surrogates: no token has them
        return None
    given = header.encode("ascii")
    found = None
    for caller, secret in auth.callers():
        if hmac.compare_digest(given, b"Bearer " + secret):
            found = caller
    return found


# -- handlers ---------------------------------------------------------------------------------


async def kind_job(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    broker = request.app[BROKER]
    name = broker.route(kind)
    # A kind the consumer has no path for is refused now, not after a swap.
    return await scheduled(request, name, broker.adapters[name].path_for(kind))


async def audio(request: web.Request) -> web.StreamResponse:
    broker = request.app[BROKER]
    name = broker.config.audio_proxy
    if name is None:
        raise BrokerError(ErrorCode.NO_CONSUMER, "no audio_proxy consumer is configured")
    raw = compat.raw_path(request)
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


def _application(broker: Broker) -> web.Application:
    """An application of the broker: what every listener's has in common (the errors, auth,
    the body limit)."""
    install_log_redaction()  # aiohttp quotes unparsable header lines, tokens included
    # The Host and Origin checks before anything else runs (auth included), behind the one
    # place errors are answered.
    middlewares: list[Middleware] = [
        error_middleware,
        browser_guard.browser_guard,
        auth_middleware,
    ]
    # client_max_size bounds only bodies read whole (a ComfyUI prompt); streamed bodies are
    # counted as they pass (proxy._BodyLimit).
    app = web.Application(middlewares=middlewares, client_max_size=broker.config.max_body_mib * MIB)
    app[BROKER] = broker
    browser_guard.install(app)  # CORS headers for answers to allowed origins
    return app


def make_app(broker: Broker) -> web.Application:
    """The application on `listen`: the broker's facade and every compatible surface."""
    config = broker.config
    app = _application(broker)
    compat.add_routes(app.router)
    kinds = "|".join(sorted(set(KINDS) | {k for c in config.consumers.values() for k in c.paths}))
    app.router.add_post(f"/v1/{{kind:{kinds}}}", kind_job)
    app.router.add_get("/audio/{tail:.+}", audio)  # GET also answers HEAD
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/events", events)
    dashboard.add_routes(app)  # the page at /ui/, and at / for browsers (Ollama's root else)
    app[compat.HTML_ROOT] = dashboard.page
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/admin/consumers/{name}/{action:unload|load}", admin)
    return app


def make_front_door(broker: Broker, name: str) -> web.Application:
    """The application on consumer `name`'s front door: its own API at the root, served by the
    same code as /upstream/<name>/ (scheduling, websockets, its error dialect), with the same
    middlewares and limits as `listen`."""
    app = _application(broker)
    app[compat.FRONT_DOOR] = name
    app.router.add_route("*", "/{tail:.*}", compat.consumer_api("/", name))
    return app
