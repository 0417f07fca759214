"""One GPU job as the surface that received it resolved it.

Built once per request, where the request's dialect is understood (the facade, Ollama's API,
the OpenAI routes, a consumer's own API), then read as it is by the broker (health gate, body,
lease), the scheduler's queue (priority, label, model) and the consumer's adapter (the call).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mgpumanager.registry import HttpCall
from mgpumanager.relay.proxy import Body


@dataclass(frozen=True, slots=True)
class JobSpec:
    """- `consumer`: who runs it; `call`: the method and path it is sent to there (a facade
      kind's registry path, or the client's own raw path, still percent-encoded); `kind`: the
      facade kind (`llm`, `tts`, ...) where it came through the facade, else None;
    - `model`: the model the request names, where the surface read one (its cost is that
      model's); `body`: the body as the surface read it (an alias resolved), else None (the
      broker receives it whole before the job queues);
    - `priority`: an `X-Priority` the caller may ask for, else None (the consumer's own);
    - `label`: what the queue, the events and recent jobs call it;
    - `streams`: the client asked for a streamed answer (Ollama NDJSON, OpenAI SSE)."""

    consumer: str
    call: HttpCall
    kind: str | None = None
    model: str | None = None
    body: Body | None = None
    priority: int | None = None
    label: str = ""
    streams: bool = False

    def with_body(self, body: Body | None) -> JobSpec:
        return dataclasses.replace(self, body=body)
