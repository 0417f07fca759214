"""Ollama's API at the root of the broker: a user changes `OLLAMA_HOST` and nothing else.

`HEAD /` and `GET /` (the `ollama` CLI's heartbeat), `/api/version`, `/api/tags`, `/api/ps`,
`/api/show` and model management (`/api/pull`, `/api/push`, `/api/create`, `/api/copy`,
`DELETE /api/delete`, `/api/blobs/*`) pass through without the lease, streamed (a pull's
progress reaches the client line by line); `/api/generate`, `/api/chat`, `/api/embed`,
`/api/embeddings` are GPU jobs. With several Ollama consumers a request goes to the one that
has the model it names (an unknown model to the default one, which answers Ollama's own 404 or
pulls it), and `/api/tags` and `/api/ps` answer the union of their lists."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from mgpumanager.api.dashboard import wants_html
from mgpumanager.api.jobs import Handler, max_body, owner_of, raw_path, relay_job
from mgpumanager.broker import BROKER, Broker
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import AdapterType
from mgpumanager.relay.bodies import Found, find_model, renamed
from mgpumanager.relay.proxy import safe_path

log = logging.getLogger(__name__)


# The page a browser gets at `GET /` (Accept: text/html), where the application sets one;
# every other client gets Ollama's heartbeat there.
HTML_ROOT: web.AppKey[Handler] = web.AppKey("mgpumanager.html_root")


OLLAMA_RUN = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")


OLLAMA_STREAMING = frozenset({"/api/generate", "/api/chat"})


# Model management: the body field(s) naming the model, in the order they route.
OLLAMA_MANAGE: dict[str, tuple[str, ...]] = {
    "/api/show": ("model", "name"),
    "/api/pull": ("model", "name"),
    "/api/push": ("model", "name"),
    "/api/create": ("model", "name", "from"),
    "/api/copy": ("source",),
    "/api/delete": ("model", "name"),
}


# Answers that change what an Ollama consumer has installed: its model list is re-read after.
OLLAMA_CHANGES = frozenset({"/api/pull", "/api/create", "/api/copy", "/api/delete"})


def ollama_names(broker: Broker) -> list[str]:
    return [n for n, c in broker.config.consumers.items() if c.type is AdapterType.OLLAMA]


async def ollama_route(request: web.Request, fields: tuple[str, ...]) -> tuple[str, Found]:
    """The Ollama consumer a request goes to, and its body (read, an alias resolved): the one
    that has the model named by the first of `fields` it owns, else the default one."""
    broker = request.app[BROKER]
    default = broker.ollama_consumer()
    found = await find_model(
        request, max_body(broker), fields=fields, strict=True, consumer=default
    )
    names = ollama_names(broker)
    for field in fields:
        value = (found.obj or {}).get(field)
        if not isinstance(value, str) or not value:
            continue
        owner = await owner_of(broker, value, names, refresh=len(names) > 1)
        if owner is not None:
            return owner.consumer, renamed(found, field, owner.target)
    return default, found


async def root(request: web.Request) -> web.StreamResponse:
    """`GET /` and `HEAD /`. A browser (Accept: text/html) gets the application's page where
    it sets one (HTML_ROOT); every other client gets Ollama's own answer ("Ollama is running"),
    which the `ollama` CLI checks before anything else."""
    page = request.app.get(HTML_ROOT)
    if page is not None and wants_html(request):
        return await page(request)
    return await ollama_heartbeat(request)


async def ollama_heartbeat(request: web.Request) -> web.StreamResponse:
    broker = request.app[BROKER]
    return await broker.passthrough(request, broker.ollama_consumer(), "/")


async def ollama_run(request: web.Request) -> web.StreamResponse:
    """generate / chat / embed: GPU jobs, to the consumer that has the model."""
    name, found = await ollama_route(request, ("model",))
    # generate and chat stream unless the body says `"stream": false`; embeddings never do.
    streams = request.path in OLLAMA_STREAMING and (found.obj or {}).get("stream") is not False
    return await relay_job(request, name, request.path, found, streams=streams)


async def ollama_manage(request: web.Request) -> web.StreamResponse:
    """show and model management: no GPU work, passed through and streamed (a pull's NDJSON
    progress goes out line by line as Ollama writes it)."""
    broker = request.app[BROKER]
    name, found = await ollama_route(request, OLLAMA_MANAGE[request.path])
    response = await broker.passthrough(request, name, request.path, body=found.body)
    if request.path in OLLAMA_CHANGES and response.status < 300:
        await broker.catalog.refresh([name])  # the upstream is done; the client reads on
    return response


async def ollama_default(request: web.Request) -> web.StreamResponse:
    """/api/version and /api/blobs/*: the default Ollama consumer (a blob goes where the
    `create` that uses it will go, absent a model to route by)."""
    broker = request.app[BROKER]
    raw = raw_path(request)
    if raw.startswith("/api/blobs/"):  # the digest is the client's: it may not leave the route
        raw = "/api/blobs/" + safe_path(raw[len("/api/blobs/") :], "/api/blobs/")
    return await broker.passthrough(request, broker.ollama_consumer(), raw)


async def ollama_list(request: web.Request) -> web.StreamResponse:
    """/api/tags and /api/ps: one Ollama consumer's answer unchanged; with several, the union
    of their lists (a model both have is listed once, from the first). One that does not
    answer is left out and named in `X-Mgpumanager-Unreachable`; none answering is an error."""
    broker = request.app[BROKER]
    names = ollama_names(broker)
    if len(names) <= 1:
        return await broker.passthrough(request, broker.ollama_consumer(), request.path)
    answers = await asyncio.gather(
        *(
            broker.adapters[n].request_json(
                "GET", request.path, timeout_s=broker.adapters[n].health_config.timeout_s
            )
            for n in names
        ),
        return_exceptions=True,
    )
    models: list[object] = []
    seen: set[str] = set()
    missing: list[str] = []
    errors: list[BaseException] = []
    for name, answer in zip(names, answers, strict=True):
        listed = answer.get("models") if isinstance(answer, dict) else None
        if isinstance(answer, BaseException) or not isinstance(listed, list):
            log.warning("%s %s: %s left out: %s", request.method, request.path, name, answer)
            missing.append(name)
            if isinstance(answer, BaseException):
                errors.append(answer)
            continue
        for model in listed:
            key = str(model.get("name") or model.get("model")) if isinstance(model, dict) else ""
            if key and key not in seen:
                seen.add(key)
                models.append(model)
    if len(missing) == len(names):
        first = next((e for e in errors if isinstance(e, BrokerError)), None)
        raise first or BrokerError(
            ErrorCode.UPSTREAM_ERROR, f"no Ollama consumer answered {request.path}"
        )
    headers = {"X-Mgpumanager-Unreachable": ", ".join(missing)} if missing else None
    return web.json_response({"models": models}, headers=headers)
