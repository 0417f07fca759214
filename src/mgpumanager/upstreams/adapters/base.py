"""What every adapter is: the `ConsumerAdapter` Protocol the broker drives, and `BaseAdapter`,
the HTTP plumbing each upstream type builds on.

An adapter answers, for one consumer: is it alive (`health`), what does it say is resident
(`residency`: `None` where it cannot tell and the GPU reading decides), how to unload it and how
to see that it let go (`unload`, `unloaded`), how to load it (`load`, or lazily on the first
job), how to run a job and know that it really finished (`forward`), and whether it is running
work that did not come through the broker (`residency().busy`). docs/upstreams.md describes how
each real service behaves and how its adapter copes.

The registry's `unload:` and `load:` keys follow one rule, stated for each type in the table
`registry.models.HONOURED_ACTIONS`: a type either honours a key (the written call replaces the
adapter's own, or is the only way it has), or `check-config` refuses the key as not
applicable to that type. Nothing written in the registry is ever silently ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import aiohttp
from aiohttp import web

from mgpumanager.errors import BrokerError, Dialect, ErrorCode
from mgpumanager.registry import DEFAULT_PATHS, Action, ConsumerConfig, HealthConfig, HttpCall
from mgpumanager.relay.job import JobSpec
from mgpumanager.relay.proxy import UPSTREAM_FAILURES, Body, forward, map_upstream_errors
from mgpumanager.scheduling.lease import JobHandle

log = logging.getLogger(__name__)


# The OpenAI-style routes that run a model: scheduled wherever a consumer serves OpenAI routes.
OPENAI_GPU_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/images/generations",
    }
)


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    detail: str
    refused: bool = False  # nothing listens: the process is not running
    answered: int | None = None  # the HTTP status of a probe that got an answer


@dataclass(frozen=True)
class ResidencyReport:
    resident: bool | None  # None: this upstream cannot tell; the GPU reading decides
    busy: bool = False  # it runs work that did not come through the broker
    detail: str = ""
    held_mib: int | None = None  # what the upstream says it holds (ComfyUI's own allocator)
    # Per-model upstreams (Ollama, speaches): the models resident now, with their size in MiB
    # where the upstream says one. None: this upstream is not tracked per model.
    models: Mapping[str, int | None] | None = None


def residual_allowance_mib(declared_mib: int) -> int:
    """Memory a process may keep after unloading its models (CUDA context, allocator cache):
    ComfyUI keeps a few hundred MiB, speaches some too. Below this it counts as unloaded."""
    return max(512, declared_mib // 10)


class ConsumerAdapter(Protocol):
    name: str
    config: ConsumerConfig

    @property
    def has_load(self) -> bool:
        """False: the first job loads it lazily."""

    # Its models are loaded and unloaded one by one (`unload_model`, `load_model`).
    per_model: ClassVar[bool]
    # Unloading stops the process: failed probes while unloaded are expected.
    stops_process: ClassVar[bool]

    @property
    def can_unload(self) -> bool:
        """False: nothing can evict it, so the planner treats it as pinned."""

    def path_for(self, kind: str) -> HttpCall: ...
    async def health(self) -> HealthResult: ...
    async def residency(self) -> ResidencyReport: ...
    async def unload(self) -> None: ...
    async def unloaded(self) -> bool: ...
    async def load(self) -> None: ...
    def model_key(self, model: str) -> str: ...
    async def unload_model(self, model: str) -> None: ...
    async def load_model(self, model: str) -> None: ...
    def check_body(self, spec: JobSpec) -> None:
        """Refuse (bad_request) a job's body, received whole, that could never run: before it
        queues for the GPU, not under the lease."""

    async def forward(
        self, request: web.Request, spec: JobSpec, job: JobHandle
    ) -> web.StreamResponse:
        """Run one job; `spec.body`: the request body, received whole before the job started
        (None: the request has none)."""


class UpstreamStatus(BrokerError):
    """A control call answered an unexpected status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(ErrorCode.UPSTREAM_ERROR, f"answered {status}: {text}")
        self.http_status = status


