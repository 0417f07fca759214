"""The Host and Origin checks of every listener (the rules are in origins.py), as one aiohttp
middleware that runs before every route — status, the dashboard, Ollama's and OpenAI's APIs,
jobs, admin, /v1/events, /upstream/ and front doors, websocket upgrades included — so that a
refused request is never forwarded, scheduled or upgraded. It sits behind `error_middleware`,
so its 403 `forbidden` comes in the dialect of the route it was sent to, and before
`auth_middleware`: a foreign page is refused whether or not it guessed a token.

A request from an origin in `auth.allowed_origins` is served with CORS headers
(`Access-Control-Allow-Origin` set to that origin, replacing any the upstream sent, and
`Vary: Origin`); its preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered
here, never forwarded (Chromium's Private Network Access question included). Requests from
the listener's own origin and requests without `Origin` get none. The registry is read on each
request, so a SIGHUP reload applies at once.
"""

from __future__ import annotations

import logging

from aiohttp import web

from mgpumanager.api.jobs import Handler
from mgpumanager.broker import BROKER
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry.origins import Verdict, host_allowed, judge_origin
from mgpumanager.relay.context import context
from mgpumanager.relay.logs import shown

log = logging.getLogger(__name__)

# The allowed origin a request came from, for the CORS headers of its answer.
PREFLIGHT_MAX_AGE_S = 600
PREFLIGHT_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def _local_address(request: web.Request) -> str | None:
    """The address the connection arrived on (what a 0.0.0.0 listener is reached at)."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and sockname and isinstance(sockname[0], str):
        return sockname[0]
    return None


@web.middleware
async def browser_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    auth = request.app[BROKER].config.auth
    hosts = request.headers.getall("Host", [])
    local = _local_address(request)
    for host in hosts:
        if not host_allowed(host, local, auth.allowed_hosts):
            log.warning(
                "refused %s %s from %s: Host %s is not a name of this broker",
                request.method,
                shown(request.path),
                request.remote,
                shown(host),
            )
            raise BrokerError(
                ErrorCode.FORBIDDEN,
                f"Host {host!r} is not a name this broker answers to (a web page on another "
                "site may not reach it by DNS rebinding); if it is this box's name, add it to "
                "auth.allowed_hosts",
            )
    origin = request.headers.get("Origin")
    if origin is None:
        return await handler(request)
    verdict = judge_origin(origin, hosts[0] if hosts else None, auth.allowed_origins)
    if verdict is Verdict.FOREIGN:
        log.warning(
            "refused %s %s from %s: Origin %s may not use this broker",
            request.method,
            shown(request.path),
            request.remote,
            shown(origin),
        )
        raise BrokerError(
            ErrorCode.FORBIDDEN,
            f"requests from the web page {origin!r} are refused (another site may not drive "
            "this box); if that page is a front end of yours, add its origin to "
            "auth.allowed_origins",
        )
    if verdict is Verdict.LISTED:
        context(request).cors_origin = origin
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return _preflight(request, origin)
    return await handler(request)


def _preflight(request: web.Request, origin: str) -> web.Response:
    headers = {
        "Access-Control-Allow-Methods": PREFLIGHT_METHODS,
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
    }
    asked = request.headers.get("Access-Control-Request-Headers")
    if asked:
        headers["Access-Control-Allow-Headers"] = asked  # the origin is trusted: what it asks
    if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        # Chromium asks before a page on a public address may call a loopback or LAN one.
        headers["Access-Control-Allow-Private-Network"] = "true"
    return web.Response(status=204, headers=headers)


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the CORS headers of an answer to an allowed origin, set just before
    its head is sent (a relayed answer streams, so a middleware would be too late)."""
    origin = context(request).cors_origin
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = "Origin"
    elif "origin" not in vary.lower():
        response.headers["Vary"] = f"{vary}, Origin"


def install(app: web.Application) -> None:
    """The CORS headers for `app`'s answers (the middleware is placed by the app's builder)."""
    app.on_response_prepare.append(cors_headers)
