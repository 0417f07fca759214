"""ComfyUI prompts accepted at once, as ComfyUI itself accepts them.

ComfyUI answers `POST /prompt` at once and runs the prompt later; its clients post, then listen
on their websocket or poll `/history`. A prompt that must wait for the GPU (queued behind
another job, or the card being made ready for it) is therefore accepted by the broker: it gets
its `prompt_id` (the client's own, else one the broker picks; ComfyUI honours it when posted),
the answer `{"prompt_id", "number", "node_errors": {}}`, and a place in the broker's queue; it
is posted when the lease is granted, and the lease is held until it has finished, as for any
prompt. A prompt granted at once is posted at once and gets ComfyUI's own answer (a graph
ComfyUI refuses: its 400, as before).

Until it is posted, ComfyUI's own views show it: `GET /queue` lists it in `queue_pending`;
`GET /history/{id}` answers `{}`; websocket `status` messages count it in `queue_remaining`;
`POST /interrupt {"prompt_id"}` and `POST /queue {"delete": [...]}` (or `{"clear": true}`)
remove it. A held prompt that ComfyUI refuses when it is finally posted (400 `invalid_prompt`),
or that never runs (the load failed, the broker shuts down), reaches its client as an
`execution_error` on its websocket (then `executing` with `node: null`, ComfyUI's "done") and
as an error status in `/history/{id}`. A held prompt stays until it runs or is deleted: its
client's leaving does not remove it, and no queue timeout applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mgpumanager.broker import BROKER, MIB, Broker
from mgpumanager.errors import BrokerError, Dialect
from mgpumanager.relay.bodies import receive_whole
from mgpumanager.relay.job import JobSpec
from mgpumanager.relay.spool import SpooledBody
from mgpumanager.scheduling.core import Outcome
from mgpumanager.upstreams.adapters.comfyui import PROMPT_PATHS, ComfyUIAdapter

log = logging.getLogger(__name__)

# A held prompt waits until it runs or is deleted, as on ComfyUI's own queue.
HELD_WAIT_S = 10 * 365 * 86400.0
# A prompt granted at once whose consumer must first be made ready (evictions) is accepted
# once this has passed without it being posted.
READY_GRACE_S = 0.5
# Refused prompts' /history entries kept per consumer.
REFUSED_KEPT = 1000


@dataclass
class HeldPrompt:
    prompt_id: str
    number: int
    body: dict[str, Any]  # as posted: {"prompt": graph, "client_id"?, "prompt_id", ...}

    def queue_item(self) -> list[Any]:
        """The prompt as ComfyUI lists it: (number, prompt_id, prompt, extra_data, outputs)."""
        extra = dict(self.body.get("extra_data") or {})
        if self.body.get("client_id"):
            extra["client_id"] = self.body["client_id"]
        return [self.number, self.prompt_id, self.body.get("prompt", {}), extra, []]


@dataclass
class ConsumerPrompts:
    """One ComfyUI consumer's held prompts, refused prompts' history and client sockets."""

    held: OrderedDict[str, HeldPrompt] = field(default_factory=OrderedDict)
    cancels: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    refused: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    sockets: dict[str, set[web.WebSocketResponse]] = field(default_factory=dict)
    upstream_remaining: int = 0  # queue_remaining as ComfyUI last said it
    numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def status(self) -> dict[str, Any]:
        remaining = self.upstream_remaining + len(self.held)
        return {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}}}

    def send(self, message: dict[str, Any], client_id: str | None = None) -> None:
        """To `client_id`'s sockets, or to every socket of this consumer."""
        text = json.dumps(message)
        targets = (
            self.sockets.get(client_id, set())
            if client_id is not None
            else {ws for group in self.sockets.values() for ws in group}
        )
        for ws in list(targets):
            if not ws.closed:
                task = asyncio.ensure_future(ws.send_str(text))
                task.add_done_callback(_quiet)

    def refuse(self, held: HeldPrompt, message: str, kind: str) -> None:
        """`held` will never run: its client hears so, and /history says so."""
        now_ms = int(time.time() * 1000)
        error: dict[str, Any] = {
            "prompt_id": held.prompt_id,
            "node_id": None,
            "node_type": None,
            "executed": [],
            "exception_message": message,
            "exception_type": kind,
            "traceback": [],
            "current_inputs": {},
            "current_outputs": [],
            "timestamp": now_ms,
        }
        self.refused[held.prompt_id] = {
            "prompt": held.queue_item(),
            "outputs": {},
            "status": {
                "status_str": "error",
                "completed": False,
                "messages": [
                    ["execution_start", {"prompt_id": held.prompt_id, "timestamp": now_ms}],
                    ["execution_error", error],
                ],
            },
            "meta": {},
        }
        while len(self.refused) > REFUSED_KEPT:
            self.refused.popitem(last=False)
        client_id = str(held.body.get("client_id") or "") or None
        if client_id is not None:
            self.send({"type": "execution_error", "data": error}, client_id)
            done = {"type": "executing", "data": {"node": None, "prompt_id": held.prompt_id}}
            self.send(done, client_id)


