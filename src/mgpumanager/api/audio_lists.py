"""`GET /v1/audio/models` and `GET /v1/audio/voices`: what the consumers that serve audio offer,
for clients that list them before they speak. Open WebUI's TTS settings (OpenAI engine, any
base URL but OpenAI's own) read `models[].id` and `voices[].id` / `voices[].name`; speaches
answers the same keys; OpenAI-style clients read `data`. Both answers carry both.

A consumer serves audio when it is of type `speaches`, or `generic` with `openai: true`. Each
is asked the same route; one that does not answer is left out and named in
`X-Mgpumanager-Unreachable`. The models of one that keeps no audio list of its own are its
models as the catalog knows them. The registry's aliases of a listed model (`tts-1`) are
listed beside it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from mgpumanager.broker import BROKER, Broker
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import AdapterType

log = logging.getLogger(__name__)

UNREACHABLE_HEADER = "X-Mgpumanager-Unreachable"


def audio_names(broker: Broker) -> list[str]:
    """The consumers that serve OpenAI's audio routes."""
    return [
        name
        for name, c in broker.config.consumers.items()
        if c.type is AdapterType.SPEACHES or (c.type is AdapterType.GENERIC and c.openai)
    ]


async def _ask(broker: Broker, path: str) -> list[tuple[str, Any]]:
    names = audio_names(broker)
    if not names:
        raise BrokerError(
            ErrorCode.NO_CONSUMER,
            "no consumer serves audio (a speaches consumer, or a generic one with openai: true)",
        )
    answers = await asyncio.gather(
        *(
            broker.adapters[n].request_json(
                "GET", path, timeout_s=broker.adapters[n].health_config.timeout_s
            )
            for n in names
        ),
        return_exceptions=True,
    )
    return list(zip(names, answers, strict=True))


def _listed(answer: Any, key: str) -> list[Any] | None:
    if isinstance(answer, list):
        return answer
    if isinstance(answer, dict):
        listed = answer.get(key, answer.get("data"))
        return listed if isinstance(listed, list) else None
    return None


def _entry_id(entry: Any, *keys: str) -> str | None:
    if isinstance(entry, str) and entry:
        return entry
    if isinstance(entry, dict):
        value = next((entry[k] for k in keys if entry.get(k)), None)
        return str(value) if value is not None else None
    return None


def _answer(key: str, items: list[dict[str, Any]], missing: list[str]) -> web.Response:
    headers = {UNREACHABLE_HEADER: ", ".join(missing)} if missing else None
    return web.json_response({"object": "list", key: items, "data": items}, headers=headers)


async def audio_models(request: web.Request) -> web.Response:
    """Every speech model of every consumer that serves audio, with its aliases."""
    broker = request.app[BROKER]
    models: list[dict[str, Any]] = []
    seen: set[str] = set()
    missing: list[str] = []
    for name, answer in await _ask(broker, "/v1/audio/models"):
        listed = None if isinstance(answer, BaseException) else _listed(answer, "models")
        if listed is None:
            log.debug("%s: no audio model list (%s); the catalog's instead", name, answer)
            missing.append(name)
            ids = [m.model for m in broker.catalog.listing([name])]
        else:
            own = [i for i in (_entry_id(m, "id") for m in listed) if i]
            aliases = broker.config.consumers[name].aliases
            ids = own + [alias for alias, target in aliases.items() if target in own]
        for model in ids:
            if model not in seen:
                seen.add(model)
                entry = {"id": model, "name": model, "object": "model", "created": 0}
                models.append({**entry, "owned_by": name})
    return _answer("models", models, missing)


async def audio_voices(request: web.Request) -> web.Response:
    """Every voice of every consumer that serves audio, as each names them."""
    broker = request.app[BROKER]
    voices: list[dict[str, Any]] = []
    seen: set[str] = set()
    missing: list[str] = []
    errors: list[BrokerError] = []
    for name, answer in await _ask(broker, "/v1/audio/voices"):
        listed = None if isinstance(answer, BaseException) else _listed(answer, "voices")
        if listed is None:
            log.debug("%s: no voice list: %s", name, answer)
            missing.append(name)
            if isinstance(answer, BrokerError):
                errors.append(answer)
            continue
        for voice in listed:
            voice_id = _entry_id(voice, "id", "name", "voice_id")
            if voice_id is None or voice_id in seen:
                continue
            seen.add(voice_id)
            extra = voice if isinstance(voice, dict) else {}
            label = str(extra.get("name") or voice_id)
            voices.append({**extra, "id": voice_id, "name": label, "owned_by": name})
    if missing and len(missing) == len(audio_names(broker)):
        raise (
            errors[0]
            if errors
            else BrokerError(
                ErrorCode.UPSTREAM_ERROR,
                f"no consumer answered a voice list ({', '.join(missing)})",
            )
        )
    return _answer("voices", voices, missing)
