"""The protocols the box's clients already speak, served by the broker: a user changes a base
URL and nothing else, and the lease sees every GPU job.

- **Ollama's API at the root.** `HEAD /` and `GET /` (the `ollama` CLI's heartbeat),
  `/api/version`, `/api/tags`, `/api/ps`, `/api/show` and model management (`/api/pull`,
  `/api/push`, `/api/create`, `/api/copy`, `DELETE /api/delete`, `/api/blobs/*`) pass through
  without the lease, streamed (a pull's progress reaches the client line by line);
  `/api/generate`, `/api/chat`, `/api/embed`, `/api/embeddings` are GPU jobs. With several
  Ollama consumers a request goes to the one that has the model it names (an unknown model to
  the default one, which answers Ollama's own 404 or pulls it), and `/api/tags` and `/api/ps`
  answer the union of their lists.
- **OpenAI-compatible `/v1`.** `GET /v1/models` lists every model of every consumer that serves
  OpenAI routes, each with its consumer as `owned_by`; the generation routes are GPU jobs sent
  to the consumer that serves the request's `model` (JSON field, or the form field of an audio
  upload), an alias resolved to the upstream's own name.
- **Every consumer's own API under `/upstream/<consumer>/`**, unchanged: methods, query,
  headers, bodies both ways, websockets. Its GPU routes (`BaseAdapter.uses_gpu`) are scheduled,
  the rest passes without the lease. `consumer_api` builds that handler for any path prefix: a
  consumer's front door (app.make_front_door) is the same code at the root of a listener of
  its own.

Errors leave through app.error_middleware in each surface's dialect (errors.route_dialect;
under /upstream/ the consumer's adapter decides).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import unquote, urlsplit

from aiohttp import web

from mgpumanager.api.dashboard import wants_html
from mgpumanager.broker import BROKER, CALLER, MIB, Broker
from mgpumanager.errors import BrokerError, Dialect, ErrorCode, route_dialect
from mgpumanager.registry import AdapterType, HttpCall
from mgpumanager.relay.bodies import Found, find_model, renamed
from mgpumanager.relay.job import JobSpec
from mgpumanager.relay.proxy import OVERRIDES, forward_websocket, is_websocket, safe_path
from mgpumanager.upstreams.adapters import OPENAI_GPU_PATHS
from mgpumanager.upstreams.catalog import ModelOwner

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The page a browser gets at `GET /` (Accept: text/html), where the application sets one;
# every other client gets Ollama's heartbeat there.
HTML_ROOT: web.AppKey[Handler] = web.AppKey("mgpumanager.html_root")
# The dialect of every error of an application that serves one consumer's API at its root.
DIALECT: web.AppKey[Dialect] = web.AppKey("mgpumanager.dialect", Dialect)
# The consumer whose API an application serves at its root (a front door): its errors take
# that consumer's dialect, read per request (a reload may change the consumer's type).
FRONT_DOOR: web.AppKey[str] = web.AppKey("mgpumanager.front_door", str)

UPSTREAM_PREFIX = "/upstream/"
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


# -- shared ----------------------------------------------------------------------------------


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


async def scheduled(
    request: web.Request,
    name: str,
    call: HttpCall,
    found: Found | None = None,
    *,
    streams: bool = False,
) -> web.StreamResponse:
    """Run `request` as a GPU job of consumer `name` sent to its `call` (queue, lease,
    residency, relay), with the model and body a surface has read, if any."""
    found = found or Found(None, None)
    try:
        spec = JobSpec(
            consumer=name,
            call=call,
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
    caller = request.get(CALLER)
    return label if caller is None else f"{label} ({caller.name})"


def relay_call(request: web.Request, path: str | None = None) -> HttpCall:
    """The client's own method, sent to `path` upstream (default: the request's own path)."""
    return HttpCall(method=request.method, path=request.path if path is None else path)


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


# -- Ollama at the root ----------------------------------------------------------------------


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
    return await scheduled(request, name, relay_call(request), found, streams=streams)


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


# -- OpenAI-compatible /v1 -------------------------------------------------------------------


def openai_names(broker: Broker) -> list[str]:
    return [n for n, a in broker.adapters.items() if a.serves_openai]


def _model_entry(owner: ModelOwner) -> dict[str, object]:
    return {"id": owner.model, "object": "model", "created": 0, "owned_by": owner.consumer}


async def openai_models(request: web.Request) -> web.Response:
    """GET /v1/models: every model of every consumer that serves OpenAI routes."""
    broker = request.app[BROKER]
    listing = broker.catalog.listing(among=openai_names(broker))
    return web.json_response({"object": "list", "data": [_model_entry(m) for m in listing]})


async def openai_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}."""
    broker = request.app[BROKER]
    owner = await _openai_owner(broker, request.match_info["model"])
    return web.json_response(_model_entry(owner))


