"""Which job bodies must be JSON, refused before they queue when they are not.

A garbage body on a JSON route would otherwise wait for the GPU, maybe evict another service
to make room, and only then be refused by the upstream. Every surface runs its jobs through
`Broker.run_job`, which asks `check_json` first: the facade (`/v1/llm`), Ollama's and OpenAI's
routes, `/upstream/<consumer>/...` and front doors refuse the same body alike, each in its own
error dialect (the error middleware's).

A route is a JSON route when the client says so (`Content-Type: application/json` or
`...+json`), or when it says nothing more precise (no type, the form type `curl -d` sends by
default, or the generic types other clients default to) and the route only ever takes JSON:
the facade's llm, image, tts and embed kinds, and the upstream paths below. A multipart
upload, audio or any other declared type is the upstream's own to judge.
"""

from __future__ import annotations

from aiohttp import web

from mgpumanager.relay.bodies import parse_json
from mgpumanager.relay.job import JobSpec

# Facade kinds whose bodies are JSON on every upstream type.
JSON_KINDS = frozenset({"llm", "image", "tts", "embed"})
# Upstream routes that take nothing but JSON (Ollama's and OpenAI's generation routes,
# ComfyUI's prompt).
JSON_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/audio/speech",
        "/v1/images/generations",
        "/prompt",
        "/api/prompt",
    }
)
# What a client that did not think about it sends (curl -d; aiohttp's and fetch's defaults for
# bytes and strings): the route decides.
UNSPECIFIC = frozenset(
    {"", "application/x-www-form-urlencoded", "application/octet-stream", "text/plain"}
)


def expects_json(request: web.Request, kind: str | None, path: str) -> bool:
    """Whether the job `kind` (relayed to the upstream's `path`) must have a JSON body."""
    declared = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if declared == "application/json" or declared.endswith("+json"):
        return True
    if declared not in UNSPECIFIC:
        return False
    return kind in JSON_KINDS or path.split("?", 1)[0] in JSON_PATHS


def check_json(request: web.Request, spec: JobSpec) -> None:
    """A bad_request (before the job queues) when a JSON route's body is not JSON. A body past
    the in-memory limit (spooled to disk) is left to the upstream: parsing hundreds of MiB
    would hold the event loop."""
    if not isinstance(spec.body, bytes) or not expects_json(request, spec.kind, spec.call.path):
        return
    parse_json(spec.body, "the request body", spec.consumer)


__all__ = ["JSON_KINDS", "JSON_PATHS", "check_json", "expects_json"]
