"""No client waits in silence: a streamed request that must wait (queued behind another job,
or its model loading) gets its status line and headers at once, then a frame every
`feedback_interval_s` that its client skips or shows as nothing, until the upstream's first
bytes; then the upstream's own stream follows unchanged on the same answer.

Frames, by protocol (`FrameKind`):
- Ollama `/api/generate`, `/api/chat`: a chunk of the endpoint's own shape with empty text and
  `"done": false` (the `ollama` clients, Open WebUI and LangChain show nothing for it);
- OpenAI SSE (chat/completions, completions): a comment line, `: queued, 2 ahead`, which every
  SSE parser skips;
- a generic consumer's declared streamed routes: the consumer's own `keepalive` frame;
- `early_headers` on a non-streamed JSON answer: a newline (JSON whitespace).
With `loading_notice`, the wait is also said in the visible channel once per change (Ollama
`thinking`, OpenAI `delta.reasoning_content`).

An error after the headers went out is sent in-band, in the protocol's own error frame (Ollama
`{"error": ...}` as the last line, OpenAI `data: {"error": {...}}`), and the answer ends. An
upstream that answers 4xx/5xx after the headers is relayed the same way: its own error body
where it is one of that protocol, else the broker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from mgpumanager.errors import BrokerError, ClientDisconnected, Dialect, ErrorCode
from mgpumanager.registry import ConsumerConfig, HttpCall
from mgpumanager.relay.context import context

# The most of an upstream's error body read to relay it in-band.
ERROR_BODY_BYTES = 64 * 1024


class FrameKind(enum.StrEnum):
    OLLAMA_GENERATE = "ollama_generate"
    OLLAMA_CHAT = "ollama_chat"
    OPENAI_CHAT = "openai_chat"
    OPENAI_COMPLETIONS = "openai_completions"
    GENERIC = "generic"  # the consumer's declared keepalive frame
    JSON = "json"  # early_headers on a non-streamed answer: JSON whitespace


_CONTENT_TYPES = {
    FrameKind.OLLAMA_GENERATE: "application/x-ndjson",
    FrameKind.OLLAMA_CHAT: "application/x-ndjson",
    FrameKind.OPENAI_CHAT: "text/event-stream",
    FrameKind.OPENAI_COMPLETIONS: "text/event-stream",
    FrameKind.JSON: "application/json",
}


@dataclass(frozen=True, slots=True)
class FeedbackPlan:
    """How one waiting request is kept informed: its frames, how often, for which model, in
    which dialect its errors come (the JSON kind's), and a generic consumer's keep-alive."""

    kind: FrameKind
    interval_s: float
    model: str | None = None
    loading_notice: bool = False
    dialect: Dialect = Dialect.ENVELOPE
    keepalive: bytes = b""
    content_type: str = ""

    @property
    def sse(self) -> bool:
        return (self.content_type or _CONTENT_TYPES.get(self.kind, "")) == "text/event-stream"


def streamed_kind(path: str) -> FrameKind | None:
    """The frames of a streamed answer of `path` (its dialect's generation routes)."""
    path = path.split("?", 1)[0]
    if path.endswith("/api/chat"):
        return FrameKind.OLLAMA_CHAT
    if path.endswith("/api/generate"):
        return FrameKind.OLLAMA_GENERATE
    if path.endswith("/chat/completions"):
        return FrameKind.OPENAI_CHAT
    if path.endswith("/completions"):
        return FrameKind.OPENAI_COMPLETIONS
    return None


def declared_route(consumer: ConsumerConfig, call: HttpCall) -> HttpCall | None:
    """The consumer's registry entry (`paths`, `scheduled`) that `call` is, if any."""
    path = call.path.split("?", 1)[0]
    for route in [*consumer.paths.values(), *consumer.scheduled]:
        if route.method == call.method and route.path == path:
            return route
    return None


def declares_stream(route: HttpCall, body: object) -> bool:
    """A declared route's answer streams: always (`streams`), or when its body says so."""
    if route.streams:
        return True
    rule = route.stream_detect
    return rule is not None and isinstance(body, dict) and body.get(rule.field) == rule.equals


@dataclass(frozen=True, slots=True)
class WaitState:
    """What a waiting job's frames say: `key` changes when its state does (a visible note is
    sent once per key), `text` is what is said."""

    key: str
    text: str


def wait_text(
    stage: str,
    *,
    consumer: str,
    model: str | None,
    position: int | None,
    expected_start_s: float | None,
    holder: str | None,
) -> WaitState:
    """`stage` "queued" or "loading"; the rest from the queue's estimates."""
    if stage == "loading" or position is None:
        what = model or consumer
        return WaitState(f"loading {what}", f"loading {what}")
    parts = [f"queued, {position} ahead"]
    if holder is not None and holder != consumer:
        parts.append(f"waiting for {holder} to finish")
    key = ", ".join(parts)
    if expected_start_s is not None:
        parts.append(f"starts in ~{expected_start_s:.0f} s")
    return WaitState(key, ", ".join(parts))


Describe = Callable[[int, str], WaitState]


class Feedback:
    """One waiting request's early answer. `on_wait` (the lease's OnWait) starts it: the
    headers go out, then a frame every interval. `hand_over` stops the frames and gives the
    answer to the relay; `fail` ends it with an in-band error."""

    def __init__(
        self,
        request: web.Request,
        plan: FeedbackPlan,
        describe: Describe,
        consumer: str,
        *,
        waits_for: Callable[[str], bool] | None = None,
    ) -> None:
        """`waits_for(stage)`: False where a stage is no real wait (the early answer does not
        start for it)."""
        self.request = request
        self.waits_for = waits_for
        self.plan = plan
        self.describe = describe
        self.consumer = consumer
        self.response: web.StreamResponse | None = None
        self.upstream_status: int | None = None  # an upstream's 4xx/5xx sent in-band
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._job_id = 0
        self._stage = ""
        self._noticed = ""
        self._over = False  # handed over, or ended with an error
        context(request).feedback = self

    @property
    def live(self) -> bool:
        """The headers went out (or are going): the stream is this object's until handed over."""
        return self._task is not None and not self._over

    def on_wait(self, job_id: int, stage: str) -> None:
        self._job_id, self._stage = job_id, stage
        if self._task is None and (self.waits_for is None or self.waits_for(stage)):
            self._task = asyncio.create_task(self._run(), name=f"feedback for {self.consumer}")
            self._task.add_done_callback(_retrieve)

    def stop(self) -> None:
        """No further frames (the current one is finished)."""
        self._stop.set()

    def abandon(self) -> None:
        """The client is gone: stop at once."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        request = self.request
        headers = {
            "Content-Type": self.plan.content_type or _CONTENT_TYPES[self.plan.kind],
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # a proxy in front must not hold the frames back
        }
        response = web.StreamResponse(status=200, headers=headers)
        idle_s = context(request).client_idle_s
        async with asyncio.timeout(idle_s):
            await response.prepare(request)
        context(request).prepared = True
        self.response = response
        while True:
            async with asyncio.timeout(idle_s):
                await response.write(self._frame())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.plan.interval_s):
                    await self._stop.wait()
            if self._stop.is_set():
                return

    async def _settled(self) -> web.StreamResponse:
        """Stop the frames and wait for the last one; the prepared answer."""
        self._stop.set()
        if self._task is None:
            raise RuntimeError("feedback never started")
        try:
            await self._task
        except (ConnectionError, TimeoutError, asyncio.CancelledError) as exc:
            self._over = True
            raise ClientDisconnected(f"the client of {self.consumer} went away") from exc
        if self.response is None:
            raise RuntimeError("feedback ended without an answer")
        return self.response

    async def hand_over(self) -> web.StreamResponse:
        """The upstream's first bytes are here: no more frames; its stream goes on this answer."""
        response = await self._settled()
        self._over = True
        return response

    async def fail(self, error: BrokerError) -> web.StreamResponse:
        """End the answer with `error` in the protocol's own error frame."""
        response = await self._settled()
        self._over = True
        await self._end(response, self._error_frame(error.body(self._dialect)))
        return response

    async def upstream_failed(self, status: int, body: bytes) -> web.StreamResponse:
        """The upstream answered `status` (4xx/5xx) after the headers went out: its error in-band,
        its own body where that is an error of this protocol, else the broker's."""
        response = await self._settled()
        self._over = True
        self.upstream_status = status
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = None
        if not (isinstance(parsed, dict) and "error" in parsed):
            text = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
            parsed = BrokerError(
                ErrorCode.UPSTREAM_ERROR,
                f"{self.consumer} answered {status}: {text}",
                consumer=self.consumer,
            ).body(self._dialect)
        await self._end(response, self._error_frame(parsed))
        return response

    async def _end(self, response: web.StreamResponse, frame: bytes) -> None:
        idle_s = context(self.request).client_idle_s
        try:
            async with asyncio.timeout(idle_s):
                await response.write(frame)
                await response.write_eof()
        except (ConnectionError, TimeoutError) as exc:
            raise ClientDisconnected(f"the client of {self.consumer} went away") from exc

    @property
    def _dialect(self) -> Dialect:
        kind = self.plan.kind
        if kind in (FrameKind.OLLAMA_CHAT, FrameKind.OLLAMA_GENERATE):
            return Dialect.OLLAMA
        if kind in (FrameKind.OPENAI_CHAT, FrameKind.OPENAI_COMPLETIONS):
            return Dialect.OPENAI
        return self.plan.dialect

    def _error_frame(self, body: object) -> bytes:
        text = json.dumps(body, separators=(",", ":"))
        if self.plan.sse:
            return f"data: {text}\n\n".encode()
        return f"{text}\n".encode()

    def _frame(self) -> bytes:
        kind = self.plan.kind
        if kind is FrameKind.GENERIC:
            return self.plan.keepalive
        if kind is FrameKind.JSON:
            return b"\n"
        state = self.describe(self._job_id, self._stage)
        notice = None
        if self.plan.loading_notice and state.key != self._noticed:
            self._noticed = state.key
            notice = state.text + "\n"
        model = self.plan.model or ""
        if kind in (FrameKind.OPENAI_CHAT, FrameKind.OPENAI_COMPLETIONS):
            comment = f": {state.text}\n\n".encode()
            if notice is None or kind is FrameKind.OPENAI_COMPLETIONS:
                return comment
            chunk = {
                "id": "mgpumanager-wait",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": 0, "delta": {"reasoning_content": notice}, "finish_reason": None}
                ],
            }
            return comment + f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        line: dict[str, Any] = {"model": model, "created_at": now}
        if kind is FrameKind.OLLAMA_CHAT:
            message: dict[str, str] = {"role": "assistant", "content": ""}
            if notice is not None:
                message["thinking"] = notice
            line["message"] = message
        else:
            line["response"] = ""
            if notice is not None:
                line["thinking"] = notice
        line["done"] = False
        return (json.dumps(line, separators=(",", ":")) + "\n").encode()


def _retrieve(task: asyncio.Task[None]) -> None:
    """A feedback's failure (the client went away) is read by whoever settles it, or nobody."""
    if not task.cancelled():
        task.exception()
