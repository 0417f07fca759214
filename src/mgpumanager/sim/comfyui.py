"""A fake ComfyUI server (docs/upstreams.md, "ComfyUI"): asynchronous prompts on its own queue.

- ``POST /prompt`` validates the graph and answers AT ONCE ``{"prompt_id", "number",
  "node_errors": {}}``; one worker task runs the queue afterwards. A broker that releases the
  GPU when ``/prompt`` answers lets the next job collide with this one.
- The worker, per prompt: on the very first run it allocates a CUDA context (``ctx_mib``, tag
  ``cuda_context``) that is NEVER freed; it loads the model if needed (``load_s``, then
  ``model_mib`` under tag ``weights``), runs the graph's nodes over ``run_s``, sends the events
  to the prompt's ``client_id``, and writes ``/history``. Event order, as ComfyUI's
  ``main.py`` and ``execution.py`` do it: ``status`` (the worker took it),
  ``execution_start``, ``execution_cached``, per node ``progress_state`` + ``executing`` (+
  ``executed`` for output nodes) + ``progress_state``, then ``execution_success`` /
  ``execution_error`` / ``execution_interrupted``, then the history entry is written, then
  ``status`` and ``executing`` with ``"node": null``. (So ``/history`` may still be ``{}`` when
  ``execution_success`` arrives; ``node: null`` is the reliable "done".) A prompt posted with
  no ``client_id`` sends none of these but ``status``, ``progress_state`` and
  ``execution_interrupted`` (to everyone): in particular no ``node: null``.
- Outputs are cached as ComfyUI's executor caches them: a node whose class and inputs (its
  upstream nodes' included) are those of a node of the previous prompt is not run again; it
  is listed in ``execution_cached`` and an output node sends its cached ``executed``. A graph
  run again unchanged takes no time and loads nothing. ``/free`` with ``free_memory`` clears
  that cache.
- ``device="cpu"`` (the setting) is a ComfyUI started with ``--cpu``: the model goes to the
  machine's RAM, nothing to the GPU, and ``/system_stats`` lists a ``cpu`` device whose
  ``torch_vram_total`` is that RAM.
- CUDA OOM shows up as ``execution_error`` with ``exception_type`` ``torch.OutOfMemoryError``
  and a history entry with ``status_str: "error"``; the model stays unloaded.
- ``POST /free`` only sets flags and answers 200 at once; the worker unloads after the running
  prompt, or at once when idle, and the memory returns ``free_delay_s`` later. The context stays.
  An empty (non-JSON) body is a 500, as ComfyUI's ``await request.json()`` makes it.
- ``POST /interrupt`` stops the running prompt (optionally only if its id matches) at the next
  node boundary: the node that runs finishes first;
  ``POST /queue {"delete": [...]} | {"clear": true}`` drops pending ones.
- A node class that ``/object_info`` does not list is refused at ``/prompt`` (400,
  ``invalid_prompt``, ``node_errors: {}``), as ComfyUI refuses it.
- Output nodes are those whose ``class_type`` starts with ``Save`` or ``Preview``; a graph with
  none treats its last node as the output (real ComfyUI would refuse it; the fake is lenient).
  An output is named as ComfyUI names it: ``{filename_prefix}_{counter:05}_.png`` (prefix from
  the node's inputs, default ``ComfyUI``; a counter per prefix), type ``output`` (``temp`` for a
  ``Preview`` node), and served by ``GET /view?filename=...&subfolder=...&type=...``.
- ``POST /upload/image`` (multipart: ``image``, optional ``overwrite``, ``subfolder``, ``type``)
  stores an input and answers ``{"name", "subfolder", "type"}``; a name in use gets `` (1)``
  appended unless ``overwrite`` is ``true``/``1`` or the bytes are the same. ``GET /object_info``
  (and ``/object_info/{class}``) describes a handful of core nodes; ``LoadImage`` lists the
  uploaded inputs.
- Every route is served under ``/api/`` too (``/api/prompt``, ``/api/ws``, ...), as newer
  ComfyUI does for its own front end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import WSCloseCode, WSMsgType, web

from mgpumanager.sim._base import (
    FakeService,
    read_json_object,
    sim_sleep,
)
from mgpumanager.sim.activity import ActivitySink, recording
from mgpumanager.sim.comfyui_files import ComfyFiles
from mgpumanager.sim.comfyui_nodes import node_classes
from mgpumanager.sim.gpu import MIB, CudaOutOfMemory, GpuLedger, GpuMemoryView


@dataclass(frozen=True)
class ComfyUISettings:
    name: str = "comfyui"
    owner: str = "comfyui"
    model_mib: int = 12000
    ctx_mib: int = 300
    load_s: float = 3.0
    run_s: float = 4.0  # one prompt, spread over its nodes
    free_delay_s: float = 1.0
    max_history: int = 10000
    # "cpu": a ComfyUI started with --cpu (models in RAM, none on the card); "cuda": on the GPU.
    device: Literal["cuda", "cpu"] = "cuda"
    ram_mib: int = 64 * 1024


@dataclass(frozen=True)
class QueueItem:
    number: int
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    @property
    def client_id(self) -> str | None:
        cid = self.extra_data.get("client_id")
        return cid if isinstance(cid, str) else None

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class _Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


def _error(kind: str, message: str, details: str = "") -> web.Response:
    return web.json_response(
        {
            "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
            "node_errors": {},
        },
        status=400,
    )


def _ms() -> int:
    return int(time.time() * 1000)


class FakeComfyUI(FakeService):
    def __init__(
        self,
        settings: ComfyUISettings | None = None,
        *,
        ledger: GpuLedger,
        activity: ActivitySink | None = None,
    ) -> None:
        self.settings = settings or ComfyUISettings()
        self.queue: list[QueueItem] = []
        self.running: QueueItem | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.prompts_started: list[str] = []
        self.model_loaded = False
        self.ctx_allocated = False
        self.store = ComfyFiles()  # generated images and uploads
        self.sockets: dict[str, set[web.WebSocketResponse]] = {}
        self.flags: dict[str, bool] = {}
        # The executor's output cache: node signature -> its `executed` output (None: none).
        self.cache: dict[str, dict[str, Any] | None] = {}
        self._number = itertools.count()
        self._wake = asyncio.Event()
        self._interrupt = asyncio.Event()
        super().__init__(
            name=self.settings.name, owner=self.settings.owner, ledger=ledger, activity=activity
        )

    @property
    def queue_remaining(self) -> int:
        return len(self.queue) + (1 if self.running is not None else 0)

    def _routes(self, router: web.UrlDispatcher) -> None:
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/prompt", self._get_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_one),
            ("POST", "/history", self._post_history),
            ("POST", "/interrupt", self._post_interrupt),
            ("POST", "/free", self._post_free),
            ("GET", "/system_stats", self._system_stats),
            ("GET", "/view", self.store.view),
            ("POST", "/upload/image", self.store.upload_image),
            ("GET", "/object_info", self.store.object_info),
            ("GET", "/object_info/{node_class}", self.store.object_info_one),
            ("GET", "/ws", self._ws),
        ]
        for prefix in ("", "/api"):
            for method, path, handler in routes:
                if method == "GET":
                    router.add_get(prefix + path, handler)  # GET also answers HEAD
                else:
                    router.add_route(method, prefix + path, handler)

    async def _on_startup(self) -> None:
        self.spawn(self._worker(), name=f"{self.name}-worker")

    async def _on_shutdown(self) -> None:
        for group in list(self.sockets.values()):
            for ws in list(group):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    # -- websocket ------------------------------------------------------------------------

    async def _send(self, event: str, data: dict[str, Any], client_id: str | None) -> None:
        """To the socket(s) of ``client_id``; to everyone when it is None (as ComfyUI does)."""
        if client_id is None:
            targets = [ws for group in self.sockets.values() for ws in group]
        else:
            targets = list(self.sockets.get(client_id, ()))
        for ws in targets:
            if not ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_json({"type": event, "data": data})

    async def _broadcast_status(self) -> None:
        await self._send(
            "status", {"status": {"exec_info": {"queue_remaining": self.queue_remaining}}}, None
        )

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        sid = request.query.get("clientId") or uuid.uuid4().hex
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        # Like server.py: one socket per client id; a reconnect with the same id takes over and
        # the older socket gets no more events (it is not closed, just forgotten).
        self.sockets[sid] = {ws}
        try:
            await ws.send_json(
                {
                    "type": "status",
                    "data": {
                        "status": {"exec_info": {"queue_remaining": self.queue_remaining}},
                        "sid": sid,
                    },
                }
            )
            async for msg in ws:
                if msg.type is WSMsgType.ERROR:
                    break
        finally:
            group = self.sockets.get(sid)
            if group is not None:
                group.discard(ws)
                if not group:
                    del self.sockets[sid]
        return ws

    # -- worker ---------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            if self.flags:
                await self._apply_flags()
            if not self.queue:
                self._wake.clear()
                if self.flags:
                    continue
                await self._wake.wait()
                continue
            item = self.queue.pop(0)
            self.running = item
            self._interrupt.clear()
            await self._broadcast_status()  # PromptQueue.get() says so too
            await self._execute(item)

    async def _apply_flags(self) -> None:
        flags, self.flags = self.flags, {}
        free_memory = flags.get("free_memory", False)
        if free_memory:
            self.cache.clear()  # main.py: e.reset()
        if flags.get("unload_models", free_memory) and self.model_loaded:
            self.model_loaded = False
            self.unload_count += 1
            await sim_sleep(self.settings.free_delay_s)
            if self.settings.device != "cpu":
                await self.ledger.release(self.owner, "weights")  # the CUDA context stays

    async def _ensure_model(self) -> None:
        if self.settings.device == "cpu":  # into the machine's RAM: nothing on the card
            if not self.model_loaded:
                await sim_sleep(self.settings.load_s)
                self.model_loaded = True
                self.load_count += 1
            return
        try:
            if not self.ctx_allocated:
                await self.ledger.allocate(self.owner, self.settings.ctx_mib, "cuda_context")
                self.ctx_allocated = True
            if not self.model_loaded:
                await sim_sleep(self.settings.load_s)
                await self.ledger.allocate(self.owner, self.settings.model_mib, "weights")
                self.model_loaded = True
                self.load_count += 1
        except CudaOutOfMemory:
            self.oom_count += 1
            raise

    async def _run_node_s(self, seconds: float) -> bool:
        """``seconds`` of node work; True when interrupted. ComfyUI checks its interrupt flag
        between nodes (and inside the few that loop, such as a sampler's steps): an
        /interrupt stops the prompt at the next node boundary, not in the middle of one."""
        if self._interrupt.is_set():
            return True
        await sim_sleep(seconds)
        return False

    async def _execute(self, item: QueueItem) -> None:
        pid, cid = item.prompt_id, item.client_id
        messages: list[list[Any]] = []

        async def event(kind: str, data: dict[str, Any], broadcast: bool = False) -> None:
            """execution.py's add_message: recorded in the history entry; sent to the prompt's
            client, or to everyone when it has none and the event is broadcast."""
            data = {**data, "timestamp": _ms()}
            messages.append([kind, data])
            if cid is not None or broadcast:
                await self._send(kind, data, cid)

        async def to_client(kind: str, data: dict[str, Any]) -> None:
            if cid is not None:  # per-node events go to the prompt's client only
                await self._send(kind, data, cid)

        progress: dict[str, dict[str, Any]] = {}

        async def node_state(node_id: str, state: str) -> None:
            progress[node_id] = {
                "value": 1.0 if state == "finished" else 0.0,
                "max": 1.0,
                "state": state,
                "node_id": node_id,
                "prompt_id": pid,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            # WebUIProgressHandler: to the prompt's client; to everyone when it has none.
            await self._send("progress_state", {"prompt_id": pid, "nodes": dict(progress)}, cid)

        self.prompts_started.append(pid)
        signatures = _signatures(item.prompt)
        cached = [n for n in item.prompt if signatures[n] in self.cache]
        # Like the executor's cache, only what the current prompt uses is kept.
        self.cache = {sig: self.cache[sig] for sig in signatures.values() if sig in self.cache}
        await event("execution_start", {"prompt_id": pid})
        await event("execution_cached", {"nodes": cached, "prompt_id": pid})
        outputs: dict[str, Any] = {}
        executed: list[str] = []
        node_ids = list(item.prompt)
        to_run = [n for n in node_ids if n not in cached]
        success = False
        try:
            if to_run:
                await self._ensure_model()
            per_node_s = self.settings.run_s / len(to_run) if to_run else 0.0
            async with recording(self.activity, self.name) if to_run else _nothing():
                for node_id in node_ids:
                    if node_id in cached:
                        # Only output nodes are staged; a cached one reports its old output.
                        out = self.cache[signatures[node_id]]
                        if node_id in item.outputs:
                            if out is not None:
                                outputs[node_id] = out
                                await to_client("executed", _executed(node_id, out, pid))
                            await node_state(node_id, "finished")
                        executed.append(node_id)
                        continue
                    if self._interrupt.is_set():
                        raise _Interrupted(node_id)
                    await node_state(node_id, "running")
                    data = {"node": node_id, "display_node": node_id, "prompt_id": pid}
                    await to_client("executing", data)
                    if await self._run_node_s(per_node_s):
                        raise _Interrupted(node_id)
                    executed.append(node_id)
                    out = None
                    if node_id in item.outputs:
                        out = {"images": [self.store.save_image(item.prompt[node_id])]}
                        outputs[node_id] = out
                        await to_client("executed", _executed(node_id, out, pid))
                    self.cache[signatures[node_id]] = out
                    await node_state(node_id, "finished")
            success = True
            await event("execution_success", {"prompt_id": pid})
        except CudaOutOfMemory as exc:
            node = node_ids[0]
            await event(
                "execution_error",
                {
                    "prompt_id": pid,
                    "node_id": node,
                    "node_type": item.prompt[node].get("class_type"),
                    "executed": executed,
                    "exception_message": f"{exc}\n",
                    "exception_type": "torch.OutOfMemoryError",
                    "traceback": ["torch.OutOfMemoryError: " + str(exc)],
                    "current_inputs": {},
                    "current_outputs": [],
                },
            )
        except _Interrupted as exc:
            await event(
                "execution_interrupted",
                {
                    "prompt_id": pid,
                    "node_id": exc.node_id,
                    "node_type": item.prompt[exc.node_id].get("class_type"),
                    "executed": executed,
                },
                broadcast=True,
            )
        self.history[pid] = {
            "prompt": item.as_list(),
            "outputs": outputs,
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": messages,
            },
            "meta": {n: {"node_id": n, "display_node": n} for n in outputs},
        }
        while len(self.history) > self.settings.max_history:
            del self.history[next(iter(self.history))]
        self.running = None
        await self._broadcast_status()
        # main.py sends the end only where the prompt has a client_id, and only to it.
        await to_client("executing", {"node": None, "prompt_id": pid})

    # -- handlers -------------------------------------------------------------------------

    async def _post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error("invalid_prompt", "Invalid JSON body")
        if not isinstance(body, dict) or "prompt" not in body:
            return _error("no_prompt", "No prompt provided", "No prompt provided")
        graph = body["prompt"]
        if not isinstance(graph, dict) or not graph:
            return _error(
                "invalid_prompt", "Cannot execute because the prompt is empty or not an object."
            )
        for node_id, node in graph.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                return _error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
            if node["class_type"] not in node_classes():
                return _error(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                )
        outputs = [
            n
            for n, node in graph.items()
            if str(node["class_type"]).startswith(("Save", "Preview"))
        ]
        if not outputs:
            outputs = [list(graph)[-1]]
        extra = body.get("extra_data")
        extra_data: dict[str, Any] = dict(extra) if isinstance(extra, dict) else {}
        if isinstance(body.get("client_id"), str):
            extra_data["client_id"] = body["client_id"]
        prompt_id = body.get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            prompt_id = str(uuid.uuid4())
        number = next(self._number)
        if isinstance(body.get("number"), int | float):
            number = int(body["number"])
        elif body.get("front"):
            number = -number
        item = QueueItem(number, prompt_id, graph, extra_data, outputs)
        self.queue.append(item)
        self.queue.sort(key=lambda i: i.number)
        self._wake.set()
        await self._broadcast_status()
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def _get_prompt(self, _request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.queue_remaining}})

    async def _get_queue(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "queue_running": [self.running.as_list()] if self.running is not None else [],
                "queue_pending": [i.as_list() for i in self.queue],
            }
        )

    async def _post_queue(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        before = len(self.queue)
        if body.get("clear"):
            self.queue.clear()
        delete = body.get("delete")
        if isinstance(delete, list):
            self.queue = [i for i in self.queue if i.prompt_id not in delete]
        if len(self.queue) != before:
            await self._broadcast_status()
        return web.Response(status=200)

    async def _get_history(self, request: web.Request) -> web.Response:
        items = list(self.history.items())
        max_items = request.query.get("max_items")
        if max_items is not None and max_items.isdigit():
            items = items[-int(max_items) :] if int(max_items) > 0 else []
        return web.json_response(dict(items))

    async def _get_history_one(self, request: web.Request) -> web.Response:
        pid = request.match_info["prompt_id"]
        entry = self.history.get(pid)
        return web.json_response({pid: entry} if entry is not None else {})

    async def _post_history(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        if body.get("clear"):
            self.history.clear()
        delete = body.get("delete")
        if isinstance(delete, list):
            for pid in delete:
                self.history.pop(str(pid), None)
        return web.Response(status=200)

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        wanted = body.get("prompt_id")
        running = self.running
        if running is not None and (wanted is None or wanted == running.prompt_id):
            self._interrupt.set()
        return web.Response(status=200)

    async def _post_free(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()  # server.py: an empty body raises, aiohttp answers 500
        except ValueError:
            return web.Response(
                status=500, text="500 Internal Server Error\n\nServer got itself in trouble"
            )
        if not isinstance(body, dict):
            return web.Response(
                status=500, text="500 Internal Server Error\n\nServer got itself in trouble"
            )
        for key in ("unload_models", "free_memory"):
            if key in body:
                self.flags[key] = bool(body[key])
        self._wake.set()
        return web.Response(status=200)

    async def _system_stats(self, _request: web.Request) -> web.Response:
        held_mib = (self.settings.ctx_mib if self.ctx_allocated else 0) + (
            self.settings.model_mib if self.model_loaded else 0
        )
        total_mib = free_mib = 0
        if isinstance(self.ledger, GpuMemoryView):
            mem = await self.ledger.memory()
            total_mib, free_mib = mem.total_mib, mem.free_mib
        device: dict[str, Any] = {
            "name": "cuda:0 Simulated GPU : cudaMallocAsync",
            "type": "cuda",
            "index": 0,
            "vram_total": total_mib * MIB,
            "vram_free": free_mib * MIB,
            "torch_vram_total": held_mib * MIB,
            "torch_vram_free": 0,
        }
        if self.settings.device == "cpu":
            # main.py --cpu: the "device" is the machine, its figures the machine's RAM.
            ram = self.settings.ram_mib * MIB
            device = {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": ram,
                "vram_free": ram // 2,
                "torch_vram_total": ram,
                "torch_vram_free": ram // 2,
            }
        return web.json_response(
            {
                "system": {
                    "os": "posix",
                    "ram_total": 64 * 1024 * MIB,
                    "ram_free": 48 * 1024 * MIB,
                    "comfyui_version": "0.3.60",
                    "python_version": "3.11.7",
                    "pytorch_version": "2.7.1+cu128",
                    "embedded_python": False,
                    "argv": ["main.py"],
                },
                "devices": [device],
            }
        )


def _signatures(graph: dict[str, Any]) -> dict[str, str]:
    """Each node's cache key: its class and inputs, with each link replaced by the linked
    node's key (so a change upstream changes every key below it), as ComfyUI's input
    signature does."""
    keys: dict[str, str] = {}

    def key(node_id: str, seen: frozenset[str]) -> str:
        if node_id in keys:
            return keys[node_id]
        node = graph.get(node_id)
        if not isinstance(node, dict) or node_id in seen:
            return json.dumps(["missing", node_id])
        inputs = node.get("inputs")
        resolved: dict[str, Any] = {}
        for name, value in (inputs if isinstance(inputs, dict) else {}).items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                value = ["link", key(value[0], seen | {node_id}), value[1]]
            resolved[name] = value
        keys[node_id] = json.dumps([node.get("class_type"), resolved], sort_keys=True)
        return keys[node_id]

    for node_id in graph:
        key(node_id, frozenset())
    return keys


def _executed(node_id: str, output: dict[str, Any], prompt_id: str) -> dict[str, Any]:
    return {"node": node_id, "display_node": node_id, "output": output, "prompt_id": prompt_id}


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield
