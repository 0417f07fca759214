"""Every error the broker itself answers, and the one place it becomes the JSON envelope.

Tree::

    BrokerError                 code, message, consumer, retryable; HTTP status from ERROR_TABLE
    └── (one class, many codes: the code is data, so the table below is the whole catalogue)

Third-party exceptions (aiohttp, NVML, YAML) are translated into a BrokerError at the boundary
where they occur; nothing else reaches a client.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web


class ErrorCode(enum.StrEnum):
    CONSUMER_UNREACHABLE = "consumer_unreachable"
    NO_CONSUMER = "no_consumer"
    SCHEDULER_ERROR = "scheduler_error"
    BAD_CONSUMER_URL = "bad_consumer_url"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"
    INSUFFICIENT_VRAM = "insufficient_vram"
    EVICTION_FAILED = "eviction_failed"
    LOAD_FAILED = "load_failed"
    UNAUTHORIZED = "unauthorized"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    SHUTTING_DOWN = "shutting_down"


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    retryable: bool
    meaning: str


# The one table code -> HTTP status. README's error table is generated from the same rows
# (tests/test_errors.py checks that the two agree).
ERROR_TABLE: Mapping[ErrorCode, ErrorSpec] = {
    ErrorCode.BAD_REQUEST: ErrorSpec(
        400, False, "malformed request (bad JSON, bad header, bad path)"
    ),
    ErrorCode.UNAUTHORIZED: ErrorSpec(401, False, "missing or wrong bearer token"),
    ErrorCode.NOT_FOUND: ErrorSpec(404, False, "no such route"),
    ErrorCode.NO_CONSUMER: ErrorSpec(404, False, "no consumer is routed for this kind"),
    ErrorCode.METHOD_NOT_ALLOWED: ErrorSpec(405, False, "route exists, method does not"),
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
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.consumer = consumer
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

    def __repr__(self) -> str:
        return f"BrokerError({self.code!s}, {self.message!r}, consumer={self.consumer!r})"


def error_response(err: BrokerError) -> web.Response:
    """The only place a BrokerError becomes an HTTP answer."""
    return web.Response(
        status=err.status,
        body=json.dumps(err.envelope()).encode(),
        content_type="application/json",
        headers=err.headers,
    )


class ClientDisconnected(ConnectionResetError):
    """The facade's client went away while its answer was being written."""
