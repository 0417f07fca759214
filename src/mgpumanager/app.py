"""The HTTP facade and the daemon's lifecycle.

Routes are thin: they resolve a consumer and hand the request to the broker. The broker's own
facade is here; the protocols the box's clients already speak (Ollama's API at the root, the
OpenAI-compatible /v1 routes, every consumer's API under /upstream/<name>/) are in compat.py.
Every error the broker itself answers leaves through `error_middleware`, the one place a
BrokerError becomes an answer — 404 and 405 included — in the dialect of the route it came from.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import compat
from .broker import BROKER, MIB, Broker
from .compat import Handler, scheduled
from .config import KINDS, Config, ConfigError, load_config
from .errors import BrokerError, ErrorCode, error_response
from .metrics import render
from .proxy import CONSUMED, PREPARED, safe_path

log = logging.getLogger(__name__)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BrokerError as err:
        if request.get(PREPARED):
            # The answer had started: no error can follow. Cutting the connection is the
            # only honest signal left (the client sees a truncated answer, never a fake end).
            log.warning("%s after the answer started: %s", err.code, err.message)
            raise ConnectionResetError(err.message) from err
        if err.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.path, err.code, err.message)
        return error_response(err, compat.request_dialect(request))
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


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With `auth.token` set, every route but /healthz needs `Authorization: Bearer <token>`.
    Reads the registry on each request, so a SIGHUP reload applies to it."""
    token = request.app[BROKER].config.auth.token
    if token is not None and request.path != "/healthz":
        expected = f"Bearer {token.get_secret_value()}".encode()
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise BrokerError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
        request[CONSUMED] = ("authorization",)  # the broker's token is not the upstream's
    return await handler(request)


# -- handlers ---------------------------------------------------------------------------------


async def kind_job(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    return await scheduled(request, kind, request.app[BROKER].route(kind))


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


def make_app(broker: Broker) -> web.Application:
    config = broker.config
    middlewares: list[Middleware] = [error_middleware, auth_middleware]
    # client_max_size bounds only bodies read whole (a ComfyUI prompt); streamed bodies are
    # counted as they pass (proxy._BodyLimit).
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_mib * MIB)
    app[BROKER] = broker
    compat.add_routes(app.router)
    kinds = "|".join(sorted(set(KINDS) | {k for c in config.consumers.values() for k in c.paths}))
    app.router.add_post(f"/v1/{{kind:{kinds}}}", kind_job)
    app.router.add_get("/audio/{tail:.+}", audio)  # GET also answers HEAD
    app.router.add_get("/v1/status", status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/admin/consumers/{name}/{action:unload|load}", admin)
    return app


# -- the daemon -------------------------------------------------------------------------------


class Server:
    """A started broker behind a listening aiohttp site."""

    def __init__(self, broker: Broker, runner: web.AppRunner, site: web.TCPSite) -> None:
        self.broker = broker
        self.runner = runner
        self.site = site

    @property
    def url(self) -> str:
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        """Ordered shutdown: stop accepting, drain with a bound, cancel the rest (closing the
        server cancels handlers still running, which aborts their upstream requests), release."""
        await self.broker.drain()
        await self.runner.cleanup()
        await self.broker.aclose()


async def start_server(broker: Broker, host: str | None = None, port: int | None = None) -> Server:
    await broker.start()
    cfg_host, cfg_port = broker.config.listen_host_port
    app = make_app(broker)
    # handler_cancellation: a client that disconnects cancels its handler, which leaves the
    # queue or aborts the upstream request (aiohttp ≥3.9 no longer does this by default).
    # shutdown_timeout: by cleanup time the broker has drained; what still runs is cancelled.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(
        runner, cfg_host if host is None else host, cfg_port if port is None else port
    )
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        await broker.aclose()
        raise
    return Server(broker, runner, site)


async def serve(config_path: Path) -> int:
    """`mgpumanager serve`: run until SIGTERM/SIGINT; SIGHUP re-reads the registry."""
    config = load_config(config_path)
    server = await start_server(Broker(config))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(server, config_path))
    # Only now: whoever waits for this line may signal us, and the handlers are in place.
    log.info("listening on %s", server.url)
    await stop.wait()
    log.info("signal received: draining")
    await server.stop()
    log.info("stopped")
    return 0


def _reload(server: Server, path: Path) -> None:
    """SIGHUP: re-read the registry. A bad file, or one that changes what needs a restart, is
    refused with every problem logged, and the old registry stays in force."""
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("SIGHUP: new registry refused, keeping the old one:\n%s", exc)
        return
    if new == server.broker.config:
        log.info("SIGHUP: registry unchanged")
        return
    task = asyncio.ensure_future(_apply(server.broker, new))
    _RELOADS.add(task)
    task.add_done_callback(_RELOADS.discard)


_RELOADS: set[asyncio.Task[None]] = set()


async def _apply(broker: Broker, new: Config) -> None:
    try:
        changes = await broker.reload(new)
    except ValueError as exc:
        log.error("SIGHUP: new registry refused, keeping the old one: %s", exc)
        return
    log.info("SIGHUP: registry reloaded (%s)", ", ".join(changes) or "no effective change")
