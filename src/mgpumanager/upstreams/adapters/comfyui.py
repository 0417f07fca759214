"""`type: comfyui` — ComfyUI's asynchronous prompts.

`POST /prompt` answers at once and the work runs afterwards, so an image job holds the lease
until its prompt has finished (websocket events, `/history` as the fallback). The broker picks
the prompt_id. Unload is `POST /free`, which only sets flags: the GPU reading confirms. The
registry's `unload:` replaces that call; `load:` does not apply (ComfyUI loads lazily, inside
the first prompt).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from mgpumanager.errors import BrokerError, Dialect, ErrorCode
from mgpumanager.registry import ConsumerConfig, HealthConfig, HttpCall
from mgpumanager.relay.bodies import encode_json, parse_json
from mgpumanager.relay.job import JobSpec
from mgpumanager.relay.proxy import Body
from mgpumanager.scheduling.lease import JobHandle
from mgpumanager.upstreams.adapters.base import BaseAdapter, ResidencyReport, residual_allowance_mib

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PROMPT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Newer ComfyUI serves every route under /api/ too; its own front end posts to /api/prompt.
PROMPT_PATHS = ("/prompt", "/api/prompt")
# Sent when a prompt's run is over; its /history entry and `executing {node: null}` follow.
RUN_ENDED = frozenset({"execution_success", "execution_error", "execution_interrupted"})
ENDING_POLL_S = 0.02


# What torch calls a card: ROCm builds of torch say "cuda" too; some report "hip"/"rocm".
CARD_TYPES = frozenset({"cuda", "rocm", "hip"})


def card_device(devices: object, gpu_index: int) -> dict[str, Any] | None:
    """The /system_stats device that is the broker's GPU, or None when ComfyUI runs on none.

    A `--cpu` ComfyUI lists `{"type": "cpu", "index": null, "torch_vram_total": <RAM>}` and an
    Apple one `mps`: neither holds card memory. Among cards, the one with the broker's index;
    where ComfyUI lists a single card under another index (CUDA_VISIBLE_DEVICES renumbers
    from 0), that one: counting it is safe, missing it would let a load run into its memory.
    """
    if not isinstance(devices, list):
        return None
    cards = [d for d in devices if isinstance(d, dict) and d.get("type") in CARD_TYPES]
    for card in cards:
        if card.get("index") == gpu_index:
            return card
    return cards[0] if len(cards) == 1 else None


class ComfyUIAdapter(BaseAdapter):
    unloads_itself = True  # /free
    own_dialect = Dialect.COMFYUI
    default_health = HealthConfig(path="/system_stats")
    default_paths = {"image": HttpCall(path="/prompt")}
    history_poll_s = 0.25
    cancel_wait_s = 10.0  # how long a cancelled prompt may take to leave ComfyUI's queue

    def __init__(self, name: str, config: ConsumerConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(name, config, session)
        self.ours: set[str] = set()  # prompt ids the broker posted and that have not finished

    async def queued_ids(self) -> set[str]:
        """Prompt ids running or waiting on ComfyUI's own queue, whoever posted them."""
        queue = await self.request_json("GET", "/queue", timeout_s=self.health_config.timeout_s)
        ids = set()
        for key in ("queue_running", "queue_pending"):
            items = queue.get(key, []) if isinstance(queue, dict) else []
            for item in items if isinstance(items, list) else []:
                if isinstance(item, list) and len(item) > 1:
                    ids.add(str(item[1]))
        return ids

    async def torch_reserved_mib(self) -> int | None:
        """What ComfyUI's own allocator holds on the broker's GPU: `torch_vram_total` of the
        /system_stats device that is that card. It sees models loaded by anyone (its web page
        too) and works where a container hides the process from the GPU reader. None: no
        answer; 0: ComfyUI runs on no card (`--cpu`, MPS), where `torch_vram_total` is the
        machine's RAM, not card memory."""
        figure = await self._card_figure()
        return None if figure is None else figure[1]

    async def _card_figure(self) -> tuple[str, int] | None:
        """(what the figure is, MiB), or None when /system_stats says nothing usable."""
        stats = await self.request_json(
            "GET", "/system_stats", timeout_s=self.health_config.timeout_s
        )
        devices = stats.get("devices") if isinstance(stats, dict) else None
        device = card_device(devices, self.gpu_index)
        if device is None:
            if not isinstance(devices, list) or not devices:
                return None
            first = devices[0] if isinstance(devices[0], dict) else {}
            return f"runs on {first.get('type') or 'no GPU'}, holds no card memory", 0
        total = device.get("torch_vram_total")
        if not isinstance(total, int) or total < 0:
            return None
        return f"torch holds {total // MIB} MiB", total // MIB

    async def unloaded(self) -> bool:
        """Its own allocator holds no more than a CUDA context (where /system_stats says)."""
        reserved = await self.torch_reserved_mib()
        return reserved is None or reserved <= residual_allowance_mib(self.config.vram_resident_mib)

    async def residency(self) -> ResidencyReport:
        outside_ids, figure = await asyncio.gather(self.queued_ids(), self._card_figure())
        outside = outside_ids - self.ours
        # The detail names the figures this report is made of, no others.
        running = f"{len(outside)} prompt(s) posted around the broker" if outside else ""
        if figure is None:
            return ResidencyReport(None, busy=bool(outside), detail=running)
        what, reserved = figure
        # Above its CUDA context and allocator cache (a few hundred MiB) it has models loaded.
        loaded = reserved > residual_allowance_mib(self.config.vram_resident_mib)
        return ResidencyReport(
            loaded,
            busy=bool(outside),
            detail=", ".join(filter(None, [what, running])),
            # 0: on no card at all, so work around the broker takes no card memory either.
            held_mib=reserved if loaded or reserved == 0 else None,
        )

    async def unload(self) -> None:
        body = {"unload_models": True, "free_memory": True}
        if self.config.unload is not None and self.config.unload.path is not None:
            await self.call(self.config.unload, timeout_s=self.config.unload.timeout_s)
        else:
            await self.request_json(
                "POST", "/free", body=body, timeout_s=self.config.unload_timeout_s
            )

    def check_body(self, spec: JobSpec) -> None:
        """A prompt that could never run is refused before it queues for the GPU."""
        if _posts_prompt(spec.call):
            self._prompt(spec.body if spec.body is not None else b"")

    def _prompt(self, body: Body) -> dict[str, Any]:
        """The prompt a body holds (received whole), or a bad_request saying why not."""
        raw = body if isinstance(body, bytes) else body.read_all()
        prompt = parse_json(raw, "the prompt", self.name)
        if not isinstance(prompt, dict) or not isinstance(prompt.get("prompt"), dict):
            raise BrokerError(
                ErrorCode.BAD_REQUEST,
                'expected {"prompt": {...graph...}}',
                consumer=self.name,
            )
        given = str(prompt.get("prompt_id") or "")
        if given and (not PROMPT_ID.fullmatch(given) or given.strip(".") == ""):
            # The id goes into ComfyUI URLs (/history/{id}): "../free" would poll another route
            # and hold the lease until run_timeout_s although the prompt ended long before.
            raise BrokerError(
                ErrorCode.BAD_REQUEST,
                "prompt_id may hold only letters, digits and . _ : - (at most 128)",
                consumer=self.name,
            )
        return prompt

    async def forward(
        self, request: web.Request, spec: JobSpec, job: JobHandle
    ) -> web.StreamResponse:
        if not _posts_prompt(spec.call):
            return await super().forward(request, spec, job)
        loop = asyncio.get_running_loop()
        started = loop.time()
        prompt = self._prompt(spec.body if spec.body is not None else b"")
        prompt_id = str(prompt.get("prompt_id") or uuid.uuid4())
        prompt["prompt_id"] = prompt_id
        ws: aiohttp.ClientWebSocketResponse | None = None
        # A caller that names its client_id listens on its own socket under that id. ComfyUI
        # keeps one socket per client_id (a second connect replaces the first), so a broker
        # socket under the same id would steal the caller's events: follow /history instead.
        client_id = None
        if not prompt.get("client_id"):
            prompt["client_id"] = client_id = f"mgpumanager-{uuid.uuid4().hex}"
        posted = encode_json(prompt, "the prompt", self.name)
        if client_id is not None:
            # Open the socket before posting, or the prompt's events may come before we listen.
            ws = await self._open_ws(client_id)
        self.ours.add(prompt_id)
        try:
            response = await self.relay(request, spec.call, posted)
        except BaseException:
            # The prompt may be on ComfyUI's queue already (the client went away while its
            # answer was relayed): stop it before the lease goes, or it runs unguarded.
            try:
                await self.cancel(prompt_id)
            finally:
                self.ours.discard(prompt_id)
                if ws is not None:
                    await ws.close()
            raise
        if response.status != 200:  # rejected graph: nothing runs
            self.ours.discard(prompt_id)
            if ws is not None:
                await ws.close()
            return response
        # run_timeout_s bounds the whole job: the /prompt call and the wait for the prompt.
        left_s = max(0.0, self.config.run_timeout_s - (loop.time() - started))
        job.hold_until(self._finished(prompt_id, ws), timeout_s=left_s)
        return response

    async def _open_ws(self, client_id: str) -> aiohttp.ClientWebSocketResponse | None:
        try:
            async with asyncio.timeout(self.health_config.timeout_s):
                return await self.session.ws_connect(
                    self.url("/ws"), params={"clientId": client_id}, heartbeat=30
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning(
                "%s: websocket unavailable (%s); following /history instead", self.name, exc
            )
            return None

    async def _finished(self, prompt_id: str, ws: aiohttp.ClientWebSocketResponse | None) -> None:
        """Return when the prompt has ended (success, error or interrupted). Cancelled or timed
        out by the lease: interrupt it and drop it from ComfyUI's queue."""
        ending = asyncio.Event()  # the socket said the run is over: /history has it soon
        try:
            waiters = [asyncio.ensure_future(self._history_done(prompt_id, ending))]
            if ws is not None:
                waiters.append(asyncio.ensure_future(self._ws_done(prompt_id, ws, ending)))
            try:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
            for task in done:
                task.result()
        except BaseException:
            await self.cancel(prompt_id)
            raise
        finally:
            self.ours.discard(prompt_id)
            if ws is not None:
                await ws.close()

    async def _ws_done(
        self, prompt_id: str, ws: aiohttp.ClientWebSocketResponse, ending: asyncio.Event
    ) -> None:
        # Done is `executing` with `node: null`. ComfyUI sends execution_success / _error /
        # _interrupted from inside the run, and only then takes the prompt off queue_running,
        # writes /history and sends `node: null`; releasing on the earlier events let the next
        # job see our own prompt on /queue as work posted around the broker. Those events
        # (and `execution_interrupted`, which ComfyUI sends to every socket) do say that the
        # end is near: /history is then asked at once, in case `node: null` never reaches us.
        # `execution_cached` (a graph run before: it ends at once), `progress_state` and
        # `executing {node}` are the run going on.
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue  # binary frames are previews
            try:
                event = json.loads(msg.data)
            except (ValueError, RecursionError):
                continue
            data = event.get("data") if isinstance(event, dict) else None
            if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
                continue
            kind = event.get("type")
            if kind == "executing" and data.get("node") is None:
                return
            if kind in RUN_ENDED:
                ending.set()
            elif kind == "execution_cached" and isinstance(data.get("nodes"), list):
                log.debug("%s: %s: %d node(s) cached", self.name, prompt_id, len(data["nodes"]))
        # Socket closed without the end event: /history (the other waiter) decides.
        await asyncio.Event().wait()

    async def _history_done(self, prompt_id: str, ending: asyncio.Event) -> None:
        while True:
            try:
                history = await self.request_json(
                    "GET", f"/history/{prompt_id}", timeout_s=self.health_config.timeout_s
                )
                entry = history.get(prompt_id) if isinstance(history, dict) else None
                if isinstance(entry, dict):
                    # The entry is written when the prompt leaves the queue, whatever its end.
                    return
            except BrokerError as exc:
                log.debug("%s: /history poll failed: %s", self.name, exc)
            if ending.is_set():
                await asyncio.sleep(ENDING_POLL_S)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.history_poll_s):
                        await ending.wait()

    async def cancel(self, prompt_id: str) -> None:
        """/interrupt stops it if it runs; a queue delete removes it if it waits. Then wait
        (up to cancel_wait_s) until it has left the queue: an interrupt takes effect at the
        next step, and the lease must not pass on while the GPU is still busy with it."""
        for path, body in (
            ("/interrupt", {"prompt_id": prompt_id}),
            ("/queue", {"delete": [prompt_id]}),
        ):
            try:
                await self.request_json("POST", path, body=body, timeout_s=5.0)
            except BrokerError as exc:
                log.warning("%s: cancel %s via %s failed: %s", self.name, prompt_id, path, exc)
                return  # unreachable or refusing: nothing to wait for
        try:
            async with asyncio.timeout(self.cancel_wait_s):
                while True:
                    if prompt_id not in await self.queued_ids():
                        return
                    await asyncio.sleep(self.history_poll_s)
        except (TimeoutError, BrokerError) as exc:
            log.warning("%s: cancelled prompt %s still queued: %s", self.name, prompt_id, exc)

    def uses_gpu(self, method: str, path: str) -> bool:
        return (method == "POST" and path in PROMPT_PATHS) or super().uses_gpu(method, path)


def _posts_prompt(call: HttpCall) -> bool:
    """`call` queues a prompt (ComfyUI's `POST /prompt`, or `/api/prompt`)."""
    return call.method == "POST" and call.path.split("?", 1)[0] in PROMPT_PATHS
