"""Telling a service by its answers, never by its port: what `mgpumanager init` asks every
address it probes (side-effect-free GETs), and which of the known services — or an existing
broker — answers like that. Anything else is described, not guessed."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ServiceKind(enum.StrEnum):
    OLLAMA = "ollama"
    COMFYUI = "comfyui"
    SPEACHES = "speaches"
    VLLM = "vllm"
    WHISPER = "whisper"
    MVOICE = "mvoice"
    BROKER = "mgpumanager"  # a broker already: reported, never a consumer

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    ServiceKind.OLLAMA: "Ollama",
    ServiceKind.COMFYUI: "ComfyUI",
    ServiceKind.SPEACHES: "speaches",
    ServiceKind.VLLM: "vLLM",
    ServiceKind.WHISPER: "whisper.cpp server",
    ServiceKind.MVOICE: "mVoice",
    ServiceKind.BROKER: "mgpumanager broker",
}

# -- what a service answered ----------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    server: str
    text: str

    def json(self) -> Any:
        if "json" not in self.content_type and not self.text.lstrip().startswith(("{", "[")):
            return None
        try:
            return json.loads(self.text)
        except ValueError:
            return None

    def json_object(self) -> dict[str, Any]:
        value = self.json()
        return value if isinstance(value, dict) and self.status == 200 else {}


Answers = Mapping[str, Answer | None]

# Every GET a probe sends: side-effect free by HTTP's rules and by what these services do.
PROBE_PATHS = (
    "/",
    "/v1/status",
    "/healthz",
    "/api/version",
    "/api/tags",
    "/api/ps",
    "/system_stats",
    "/v1/models",
    "/is_sleeping",
    "/version",
    "/health",
    "/api/synthesize",
    "/api/admin/unload",
)


def list_of(value: Any, key: str) -> list[Any] | None:
    inner = value.get(key) if isinstance(value, dict) else None
    return inner if isinstance(inner, list) else None


def _get(answers: Answers, path: str) -> Answer | None:
    return answers.get(path)


def ok_json(answers: Answers, path: str) -> dict[str, Any]:
    a = _get(answers, path)
    return a.json_object() if a is not None else {}


def status_of(answers: Answers, path: str) -> int | None:
    a = _get(answers, path)
    return a.status if a is not None else None


def _is_broker(a: Answers) -> bool:
    status = ok_json(a, "/v1/status")
    if {"scheduler", "consumers", "gpu"} <= status.keys():
        return True
    # With a token set only /healthz is open; /v1/status then answers the broker's envelope.
    denied = _get(a, "/v1/status")
    body = denied.json() if denied is not None and denied.status == 401 else None
    return (
        isinstance(body, dict)
        and {"error", "consumer", "retryable"} <= body.keys()
        and ok_json(a, "/healthz").get("status") == "ok"
    )


def _is_ollama(a: Answers) -> bool:
    version = ok_json(a, "/api/version").get("version")
    return isinstance(version, str) and list_of(ok_json(a, "/api/tags"), "models") is not None


def _is_comfyui(a: Answers) -> bool:
    devices = list_of(ok_json(a, "/system_stats"), "devices") or [None]
    return isinstance(devices[0], dict) and "torch_vram_total" in devices[0]


def openai_models(a: Answers) -> list[dict[str, Any]] | None:
    data = list_of(ok_json(a, "/v1/models"), "data")
    return None if data is None else [m for m in data if isinstance(m, dict) and m.get("id")]


def _is_vllm(a: Answers) -> bool:
    models = openai_models(a)
    if models is None:
        return False
    sleeping = ok_json(a, "/is_sleeping").get("is_sleeping")
    return isinstance(sleeping, bool) or any(m.get("owned_by") == "vllm" for m in models)


def speaches_loaded(a: Answers) -> list[str] | None:
    """speaches' /api/ps: a list of model ids (objects with an id tolerated)."""
    models = list_of(ok_json(a, "/api/ps"), "models")
    if models is None:
        return None
    out = []
    for m in models:
        name = m if isinstance(m, str) else m.get("id") if isinstance(m, dict) else None
        if not isinstance(name, str):
            return None  # Ollama-shaped or something else: not speaches
        out.append(name)
    return out


def _is_speaches(a: Answers) -> bool:
    return openai_models(a) is not None and speaches_loaded(a) is not None


def _is_mvoice(a: Answers) -> bool:
    # Its job and admin routes take POST only: a GET finds them (405), a server without them
    # answers 404. /health must answer too.
    health = _get(a, "/health")
    return (
        health is not None
        and health.status == 200
        and status_of(a, "/api/synthesize") == 405
        and status_of(a, "/api/admin/unload") == 405
    )


def _is_whisper_page(a: Answers) -> bool:
    root = _get(a, "/")
    if root is None:
        return False
    return root.server.startswith("whisper.cpp") or "<title>Whisper.cpp Server" in root.text


def is_whisper_refusal(answer: Answer | None) -> bool:
    """whisper-server's answer to `POST /inference` without a file: `{"error": "no 'file'
    field in the request"}` (HTTP 200 from the real server, 400 from some builds)."""
    if answer is None:
        return False
    error = answer.json().get("error") if isinstance(answer.json(), dict) else None
    return isinstance(error, str) and "'file'" in error


def identify(answers: Answers) -> ServiceKind | None:
    """Which known service gave these answers, or None. Order matters: the broker answers
    Ollama's API too, and Ollama answers /api/ps and /v1/models like speaches and vLLM."""
    checks = (
        (ServiceKind.BROKER, _is_broker),
        (ServiceKind.OLLAMA, _is_ollama),
        (ServiceKind.COMFYUI, _is_comfyui),
        (ServiceKind.VLLM, _is_vllm),
        (ServiceKind.SPEACHES, _is_speaches),
        (ServiceKind.MVOICE, _is_mvoice),
        (ServiceKind.WHISPER, _is_whisper_page),
    )
    return next((kind for kind, check in checks if check(answers)), None)


def describe_unknown(answers: Answers) -> str:
    """What an unidentified service answered, briefly, with a hint where one fits."""
    root = _get(answers, "/")
    if all(a is None for a in answers.values()):
        return "accepts connections but does not answer HTTP"
    parts = [f"GET / answered {root.status} {root.content_type or ''}".rstrip()] if root else []
    if openai_models(answers) is not None:
        parts.append(
            "it lists /v1/models like an OpenAI-compatible server: if it uses the GPU, add it "
            "by hand (type: generic, openai: true)"
        )
    elif status_of(answers, "/health") == 200:
        parts.append("/health answers 200: if it uses the GPU, add it by hand (type: generic)")
    else:
        parts.append("like none of Ollama, ComfyUI, speaches, vLLM, whisper.cpp or mVoice")
    return "; ".join(parts)