def _quiet(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # a client that went away meanwhile: nothing to tell


_BY_BROKER: weakref.WeakKeyDictionary[Broker, dict[str, ConsumerPrompts]] = (
    weakref.WeakKeyDictionary()
)


def prompts_of(broker: Broker, name: str) -> ConsumerPrompts:
    """The held prompts of consumer `name` (one set per broker, shared by its listeners)."""
    return _BY_BROKER.setdefault(broker, {}).setdefault(name, ConsumerPrompts())


def holds_prompts(broker: Broker, name: str, method: str, path: str) -> bool:
    """`method path` posts a prompt to a ComfyUI consumer."""
    adapter = broker.adapters.get(name)
    return (
        isinstance(adapter, ComfyUIAdapter)
        and method == "POST"
        and path.split("?", 1)[0] in PROMPT_PATHS
    )


async def submit(request: web.Request, spec: JobSpec) -> web.StreamResponse:
    """POST /prompt of a ComfyUI consumer: posted at once where the GPU is free for it, else
    accepted at once and held until the lease is granted."""
    broker = request.app[BROKER]
    name = spec.consumer
    adapter = broker.adapters[name]
    if not isinstance(adapter, ComfyUIAdapter):
        raise RuntimeError(f"{name} is no ComfyUI consumer")
    broker.gate(name)
    whole = await receive_whole(request, spec.body, broker.config.max_body_mib * MIB, name)
    try:
        body = adapter.prompt_of(whole if whole is not None else b"")
    finally:
        if spec.body is None and isinstance(whole, SpooledBody):
            whole.close()
    prompt_id = str(body.get("prompt_id") or uuid.uuid4())
    body["prompt_id"] = prompt_id
    prompts = prompts_of(broker, name)
    held = HeldPrompt(prompt_id, next(prompts.numbers), body)
    accepted = asyncio.Event()
    run = asyncio.create_task(
        _run(broker, adapter, spec, held, accepted), name=f"prompt {prompt_id}"
    )
    run.add_done_callback(_quiet_run)
    answered = asyncio.ensure_future(accepted.wait())
    try:
        await asyncio.wait([run, answered], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        if not accepted.is_set():
            run.cancel()  # its client left before it was accepted: as before, nothing runs
        raise
    finally:
        answered.cancel()
    if accepted.is_set():
        return web.json_response({"prompt_id": prompt_id, "number": held.number, "node_errors": {}})
    status, answer = run.result()  # posted at once: ComfyUI's own answer
    return web.json_response(answer, status=status)


def _quiet_run(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # read by `submit`, or logged in `_run`


async def _run(
    broker: Broker,
    adapter: ComfyUIAdapter,
    spec: JobSpec,
    held: HeldPrompt,
    accepted: asyncio.Event,
) -> tuple[int, Any]:
    """The prompt's job: queue, lease, post; the lease then held until it has finished."""
    name = spec.consumer
    prompts = prompts_of(broker, name)
    grace: asyncio.TimerHandle | None = None

    def accept() -> None:
        if accepted.is_set():
            return
        accepted.set()
        prompts.held[held.prompt_id] = held
        if current is not None:
            prompts.cancels[held.prompt_id] = current
        prompts.send(prompts.status())

    def on_wait(job_id: int, stage: str) -> None:
        nonlocal grace
        if stage == "queued":
            accept()
        elif grace is None:
            grace = asyncio.get_running_loop().call_later(READY_GRACE_S, accept)

    current = asyncio.current_task()
    if broker.idle is not None:
        broker.idle.interrupt()  # a warm load gives way to a job at once
    try:
        async with broker.lease.job(
            name,
            priority=spec.priority,
            queue_timeout_s=HELD_WAIT_S,
            label=spec.label,
            on_wait=on_wait,
        ) as job:
            if grace is not None:
                grace.cancel()
            _unhold(prompts, held)
            broker.residency.view.job_started(name, None)
            try:
                status, answer = await adapter.post_held(spec.call.path, held.body, job)
            finally:
                broker.residency.view.job_finished(name, None)
            if status >= 400:
                job.outcome, job.status = Outcome.UPSTREAM_ERROR, status
    except BrokerError as err:
        if not accepted.is_set():
            raise
        log.warning("%s: held prompt %s never ran: %s", name, held.prompt_id, err.message)
        prompts.refuse(held, err.message, str(err.code))
        return err.status, err.body(Dialect.COMFYUI)
    except asyncio.CancelledError:
        if accepted.is_set():
            log.info("%s: held prompt %s deleted before it ran", name, held.prompt_id)
        raise
    finally:
        if grace is not None:
            grace.cancel()
        if _unhold(prompts, held):
            prompts.send(prompts.status())
    if accepted.is_set() and status >= 400:
        error = answer.get("error") if isinstance(answer, dict) else None
        message = error.get("message") if isinstance(error, dict) else str(error or answer)
        kind = error.get("type") if isinstance(error, dict) else "invalid_prompt"
        log.warning("%s refused held prompt %s: %s", name, held.prompt_id, message)
        prompts.refuse(held, str(message), str(kind or "invalid_prompt"))
    return status, answer


def _unhold(prompts: ConsumerPrompts, held: HeldPrompt) -> bool:
    prompts.cancels.pop(held.prompt_id, None)
    return prompts.held.pop(held.prompt_id, None) is not None


def delete(broker: Broker, name: str, ids: list[str] | None) -> int:
    """Remove held prompts (`ids`; None: all of them) from the broker's queue. Answers how many."""
    prompts = prompts_of(broker, name)
    chosen = list(prompts.held) if ids is None else [i for i in ids if i in prompts.held]
    for prompt_id in chosen:
        task = prompts.cancels.pop(prompt_id, None)
        prompts.held.pop(prompt_id, None)
        if task is not None:
            task.cancel()
    if chosen:
        prompts.send(prompts.status())
    return len(chosen)


# -- ComfyUI's own views, with the held prompts in them ---------------------------------------


def _view(path: str) -> str:
    """`path` without ComfyUI's `/api` prefix."""
    return path[len("/api") :] if path.startswith("/api/") else path


def intercepts(broker: Broker, name: str, method: str, path: str) -> bool:
    """A request of a ComfyUI consumer's own API that sees or changes the held prompts."""
    if not isinstance(broker.adapters.get(name), ComfyUIAdapter):
        return False
    view = _view(path)
    return (method, view) in (("GET", "/queue"), ("POST", "/queue"), ("POST", "/interrupt")) or (
        method == "GET" and view.startswith("/history/")
    )


async def serve_view(request: web.Request, name: str, path: str) -> web.StreamResponse:
    """/queue, /history/{id}, /interrupt of a ComfyUI consumer, the held prompts included."""
    broker = request.app[BROKER]
    prompts = prompts_of(broker, name)
    view = _view(path.split("?", 1)[0])
    if request.method == "GET" and view == "/queue" and prompts.held:
        adapter = broker.adapters[name]
        queue = await adapter.request_json("GET", path, timeout_s=adapter.health_config.timeout_s)
        if not isinstance(queue, dict):
            queue = {"queue_running": [], "queue_pending": []}
        pending = list(queue.get("queue_pending") or [])
        pending += [h.queue_item() for h in prompts.held.values()]
        return web.json_response({**queue, "queue_pending": pending})
    if request.method == "GET" and view.startswith("/history/"):
        prompt_id = view[len("/history/") :]
        if prompt_id in prompts.held:
            return web.json_response({})
        if prompt_id in prompts.refused:
            return web.json_response({prompt_id: prompts.refused[prompt_id]})
    if request.method == "GET":
        return await broker.passthrough(request, name, path)
    raw = await request.read()
    try:
        body: Any = json.loads(raw) if raw else {}
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    if view == "/interrupt":
        prompt_id = body.get("prompt_id")
        if isinstance(prompt_id, str) and delete(broker, name, [prompt_id]):
            return web.Response(status=200)
    else:  # POST /queue
        if body.get("clear") is True:
            delete(broker, name, None)
        ids = body.get("delete")
        if isinstance(ids, list):
            delete(broker, name, [str(i) for i in ids])
    return await broker.passthrough(request, name, path, body=raw)


class HeldPromptSockets:
    """A ComfyUI client's relayed websocket: the broker's messages about its held prompts go to
    it, and ComfyUI's `status` counts the held prompts too."""

    def __init__(self, prompts: ConsumerPrompts, client_id: str) -> None:
        self.prompts = prompts
        self.client_id = client_id

    def opened(self, ws: web.WebSocketResponse) -> None:
        self.prompts.sockets.setdefault(self.client_id, set()).add(ws)

    def closed(self, ws: web.WebSocketResponse) -> None:
        group = self.prompts.sockets.get(self.client_id)
        if group is not None:
            group.discard(ws)
            if not group:
                del self.prompts.sockets[self.client_id]

    def to_client(self, text: str) -> str:
        if '"status"' not in text[:24]:
            return text
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            message = json.loads(text)
            info = message["data"]["status"]["exec_info"]
            self.prompts.upstream_remaining = int(info["queue_remaining"])
            if self.prompts.held:
                info["queue_remaining"] = self.prompts.upstream_remaining + len(self.prompts.held)
                return json.dumps(message)
        return text


def socket_hooks(broker: Broker, name: str, client_id: str) -> HeldPromptSockets | None:
    if not isinstance(broker.adapters.get(name), ComfyUIAdapter):
        return None
    return HeldPromptSockets(prompts_of(broker, name), client_id)
