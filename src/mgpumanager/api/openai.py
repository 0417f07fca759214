"""The OpenAI-compatible `/v1` routes: `GET /v1/models` lists every model of every consumer
that serves OpenAI routes, each with its consumer as `owned_by`; the generation routes are GPU
jobs sent to the consumer that serves the request's `model` (JSON field, or the form field of
an audio upload), an alias resolved to the upstream's own name."""

from __future__ import annotations

from aiohttp import web

from mgpumanager.api.jobs import max_body, owner_of, relay_call, scheduled
from mgpumanager.broker import BROKER, Broker
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.relay.bodies import find_model, renamed
from mgpumanager.upstreams.catalog import ModelOwner


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
