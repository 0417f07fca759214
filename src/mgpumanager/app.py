"""The HTTP facade (DESIGN §7) and the daemon's lifecycle (§9).

Routes are thin: they resolve a consumer and hand the request to the broker. Every error the
broker itself answers leaves through `error_middleware`, the one place a BrokerError becomes
the JSON envelope — 404 and 405 included.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web
from aiohttp.typedefs import Middleware

from .adapters import NATIVE_KIND_PREFIX
from .broker import CALLER, MIB, Broker
from .config import KINDS, AuthConfig, Caller, Config, ConfigError, load_config
from .errors import BrokerError, ErrorCode, error_response
from .metrics import render
from .proxy import CONSUMED, PREPARED
from .redaction import install_log_redaction

log = logging.getLogger(__name__)

BROKER: web.AppKey[Broker] = web.AppKey("broker", Broker)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BrokerError as err:
        if request.get(PREPARED):
            # The answer had started: no envelope can follow. Cutting the connection is the
            # only honest signal left (the client sees a truncated answer, never a fake end).
            log.warning("%s after the answer started: %s", err.code, err.message)
            raise ConnectionResetError(err.message) from err
        if err.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.path, err.code, err.message)
        return error_response(err)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            BrokerError(
                ErrorCode.METHOD_NOT_ALLOWED,
                f"{request.method} is not allowed on {request.path} (allowed: {allowed})",
                headers={"Allow": allowed},
            )
        )
    except web.HTTPNotFound:
        return error_response(BrokerError(ErrorCode.NOT_FOUND, f"no route {request.path}"))
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(BrokerError(ErrorCode.PAYLOAD_TOO_LARGE, exc.text or "too large"))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a token in `auth`, every route but /healthz needs `Authorization: Bearer <token>`;
    the token names the caller (request[CALLER]). Reads the registry on each request, so a
    SIGHUP reload applies to it."""
    auth = request.app[BROKER].config.auth
    if auth.required and request.path != "/healthz":
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
    caller = request.get(CALLER)  # a token asks for no more than its max_priority
    return wanted if caller is None else min(wanted, caller.max_priority)


async def scheduled(request: web.Request, kind: str, name: str) -> web.StreamResponse:
    """Run `request` as a GPU job of consumer `name` (queue, lease, residency, relay)."""
    return await request.app[BROKER].run_job(request, kind, name, requested_priority(request))


async def kind_job(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    return await scheduled(request, kind, request.app[BROKER].route(kind))


async def ollama_job(request: web.Request) -> web.StreamResponse:
    """Ollama's native generate/chat/embed, scheduled like /v1/llm."""
    name = request.app[BROKER].ollama_consumer()
    return await scheduled(request, f"{NATIVE_KIND_PREFIX}{request.path}", name)


async def ollama_meta(request: web.Request) -> web.StreamResponse:
    """Ollama's metadata calls (tags, ps, show, version): no GPU work, not scheduled."""
    broker = request.app[BROKER]
    return await broker.passthrough(request, broker.ollama_consumer(), request.path)


def safe_audio_path(raw_tail: str) -> str:
    """The raw (still percent-encoded) path below /audio/, refused if any segment, decoded
    however many times, is `.`/`..` or hides a separator. It is forwarded exactly as sent."""
    for segment in raw_tail.split("/"):
        decoded, previous = segment, None
        while decoded != previous:  # %252e%252e decodes twice
            previous, decoded = decoded, unquote(decoded)
        if decoded in (".", "..") or any(c in decoded for c in "/\\\x00"):
            raise BrokerError(ErrorCode.BAD_REQUEST, "path may not leave /audio/")
    return raw_tail


async def audio(request: web.Request) -> web.StreamResponse:
    broker = request.app[BROKER]
    name = broker.config.audio_proxy
    if name is None:
        raise BrokerError(ErrorCode.NO_CONSUMER, "no audio_proxy consumer is configured")
    raw_path = request.raw_path.split("?", 1)[0]
    tail = safe_audio_path(raw_path[len("/audio/") :])
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
    install_log_redaction()  # aiohttp quotes unparsable header lines, tokens included
    middlewares: list[Middleware] = [error_middleware, auth_middleware]
    # client_max_size bounds only bodies read whole (a ComfyUI prompt); streamed bodies are
    # counted as they pass (proxy._BodyLimit).
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_mib * MIB)
    app[BROKER] = broker
    kinds = "|".join(sorted(set(KINDS) | {k for c in config.consumers.values() for k in c.paths}))
    app.router.add_post(f"/v1/{{kind:{kinds}}}", kind_job)
    app.router.add_get("/audio/{tail:.+}", audio)  # GET also answers HEAD
    app.router.add_get("/v1/status", status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/admin/consumers/{name}/{action:unload|load}", admin)
    for path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings"):
        app.router.add_post(path, ollama_job)
    for path in ("/api/tags", "/api/ps", "/api/version"):
        app.router.add_get(path, ollama_meta)
    app.router.add_post("/api/show", ollama_meta)
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
