"""The HTTP applications: the broker's surfaces on `listen`, and a consumer's own API on its
front door. The daemon that serves them (listeners, signals, reload, drain) is daemon.py.

Routes are thin: they resolve a consumer and hand the request to the broker; api/routes.py is
the one table of them, each handler lives with its dialect (ollama, openai, upstream, facade).
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

from mgpumanager.api import browser_guard, dashboard
from mgpumanager.api.jobs import Handler
from mgpumanager.api.ollama import HTML_ROOT
from mgpumanager.api.routes import add_front_door_routes, add_main_routes
from mgpumanager.api.upstream import FRONT_DOOR, request_dialect
from mgpumanager.broker import BROKER, MIB, Broker
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import AuthConfig, Caller
from mgpumanager.relay.context import context
from mgpumanager.relay.logs import shown
from mgpumanager.relay.proxy import (
    abandon_delivery,
    finish_delivery,
)
from mgpumanager.relay.redaction import install_log_redaction
from mgpumanager.relay.responses import error_response

log = logging.getLogger(__name__)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = context(request)
    state.client_idle_s = request.app[BROKER].config.client_idle_s
    try:
        return await _answered(request, handler)
    except BrokerError as err:
        if state.prepared:
            # The answer had started: no error can follow. Cutting the connection is the
            # only honest signal left (the client sees a truncated answer, never a fake end).
            log.warning("%s after the answer started: %s", err.code, err.message)
            raise ConnectionResetError(err.message) from None
        if err.status >= 500:
            log.warning(
                "%s %s -> %s: %s", request.method, shown(request.path), err.code, err.message
            )
        response = error_response(err, request_dialect(request))
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
    return error_response(refused, request_dialect(request))


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
    included); the token names the caller (the request context's `caller`). Reads the
    registry on each request, so a SIGHUP reload applies to it."""
    auth = request.app[BROKER].config.auth
    # /healthz and /ui/ are the broker's own; on a front door those paths are the consumer's.
    if auth.required and (FRONT_DOOR in request.app or not dashboard.needs_no_token(request)):
        caller = bearer_caller(auth, request.headers.get("Authorization", ""))
        if caller is None:
            raise BrokerError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
        state = context(request)
        state.caller = caller
        state.consumed = ("authorization",)  # the broker's token is not the upstream's
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
    # client_max_size bounds only bodies aiohttp reads whole (request.read()); the broker's
    # own reading counts what it receives (relay.bodies, relay.spool, proxy._ClientBody).
    app = web.Application(middlewares=middlewares, client_max_size=broker.config.max_body_mib * MIB)
    app[BROKER] = broker
    browser_guard.install(app)  # CORS headers for answers to allowed origins
    return app


def make_app(broker: Broker) -> web.Application:
    """The application on `listen`: the broker's facade and every compatible surface."""
    app = _application(broker)
    add_main_routes(app.router, broker.config)
    app[HTML_ROOT] = dashboard.page
    return app


def make_front_door(broker: Broker, name: str) -> web.Application:
    """The application on consumer `name`'s front door: its own API at the root, served by the
    same code as /upstream/<name>/ (scheduling, websockets, its error dialect), with the same
    middlewares and limits as `listen`."""
    app = _application(broker)
    app[FRONT_DOOR] = name
    add_front_door_routes(app.router, name)
    return app
