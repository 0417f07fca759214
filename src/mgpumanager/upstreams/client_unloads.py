"""Requests by which a client unloads a consumer (or one of its models) itself, through the
broker: seen so that the broker re-reads that consumer at once, instead of learning it at the
next background check and meanwhile planning with figures the upstream has already changed.

- Ollama: `keep_alive: 0` (a number or a Go duration that is zero) on `/api/generate`,
  `/api/chat`, `/api/embed`, `/api/embeddings`. Without a prompt (generate), messages (chat) or
  input (embed) it is a pure unload: Ollama answers at once and runs nothing (Open WebUI's
  unload button). With one, the model runs, then goes.
- ComfyUI: `POST /free` (and `/api/free`).
- vLLM: `POST /sleep`.
- speaches: `DELETE /api/ps/{model}`.
- Any type: the registry's own `unload:` call for that consumer, sent by a client.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mgpumanager.registry import AdapterType, ConsumerConfig

OLLAMA_KEEP_ALIVE_ROUTES = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
# What a request of each route runs, where it runs anything (a pure unload names none).
OLLAMA_WORK_FIELDS = {
    "/api/generate": ("prompt", "images", "suffix"),
    "/api/chat": ("messages",),
    "/api/embed": ("input",),
    "/api/embeddings": ("prompt",),
}
# A Go duration that is zero ("0", "0s", "0m0s", "0.0h"): every number in it is zero.
_ZERO_DURATION = re.compile(r"[+-]?(?:(?:0+(?:\.0*)?|\.0+)(?:ns|us|µs|ms|s|m|h)?)+")


@dataclass(frozen=True)
class ClientUnload:
    """A request that unloads: `model` (None: the whole consumer); `runs`: it runs work first
    (then it is a GPU job like any other, and the unload follows it)."""

    model: str | None
    runs: bool = False


def zero_keep_alive(value: object) -> bool:
    """Whether Ollama reads `value` as keep_alive 0 (unload now)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        return _ZERO_DURATION.fullmatch(value.strip()) is not None
    return False


def client_unload(
    consumer: ConsumerConfig, method: str, path: str, body: Mapping[str, Any] | None = None
) -> ClientUnload | None:
    """What `method path` (a consumer's own path, unquoted, no query) with JSON `body` (where
    read) unloads on `consumer`; None: it unloads nothing."""
    method = method.upper()
    kind = consumer.type
    if kind is AdapterType.OLLAMA and method == "POST" and path in OLLAMA_KEEP_ALIVE_ROUTES:
        if body is None or not zero_keep_alive(body.get("keep_alive")):
            return None
        model = body.get("model")
        runs = any(body.get(f) for f in OLLAMA_WORK_FIELDS[path])
        return ClientUnload(model if isinstance(model, str) and model else None, runs)
    if kind is AdapterType.COMFYUI and method == "POST" and path in ("/free", "/api/free"):
        return ClientUnload(None)
    if kind is AdapterType.VLLM and method == "POST" and path == "/sleep":
        return ClientUnload(None)
    if kind is AdapterType.SPEACHES and method == "DELETE" and path.startswith("/api/ps/"):
        return ClientUnload(path.removeprefix("/api/ps/") or None)
    written = consumer.unload
    if written is None or written.path is None:
        return None
    if written.method.upper() == method and written.path.split("?", 1)[0] == path:
        return ClientUnload(None)
    return None