class BaseAdapter:
    """Shared HTTP plumbing: health probe, small JSON control calls, relaying a job.

    A subclass states its protocol in a few class attributes (no behaviour hides in flags):
    - `per_model`, `stops_process`: what it is (the Protocol says what each means);
    - `unloads_itself`, `loads_itself`: it has its own way to unload / load (else only what the
      registry writes: `unload:`, `load:`); `openai_routes`: it serves OpenAI routes itself
      (else only with `openai: true`); `own_dialect`: its clients' error shape, where it has
      one of its own;
    - `default_health`, `default_paths`: what it uses where the registry says nothing.
    and overrides the calls its upstream answers differently.
    """

    per_model: ClassVar[bool] = False
    stops_process: ClassVar[bool] = False
    unloads_itself: ClassVar[bool] = False
    loads_itself: ClassVar[bool] = False
    openai_routes: ClassVar[bool] = False
    own_dialect: ClassVar[Dialect | None] = None

    default_health: ClassVar[HealthConfig] = HealthConfig()
    default_paths: ClassVar[Mapping[str, HttpCall]] = {}
    # Routes of its own API that use the GPU and whose JSON body names a model: `(method, path)`.
    model_routes: ClassVar[frozenset[tuple[str, str]]] = frozenset()

    # The broker's card (`gpu.index`), for upstreams that list several devices (ComfyUI's
    # /system_stats); make_adapter sets it.
    gpu_index: int = 0

    def __init__(self, name: str, config: ConsumerConfig, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.config = config
        self.session = session
        # Keys the user wrote override this type's defaults one by one: `health: {interval_s:
        # 2}` on an Ollama consumer still probes Ollama's /api/version, not the generic /health.
        written = {key: getattr(config.health, key) for key in config.health.model_fields_set}
        self.health_config = self.default_health.model_copy(update=written)

    # -- what it can do -------------------------------------------------------------------------

    @property
    def has_load(self) -> bool:
        return self.loads_itself or self.config.load is not None

    @property
    def can_unload(self) -> bool:
        return self.unloads_itself or self.config.unload is not None

    def path_for(self, kind: str) -> HttpCall:
        call = self.config.paths.get(kind) or self.default_paths.get(kind)
        call = call or DEFAULT_PATHS.get(kind)
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

    # -- its own API, as served under /upstream/<name>/ -------------------------------------------

    @property
    def dialect(self) -> Dialect:
        """The error shape its own clients read (the broker's errors on its API use it)."""
        if self.own_dialect is not None:
            return self.own_dialect
        return Dialect.OPENAI if self.serves_openai else Dialect.ENVELOPE

    def names_model(self, method: str, path: str) -> bool:
        """Whether `method path` of its own API runs a model the request names."""
        if (method, path) in self.model_routes:
            return True
        return self.serves_openai and method == "POST" and path in OPENAI_GPU_PATHS

    def uses_gpu(self, method: str, path: str) -> bool:
        """Whether `method path` of its own API is GPU work, to be scheduled: its type's model
        routes, the OpenAI generation routes where it serves them, and the registry's `paths`
        and `scheduled` calls."""
        if self.names_model(method, path):
            return True
        calls = [*self.default_paths.values(), *self.config.paths.values(), *self.config.scheduled]
        return any(c.method == method and c.path.split("?", 1)[0] == path for c in calls)

    # -- talking to it --------------------------------------------------------------------------

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
        with map_upstream_errors(self.name):
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
            except (json.JSONDecodeError, RecursionError) as exc:
                raise BrokerError(
                    ErrorCode.UPSTREAM_ERROR,
                    f"{self.name}: {method} {path} answered non-JSON: {type(exc).__name__}",
                    consumer=self.name,
                ) from None

    async def call(self, action: Action | HttpCall, *, timeout_s: float) -> Any:
        """A registry-written HTTP call (`unload:` / `load:` with a path)."""
        if action.path is None:
            raise BrokerError(ErrorCode.SCHEDULER_ERROR, "action has no path", consumer=self.name)
        return await self.request_json(
            action.method,
            action.path,
            body=action.body,
            timeout_s=timeout_s,
            ok=tuple(range(200, 300)),
        )

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

    # -- its models ------------------------------------------------------------------------------

    @property
    def serves_openai(self) -> bool:
        """It answers OpenAI routes (/v1/chat/completions, /v1/audio/speech...) itself."""
        return self.openai_routes or self.config.openai

    def model_key(self, model: str) -> str:
        """The name this upstream lists `model` under."""
        return model

    async def installed_models(self) -> dict[str, int | None] | None:
        """The models the upstream can serve now, with their size in MiB where it says one;
        None: it keeps no list the broker can read."""
        return await self.openai_models() if self.serves_openai else None

    async def openai_models(self) -> dict[str, int | None]:
        """GET /v1/models: `{"data": [{"id": ...}, ...]}` (sizes unknown)."""
        answer = await self.request_json(
            "GET", "/v1/models", timeout_s=self.health_config.timeout_s
        )
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise BrokerError(
                ErrorCode.UPSTREAM_ERROR,
                f"{self.name}: /v1/models has no data list",
                consumer=self.name,
            )
        return {str(m["id"]): None for m in data if isinstance(m, dict) and m.get("id")}

    # -- the Protocol's calls, as most upstreams answer them --------------------------------------

    async def health(self) -> HealthResult:
        h = self.health_config
        try:
            async with asyncio.timeout(h.timeout_s):
                async with self.session.request(h.method, self.url(h.path)) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        return HealthResult(True, f"{resp.status}", answered=resp.status)
                    return HealthResult(
                        False, f"{h.method} {h.path} answered {resp.status}", answered=resp.status
                    )
        except TimeoutError:
            return HealthResult(False, f"no answer within {h.timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            return HealthResult(False, f"connection refused: {exc.os_error}", refused=True)
        except UPSTREAM_FAILURES as exc:
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

    async def unload_model(self, model: str) -> None:
        raise BrokerError(
            ErrorCode.SCHEDULER_ERROR, f"{self.name} is not tracked per model", consumer=self.name
        )

    async def load_model(self, model: str) -> None:
        raise BrokerError(
            ErrorCode.SCHEDULER_ERROR, f"{self.name} is not tracked per model", consumer=self.name
        )

    def check_body(self, spec: JobSpec) -> None:
        return None  # most upstreams judge their own bodies

    async def forward(
        self, request: web.Request, spec: JobSpec, job: JobHandle
    ) -> web.StreamResponse:
        return await self.relay(request, spec.call, spec.body)

    async def relay(
        self, request: web.Request, call: HttpCall, body: Body | None
    ) -> web.StreamResponse:
        """Send a job's `body`, received whole, to this upstream's `call`, and relay the
        answer."""
        return await forward(
            request,
            self.session,
            base_url=self.config.url,
            method=call.method,
            path=call.path,
            consumer=self.name,
            max_body_bytes=None,  # received whole before the job started
            body=body,
        )