async def _openai_owner(broker: Broker, model: str) -> ModelOwner:
    names = openai_names(broker)
    if not names:
        raise BrokerError(
            ErrorCode.NO_CONSUMER,
            "no consumer serves OpenAI routes (an ollama, vllm or speaches consumer, or a "
            "generic one with openai: true)",
        )
    owner = await owner_of(broker, model, names, refresh=True)
    if owner is None:
        available = ", ".join(m.model for m in broker.catalog.listing(among=names)) or "none"
        raise BrokerError(
            ErrorCode.MODEL_NOT_FOUND,
            f"model {model!r} is not served by any consumer; available: {available}",
            param="model",
        )
    return owner


async def openai_run(request: web.Request) -> web.StreamResponse:
    """A generation route: a GPU job of the consumer that serves the request's model, sent to
    the same path there (Ollama, vLLM and speaches serve these routes themselves)."""
    broker = request.app[BROKER]
    found = await find_model(request, max_body(broker), strict=True)
    if found.model is None:
        found.close()
        raise BrokerError(
            ErrorCode.BAD_REQUEST, "the request names no model ('model' is required)", param="model"
        )
    try:
        owner = await _openai_owner(broker, found.model)
    except BaseException:
        found.close()
        raise
    streams = (found.obj or {}).get("stream") is True
    found = renamed(found, "model", owner.target)
    return await scheduled(request, owner.consumer, relay_call(request), found, streams=streams)


# -- every consumer's own API ----------------------------------------------------------------


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
    request[OVERRIDES] = same_site_origin(request, adapter.config.url)
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
    return await scheduled(request, name, relay_call(request, path), found)


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


# -- routes ------------------------------------------------------------------------------------


def add_routes(router: web.UrlDispatcher) -> None:
    """The compatibility surfaces' routes (registered before the facade's `/v1/{kind}`, so an
    OpenAI path wins over a kind of the same name)."""
    router.add_get("/", root)  # GET also answers HEAD
    router.add_get("/api/version", ollama_default)
    router.add_get("/api/tags", ollama_list)
    router.add_get("/api/ps", ollama_list)
    for path in OLLAMA_RUN:
        router.add_post(path, ollama_run)
    for path in OLLAMA_MANAGE:
        if path == "/api/delete":
            router.add_delete(path, ollama_manage)
        else:
            router.add_post(path, ollama_manage)
    router.add_route("HEAD", "/api/blobs/{digest}", ollama_default)
    router.add_post("/api/blobs/{digest}", ollama_default)
    router.add_get("/v1/models", openai_models)
    router.add_get("/v1/models/{model:.+}", openai_model)
    for path in sorted(OPENAI_GPU_PATHS):
        router.add_post(path, openai_run)
    upstream = consumer_api(UPSTREAM_PREFIX)
    router.add_route("*", "/upstream/{name}", upstream)
    router.add_route("*", "/upstream/{name}/{tail:.*}", upstream)
