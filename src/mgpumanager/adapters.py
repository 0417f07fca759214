"""Protocol adapters: what the broker knows about each kind of upstream (`type:` in the registry).

Each adapter answers, for one consumer: is it alive (`health`), what does it say is resident
(`residency`, `None` where it cannot tell and the GPU reading decides), how to unload it and how
to see that it let go (`unload`, `unloaded`), how to load it (`load`, or lazily on the first
job), how to run a job and know that it really finished (`forward`), and whether it is running
work that did not come through the broker (`residency().busy`). The upstreams' real behaviour,
which these follow, is in shared/UPSTREAMS.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any, Protocol

import aiohttp
from aiohttp import web

from .config import DEFAULT_PATHS as GENERIC_PATHS
from .config import Action, AdapterType, ConsumerConfig, HealthConfig, HttpCall
from .errors import BrokerError, ErrorCode
from .lease import JobHandle
from .proxy import check_declared_size, forward, too_large, translate_client_error

log = logging.getLogger(__name__)

# Kind of a job that came in on the facade's Ollama-native API (app.ollama_job): the rest is the
# upstream path, e.g. "ollama:/api/chat".
NATIVE_KIND_PREFIX = "ollama:"


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    detail: str
    refused: bool = False  # nothing listens: the process is not running


@dataclass(frozen=True)
class ResidencyReport:
    resident: bool | None  # None: this upstream cannot tell; the GPU reading decides
    busy: bool = False  # it runs work that did not come through the broker
    detail: str = ""


class ConsumerAdapter(Protocol):
    name: str
    config: ConsumerConfig

    @property
    def has_load(self) -> bool:
        """False: the first job loads it lazily."""

    @property
    def stops_process(self) -> bool:
        """Unloading stops the process: failed probes while unloaded are expected."""

    @property
    def can_unload(self) -> bool:
        """False: nothing can evict it, so the planner treats it as pinned."""

    def path_for(self, kind: str) -> HttpCall: ...
    async def health(self) -> HealthResult: ...
    async def residency(self) -> ResidencyReport: ...
    async def unload(self) -> None: ...
    async def unloaded(self) -> bool: ...
    async def load(self) -> None: ...
    async def forward(
        self, request: web.Request, kind: str, job: JobHandle, max_body_bytes: int
    ) -> web.StreamResponse: ...


class HttpAdapter:
    """The declarative adapter of the original brief (`type: generic`, e.g. mVoice): health,
    unload and load are the HTTP calls written in the registry. Residency: the GPU decides."""

    default_health = HealthConfig()
    default_paths: Mapping[str, HttpCall] = {}
    stops_process = False
    builtin_unload = False  # True: its protocol has an unload of its own, none need be written

    def __init__(self, name: str, config: ConsumerConfig, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.config = config
        self.session = session
        # A health section the user did not write takes this adapter's sensible default.
        self.health_config = (
            config.health if "health" in config.model_fields_set else self.default_health
        )

    @property
    def has_load(self) -> bool:
        return self.config.load is not None

    @property
    def can_unload(self) -> bool:
        return self.builtin_unload or self.config.unload is not None

    def path_for(self, kind: str) -> HttpCall:
        call = self.config.paths.get(kind) or self.default_paths.get(kind)
        call = call or GENERIC_PATHS.get(kind)
        if call is None:
            # A kind routed here that this consumer has no path for: a registry gap, answered
            # as an envelope rather than a KeyError (500 with no body).
            raise BrokerError(
                ErrorCode.NO_CONSUMER,
                f"{self.name} has no path for {kind!r} (paths.{kind} in the registry)",
                consumer=self.name,
            )
        return call

    def url(self, path: str) -> str:
        return self.config.url.rstrip("/") + path

    async def ps_models(self) -> list[Any]:
        """The `models` list of GET /api/ps (Ollama and speaches both answer one)."""
        ps = await self.request_json("GET", "/api/ps", timeout_s=self.health_config.timeout_s)
        models = ps.get("models") if isinstance(ps, dict) else None
        if not isinstance(models, list):
            raise BrokerError(
                ErrorCode.UPSTREAM_ERROR,
                f"{self.name}: /api/ps has no models list",
                consumer=self.name,
            )
        return models

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        timeout_s: float,
        ok: tuple[int, ...] = (200,),
    ) -> Any:
        """One small control call; answers the decoded JSON (or None for an empty body)."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session.request(
                    method, self.url(path), json=body, allow_redirects=False
                ) as resp:
                    text = await resp.text()
                    if resp.status not in ok:
                        raise UpstreamStatus(resp.status, text[:300])
                    return json.loads(text) if text.strip() else None
        except TimeoutError:
            raise BrokerError(
                ErrorCode.UPSTREAM_TIMEOUT,
                f"{self.name}: {method} {path} took longer than {timeout_s:g} s",
                consumer=self.name,
            ) from None
        except json.JSONDecodeError as exc:
            raise BrokerError(
                ErrorCode.UPSTREAM_ERROR,
                f"{self.name}: {method} {path} answered non-JSON: {exc}",
                consumer=self.name,
            ) from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise translate_client_error(exc, self.name) from exc

    async def call(self, action: Action | HttpCall, *, timeout_s: float) -> Any:
        if action.path is None:
            raise BrokerError(ErrorCode.SCHEDULER_ERROR, "action has no path", consumer=self.name)
        return await self.request_json(
            action.method,
            action.path,
            body=action.body,
            timeout_s=timeout_s,
            ok=tuple(range(200, 300)),
        )

    async def health(self) -> HealthResult:
        h = self.health_config
        try:
            async with asyncio.timeout(h.timeout_s):
                async with self.session.request(h.method, self.url(h.path)) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        return HealthResult(True, f"{resp.status}")
                    return HealthResult(False, f"{h.method} {h.path} answered {resp.status}")
        except TimeoutError:
            return HealthResult(False, f"no answer within {h.timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            return HealthResult(False, f"connection refused: {exc.os_error}", refused=True)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return HealthResult(False, f"{type(exc).__name__}: {exc}")

    async def residency(self) -> ResidencyReport:
        return ResidencyReport(None)

    async def unload(self) -> None:
        if self.config.unload is None:
            raise BrokerError(
                ErrorCode.EVICTION_FAILED,
                f"{self.name} has no unload call in the registry",
                consumer=self.name,
            )
        await self.call(self.config.unload, timeout_s=self.config.unload.timeout_s)

    async def unloaded(self) -> bool:
        return True  # nothing to ask: the GPU reading confirms

    async def load(self) -> None:
        if self.config.load is not None:
            await self.call(self.config.load, timeout_s=self.config.load.timeout_s)

    async def forward(
        self, request: web.Request, kind: str, job: JobHandle, max_body_bytes: int
    ) -> web.StreamResponse:
        return await self._relay(request, self.path_for(kind), max_body_bytes)

    async def _relay(
        self, request: web.Request, call: HttpCall, max_body_bytes: int, body: bytes | None = None
    ) -> web.StreamResponse:
        """Stream `request` to this upstream's `call` (with `body` instead of the client's)."""
        return await forward(
            request,
            self.session,
            base_url=self.config.url,
            method=call.method,
            path=call.path,
            consumer=self.name,
            max_body_bytes=max_body_bytes,
            body=body,
        )


class UpstreamStatus(BrokerError):
    """A control call answered an unexpected status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(ErrorCode.UPSTREAM_ERROR, f"answered {status}: {text}")
        self.http_status = status


class OllamaAdapter(HttpAdapter):
    """Ollama: residency from /api/ps; unload = keep_alive 0 for every resident model, which
    Ollama answers BEFORE freeing (and only after in-flight requests), so `unloaded` polls
    /api/ps; load = an empty generate for each configured model, else lazily."""

    builtin_unload = True

    default_health = HealthConfig(path="/api/version")
    default_paths = {"llm": HttpCall(path="/api/generate")}

    @property
    def has_load(self) -> bool:
        return bool(self.config.models)

    def path_for(self, kind: str) -> HttpCall:
        # The facade's Ollama-native routes (/api/generate, /api/chat, /api/embed) arrive as
        # kind "ollama:<path>" and go to the same path upstream; without this they hit the
        # kind table and failed with a KeyError (a bare 500) for every native client.
        if kind.startswith(NATIVE_KIND_PREFIX):
            return HttpCall(path=kind.removeprefix(NATIVE_KIND_PREFIX))
        return super().path_for(kind)

    async def resident_models(self) -> list[str]:
        models = await self.ps_models()
        names = [str(m.get("name") or m.get("model")) for m in models if isinstance(m, dict)]
        return names

    async def residency(self) -> ResidencyReport:
        names = await self.resident_models()
        return ResidencyReport(bool(names), detail=", ".join(names))

    async def unload(self) -> None:
        for model in await self.resident_models():
            await self.request_json(
                "POST",
                "/api/generate",
                body={"model": model, "keep_alive": 0},
                timeout_s=self.config.unload_timeout_s,
            )

    async def unloaded(self) -> bool:
        return not await self.resident_models()

    async def load(self) -> None:
        for model in self.config.models:
            await self.request_json(
                "POST",
                "/api/generate",
                body={"model": model, "stream": False},
                timeout_s=self.config.load_timeout_s,
            )


class ComfyUIAdapter(HttpAdapter):
    """ComfyUI: /prompt answers at once and the work runs afterwards, so an image job holds the
    lease until its prompt has finished (websocket events, /history as fallback). The broker
    picks the prompt_id. Unload = /free, which only sets flags: the GPU reading confirms."""

    builtin_unload = True

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

    async def residency(self) -> ResidencyReport:
        outside = await self.queued_ids() - self.ours
        return ResidencyReport(
            None, busy=bool(outside), detail=f"{len(outside)} prompt(s) posted around the broker"
        )

    async def unload(self) -> None:
        body = {"unload_models": True, "free_memory": True}
        if self.config.unload is not None and self.config.unload.path is not None:
            await self.call(self.config.unload, timeout_s=self.config.unload.timeout_s)
        else:
            await self.request_json(
                "POST", "/free", body=body, timeout_s=self.config.unload_timeout_s
            )

    async def forward(
        self, request: web.Request, kind: str, job: JobHandle, max_body_bytes: int
    ) -> web.StreamResponse:
        call = self.path_for(kind)
        if call.path != "/prompt":
            return await super().forward(request, kind, job, max_body_bytes)
        loop = asyncio.get_running_loop()
        started = loop.time()
        check_declared_size(request, max_body_bytes, self.name)
        raw = await _read_bounded(request, max_body_bytes, self.name)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BrokerError(
                ErrorCode.BAD_REQUEST, f"the prompt is not JSON: {exc}", consumer=self.name
            ) from exc
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), dict):
            raise BrokerError(
                ErrorCode.BAD_REQUEST,
                'expected {"prompt": {...graph...}}',
                consumer=self.name,
            )
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        body["prompt_id"] = prompt_id
        ws: aiohttp.ClientWebSocketResponse | None = None
        # A caller that names its client_id listens on its own socket under that id. ComfyUI
        # keeps one socket per client_id (a second connect replaces the first), so a broker
        # socket under the same id would steal the caller's events: follow /history instead.
        if not body.get("client_id"):
            body["client_id"] = client_id = f"mgpumanager-{uuid.uuid4().hex}"
            # Open the socket before posting, or the prompt's events may come before we listen.
            ws = await self._open_ws(client_id)
        self.ours.add(prompt_id)
        try:
            response = await self._relay(
                request, call, max_body_bytes, body=json.dumps(body).encode()
            )
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
        try:
            waiters = [asyncio.ensure_future(self._history_done(prompt_id))]
            if ws is not None:
                waiters.append(asyncio.ensure_future(self._ws_done(prompt_id, ws)))
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

    async def _ws_done(self, prompt_id: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        # Done is `executing` with `node: null`. ComfyUI sends execution_success / _error /
        # _interrupted from inside the run, and only then takes the prompt off queue_running,
        # writes /history and sends `node: null`; releasing on the earlier events let the next
        # job see our own prompt on /queue as work posted around the broker.
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue  # binary frames are previews
            try:
                event = json.loads(msg.data)
            except json.JSONDecodeError:
                continue
            data = event.get("data") if isinstance(event, dict) else None
            if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
                continue
            if event.get("type") == "executing" and data.get("node") is None:
                return
        # Socket closed without the end event: /history (the other waiter) decides.
        await asyncio.Event().wait()

    async def _history_done(self, prompt_id: str) -> None:
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
            await asyncio.sleep(self.history_poll_s)

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


class SpeachesAdapter(HttpAdapter):
    """speaches: OpenAI audio endpoints; models listed, loaded and unloaded under /api/ps.
    A DELETE answers 409 while the model is in use: retried until unload_timeout_s."""

    builtin_unload = True

    default_paths = {
        "stt": HttpCall(path="/v1/audio/transcriptions"),
        "tts": HttpCall(path="/v1/audio/speech"),
    }
    retry_s = 0.2

    @property
    def has_load(self) -> bool:
        return bool(self.config.models)

    async def loaded_models(self) -> list[str]:
        models = await self.ps_models()
        # speaches answers a list of ids; tolerate objects with an "id" as well.
        return [m if isinstance(m, str) else str(m.get("id")) for m in models if _named(m)]

    async def residency(self) -> ResidencyReport:
        models = await self.loaded_models()
        return ResidencyReport(bool(models), detail=", ".join(models))

    async def unload(self) -> None:
        timeout_s = self.config.unload_timeout_s
        model = ""
        try:
            async with asyncio.timeout(timeout_s):
                for model in await self.loaded_models():
                    while True:
                        try:
                            await self.request_json(
                                "DELETE", f"/api/ps/{model}", timeout_s=5.0, ok=(200, 404)
                            )
                            break
                        except UpstreamStatus as exc:
                            if exc.http_status != 409:
                                raise
                            await asyncio.sleep(self.retry_s)  # in use: ask again
        except TimeoutError:
            # Raised bare, this escaped the residency layer (it only handles BrokerError)
            # and left the consumer stuck in `unloading`.
            raise BrokerError(
                ErrorCode.EVICTION_FAILED,
                f"{self.name}: {model or 'its models'} still in use (409) or not answering "
                f"after unload_timeout_s ({timeout_s:g} s)",
                consumer=self.name,
            ) from None

    async def unloaded(self) -> bool:
        return not await self.loaded_models()

    async def load(self) -> None:
        for model in self.config.models:
            await self.request_json(
                "POST", f"/api/ps/{model}", timeout_s=self.config.load_timeout_s, ok=(200, 201, 409)
            )


class CommandAdapter(HttpAdapter):
    """Servers with no unload endpoint (whisper.cpp): unload and load are argv lists from the
    registry (e.g. `systemctl stop whisper-server`), never from a request. Up = resident."""

    stops_process = True

    @property
    def has_load(self) -> bool:
        return self.config.load is not None

    async def residency(self) -> ResidencyReport:
        result = await self.health()
        if result.refused:
            return ResidencyReport(False, detail="process not running")
        return ResidencyReport(True, detail=result.detail)

    async def unloaded(self) -> bool:
        return (await self.health()).refused

    async def unload(self) -> None:
        if self.config.unload is None:
            raise BrokerError(ErrorCode.EVICTION_FAILED, "no unload command", consumer=self.name)
        await self._run(self.config.unload, ErrorCode.EVICTION_FAILED)

    async def load(self) -> None:
        if self.config.load is not None:
            await self._run(self.config.load, ErrorCode.LOAD_FAILED)

    async def _run(self, action: Action, code: ErrorCode) -> None:
        argv = action.command or []
        # Output goes to a file, not a pipe: a start command that leaves a server running in
        # the background (`sh -c 'whisper-server ... &'`) keeps a pipe open for as long as the
        # server lives, and reading it to the end would hang until the timeout.
        with tempfile.TemporaryFile() as out:
            try:
                # Its own session: on timeout the whole group goes, not just the shell
                # around a hung `systemctl`.
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            except OSError as exc:  # no such program, not executable
                raise BrokerError(
                    code, f"{self.name}: cannot run {argv!r}: {exc}", consumer=self.name
                ) from exc
            try:
                async with asyncio.timeout(action.timeout_s):
                    await proc.wait()
            except BaseException as exc:  # timed out, or the job was cancelled
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
                if isinstance(exc, TimeoutError):
                    raise BrokerError(
                        code,
                        f"{self.name}: {argv!r} ran longer than {action.timeout_s:g} s{_tail(out)}",
                        consumer=self.name,
                    ) from None
                raise
            text = _tail(out)
        log.info("%s: %r exited %s%s", self.name, argv, proc.returncode, text)
        if proc.returncode != 0:
            raise BrokerError(
                code, f"{self.name}: {argv!r} exited {proc.returncode}{text}", consumer=self.name
            )


class VllmAdapter(HttpAdapter):
    """vLLM sleep mode: unload = POST /sleep?level=N (1 keeps weights in CPU RAM), load =
    POST /wake_up, residency from /is_sleeping."""

    builtin_unload = True

    default_paths = {"llm": HttpCall(path="/v1/completions")}

    @property
    def has_load(self) -> bool:
        return True

    async def residency(self) -> ResidencyReport:
        return ResidencyReport(not await self._sleeping())

    async def _sleeping(self) -> bool:
        answer = await self.request_json(
            "GET", "/is_sleeping", timeout_s=self.health_config.timeout_s
        )
        return bool((answer or {}).get("is_sleeping"))

    async def unload(self) -> None:
        action = self.config.unload or Action(path="/sleep?level=1")
        await self.call(action, timeout_s=self.config.unload_timeout_s)

    async def unloaded(self) -> bool:
        return await self._sleeping()

    async def load(self) -> None:
        action = self.config.load or Action(path="/wake_up")
        await self.call(action, timeout_s=self.config.load_timeout_s)


ADAPTERS: Mapping[AdapterType, type[HttpAdapter]] = {
    AdapterType.GENERIC: HttpAdapter,
    AdapterType.OLLAMA: OllamaAdapter,
    AdapterType.COMFYUI: ComfyUIAdapter,
    AdapterType.SPEACHES: SpeachesAdapter,
    AdapterType.COMMAND: CommandAdapter,
    AdapterType.VLLM: VllmAdapter,
}


def make_adapter(name: str, config: ConsumerConfig, session: aiohttp.ClientSession) -> HttpAdapter:
    return ADAPTERS[config.type](name, config, session)


def _tail(out: IO[bytes], limit: int = 500) -> str:
    """The last `limit` characters a command wrote, as ": <text>" (empty when it wrote nothing)."""
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - 4 * limit))  # a chatty command: only its last words matter
    text = out.read().decode(errors="replace").strip()[-limit:]
    return f": {text}" if text else ""


def _named(model: object) -> bool:
    return isinstance(model, str) or (isinstance(model, dict) and model.get("id") is not None)


async def _read_bounded(request: web.Request, max_body_bytes: int, consumer: str) -> bytes:
    chunks: list[bytes] = []
    seen = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        seen += len(chunk)
        if seen > max_body_bytes:
            raise too_large(max_body_bytes, consumer)
        chunks.append(chunk)
    return b"".join(chunks)
