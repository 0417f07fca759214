"""Every error the broker itself answers, and the one place it becomes an HTTP answer.

Tree::

    BrokerError                 code, message, consumer, retryable; HTTP status from ERROR_TABLE
    └── (one class, many codes: the code is data, so the table below is the whole catalogue)

Third-party exceptions (aiohttp, NVML, YAML) are translated into a BrokerError at the boundary
where they occur; nothing else reaches a client.

One error, several dialects: the same fields in the shape each surface's clients read, so a user
sees the message and not a bare code (`route_dialect` picks it from the path):

    envelope  the broker's own facade    {"error": code, "message", "consumer", "retryable"}
    ollama    Ollama's API at the root   {"error": message, "code", "consumer", "retryable"}
    openai    OpenAI-compatible /v1      {"error": {"message", "type", "code", "param",
                                                    "consumer", "retryable"}}
    comfyui   a ComfyUI consumer's API   {"error": {"type", "message", "details", "extra_info",
                                                    "code", "consumer", "retryable"},
                                          "node_errors": {}}

The HTTP status is the table's in every dialect.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class ErrorCode(enum.StrEnum):
    CONSUMER_UNREACHABLE = "consumer_unreachable"
    NO_CONSUMER = "no_consumer"
    SCHEDULER_ERROR = "scheduler_error"
    BAD_CONSUMER_URL = "bad_consumer_url"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"
    INSUFFICIENT_VRAM = "insufficient_vram"
    EVICTION_FAILED = "eviction_failed"
    LOAD_FAILED = "load_failed"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    CLIENT_TIMEOUT = "client_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    SHUTTING_DOWN = "shutting_down"


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    retryable: bool
    meaning: str


# The one table code -> HTTP status. docs/errors.md's error table is generated from the same rows
# (tests/test_errors.py checks that the two agree).
ERROR_TABLE: Mapping[ErrorCode, ErrorSpec] = {
    ErrorCode.BAD_REQUEST: ErrorSpec(
        400, False, "malformed request (bad JSON, bad header, bad path)"
    ),
    ErrorCode.UNAUTHORIZED: ErrorSpec(401, False, "missing or wrong bearer token"),
    ErrorCode.FORBIDDEN: ErrorSpec(
        403, False, "foreign Host or Origin: not a name of the broker or an allowed web page"
    ),
    ErrorCode.NOT_FOUND: ErrorSpec(404, False, "no such route"),
    ErrorCode.NO_CONSUMER: ErrorSpec(404, False, "no consumer is routed for this kind"),
    ErrorCode.MODEL_NOT_FOUND: ErrorSpec(404, False, "no consumer serves the requested model"),
    ErrorCode.METHOD_NOT_ALLOWED: ErrorSpec(405, False, "route exists, method does not"),
    ErrorCode.CLIENT_TIMEOUT: ErrorSpec(
        408, False, "the client sent nothing of its body for client_idle_s"
    ),
    ErrorCode.PAYLOAD_TOO_LARGE: ErrorSpec(413, False, "request body larger than max_body_mib"),
    ErrorCode.SCHEDULER_ERROR: ErrorSpec(
        500, True, "internal scheduler fault (a bug: please report)"
    ),
    ErrorCode.BAD_CONSUMER_URL: ErrorSpec(500, False, "the consumer's configured URL is unusable"),
    ErrorCode.CONSUMER_UNREACHABLE: ErrorSpec(
        502, True, "last health probe failed or connect failed"
    ),
    ErrorCode.UPSTREAM_ERROR: ErrorSpec(
        502, True, "upstream broke the protocol or died mid-answer"
    ),
    ErrorCode.LOAD_FAILED: ErrorSpec(502, True, "load call failed or not ready in load_timeout_s"),
    ErrorCode.QUEUE_FULL: ErrorSpec(503, True, "max_queue jobs already waiting (see Retry-After)"),
    ErrorCode.EVICTION_FAILED: ErrorSpec(
        503, True, "an unload was not confirmed by the GPU reading"
    ),
    ErrorCode.SHUTTING_DOWN: ErrorSpec(503, True, "broker is draining after SIGTERM"),
    ErrorCode.TOO_MANY_CONNECTIONS: ErrorSpec(
        503, True, "max_connections client connections are open already (see Retry-After)"
    ),
    ErrorCode.QUEUE_TIMEOUT: ErrorSpec(504, True, "waited longer than queue_timeout_s for the GPU"),
    ErrorCode.UPSTREAM_TIMEOUT: ErrorSpec(
        504, True, "job ran longer than the consumer's run_timeout_s"
    ),
    ErrorCode.INSUFFICIENT_VRAM: ErrorSpec(
        507, False, "cannot make room (retryable only when busy/pinned residents are in the way)"
    ),
}


class BrokerError(Exception):
    """An error the broker answers itself. `retryable` defaults to the table's value."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        consumer: str | None = None,
        retryable: bool | None = None,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.consumer = consumer
        self.param = param  # the request field at fault ("model"), where one is
        self.retryable = ERROR_TABLE[code].retryable if retryable is None else retryable
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def status(self) -> int:
        return ERROR_TABLE[self.code].status

    def envelope(self) -> dict[str, object]:
        return {
            "error": str(self.code),
            "message": self.message,
            "consumer": self.consumer,
            "retryable": self.retryable,
        }

    def body(self, dialect: Dialect) -> dict[str, object]:
        """The answer's JSON body in `dialect`."""
        if dialect is Dialect.ENVELOPE:
            return self.envelope()
        if dialect is Dialect.OLLAMA:
            # Ollama clients show the string under "error" (ollama-python's ResponseError.error).
            return {
                "error": self.message,
                "code": str(self.code),
                "consumer": self.consumer,
                "retryable": self.retryable,
            }
        if dialect is Dialect.OPENAI:
            # The OpenAI SDKs read message, type, code and param from the nested object.
            return {
                "error": {
                    "message": self.message,
                    "type": openai_type(self.status),
                    "code": str(self.code),
                    "param": self.param,
                    "consumer": self.consumer,
                    "retryable": self.retryable,
                }
            }
        # ComfyUI answers a refused /prompt with this shape; its clients show error.message.
        return {
            "error": {
                "type": str(self.code),
                "message": self.message,
                "details": "",
                "extra_info": {},
                "code": str(self.code),
                "consumer": self.consumer,
                "retryable": self.retryable,
            },
            "node_errors": {},
        }

    def __repr__(self) -> str:
        return f"BrokerError({self.code!s}, {self.message!r}, consumer={self.consumer!r})"


class Dialect(enum.StrEnum):
    ENVELOPE = "envelope"
    OLLAMA = "ollama"
    OPENAI = "openai"
    COMFYUI = "comfyui"


def openai_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    return "invalid_request_error" if status < 500 else "server_error"


# The OpenAI-compatible routes under /v1 (the rest of /v1 is the broker's own facade).
OPENAI_PREFIXES = (
    "/v1/models",
    "/v1/chat/",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/audio/",
    "/v1/images/",
)


def route_dialect(path: str) -> Dialect:
    """The dialect of the routes the broker serves at fixed paths: Ollama's API at the root,
    the OpenAI-compatible /v1 routes, else the envelope. (Under /upstream/<consumer>/ the
    consumer's type decides: its adapter's `dialect`.)"""
    if path == "/" or path.startswith("/api/"):
        return Dialect.OLLAMA
    if path.startswith(OPENAI_PREFIXES):
        return Dialect.OPENAI
    return Dialect.ENVELOPE


class ClientDisconnected(ConnectionResetError):
    """The facade's client went away while its answer was being written."""
