"""The broker: one object that wires config, GPU reader, adapters, health, residency and the
lease together, and runs facade jobs through them (the path in docs/architecture.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from mgpumanager.clock import Clock, MonotonicClock
from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.events import EventBus, History, JobEvents
from mgpumanager.registry import AdapterType, Config
from mgpumanager.relay.bodies import parse_json, receive_whole
from mgpumanager.relay.feedback import (
    Feedback,
    FeedbackPlan,
    FrameKind,
    WaitState,
    declared_route,
    declares_stream,
    streamed_kind,
    wait_text,
)
from mgpumanager.relay.job import JobSpec
from mgpumanager.relay.json_bodies import check_json
from mgpumanager.relay.proxy import Body, forward
from mgpumanager.relay.spool import SpooledBody
from mgpumanager.residency.evict import Residency
from mgpumanager.residency.idle import IdleKeeper
from mgpumanager.residency.prefetch import Prefetcher, job_weights
from mgpumanager.residency.records import State
from mgpumanager.scheduling.core import ConsumerPolicy, Outcome
from mgpumanager.scheduling.devices import make_core
from mgpumanager.scheduling.lease import Lease
from mgpumanager.scheduling.waits import QueueWaits
from mgpumanager.status import Status, build_status
from mgpumanager.upstreams.adapters import BaseAdapter, make_adapter
from mgpumanager.upstreams.catalog import ModelCatalog
from mgpumanager.upstreams.client_unloads import client_unload
from mgpumanager.upstreams.devices import binding, unknown_bindings
from mgpumanager.upstreams.gpu import GpuReader, device_uuids, make_reader
from mgpumanager.upstreams.gpu_reload import apply_gpu, needs_restart, refusal
from mgpumanager.upstreams.health import HealthMonitor

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# How long an upstream's 404 for a model stands: jobs for that model meanwhile make no room
# for it (its list, re-read, must still not show it). Past that, it costs its room again.
MISSING_MODEL_S = 60.0

# Who sent a request: set by the facade's auth check when the registry has tokens.


class Broker:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        reader: GpuReader | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or MonotonicClock()
        self._reader = reader
        self.started_at = self.clock.now()
        self.session: aiohttp.ClientSession | None = None
        self.adapters: dict[str, BaseAdapter] = {}
        self._residency: Residency | None = None
        self._health: HealthMonitor | None = None
        self._lease: Lease | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.idle: IdleKeeper | None = None
        self.prefetch: Prefetcher | None = None  # the next tenure's weights read ahead
        self.catalog = ModelCatalog(config, {})
        self._reload_lock = asyncio.Lock()
        # What happens, as it happens (/v1/events), and the recent past /v1/status shows.
        self.events = EventBus()
        self.history = History()
        self.events.taps.append(self.history)
        self._jobs: JobEvents | None = None
        self._waits: QueueWaits | None = None
        # Where each consumer's front door listens (HOST:PORT), as the server bound them.
        self.front_doors: dict[str, str] = {}
        # (consumer, model) -> clock time its upstream last answered a job for it with 404.
        self._missing_models: dict[tuple[str, str], float] = {}
        # Re-reads of consumers that a client has just unloaded (client_unloads).
        self._follows: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    def _bound(self) -> dict[str, frozenset[str]]:
        """Each consumer's devices, as residency last read them from the registry."""
        return {} if self._residency is None else self._residency.view.bound

    async def start(self) -> None:
        config = self.config
        # No total timeout: answers stream for as long as run_timeout_s allows.
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        reader = self._reader or await make_reader(config.gpu)
        self._reader = reader
        for line in unknown_bindings(config, device_uuids(reader)):
            log.warning("%s: bound to every device instead", line)
        self.adapters = {
            name: make_adapter(name, c, self.session, gpu_index=config.gpu.index)
            for name, c in config.consumers.items()
        }
        self._health = HealthMonitor(self.adapters, self.clock, emit=self.events.emit)
        self.catalog = ModelCatalog(config, self.adapters)
        # The core first: residency reads from it which consumers have jobs running (never
        # evicted meanwhile); the lease then asks residency for each tenure (its Tenure).
        # On a box with several GPUs, one core per device set under one scheduler.
        core = make_core(
            config.scheduler,
            {
                name: ConsumerPolicy(c.priority, c.max_concurrency)
                for name, c in config.consumers.items()
            },
            binding(config, device_uuids(reader)),
            self.clock,
            rebinding=self._bound,
        )
        self._jobs = JobEvents(core, self.clock, self.events.emit)
        self._residency = Residency(
            config,
            self.adapters,
            reader,
            self.clock,
            probe=self._health.probe_ok,
            model_size=lambda name, model: self.catalog.listed_size(name, model),
            in_flight=core.jobs_on,
            has_model=self._has_model,
            emit=self.events.emit,
        )
        self._lease = Lease(core, self._residency)
        self._waits = QueueWaits(core, self.clock, self._residency.swap_costs)
        self._jobs.waits = self._waits
        self.idle = IdleKeeper(lambda: self.config, self._residency, self._lease, self.clock)
        self.prefetch = Prefetcher(
            lambda: self.config,
            self._residency.view,
            core,
            lambda: self.adapters,
            self.clock,
            emit=self.events.emit,
        )
        self.prefetch.attach()
        await asyncio.gather(
            self._health.probe_all(), self._residency.view.discover(), self.catalog.refresh()
        )
        self._health.start()
        self.catalog.start()
        self.idle.start()
        self._sampler = asyncio.create_task(self._sample_gpu(), name="gpu-sampler")
        log.info(
            "broker up: %s (%d MiB), consumers %s, event loop %s",
            reader.backend,
            reader.total_mib,
            ", ".join(self.adapters),
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )

    async def _sample_gpu(self) -> None:
        """Keep /v1/status's GPU figures live between jobs, and the records matching the card
        (work done around the broker) every gpu.reconcile_interval_s."""
        last_reconcile = self.clock.now()
        while True:
            await asyncio.sleep(1.0)
            if self.clock.now() - last_reconcile >= self.config.gpu.reconcile_interval_s:
                last_reconcile = self.clock.now()
                try:
                    await self.residency.view.reconcile()
                except Exception:  # a bug here must not end reconciliation for good
                    log.exception("background reconciliation failed")
            else:
                await self.residency.view.read_gpu()

    async def _has_model(self, name: str, model: str) -> bool | None:
        """False only where `name`'s upstream has just answered 404 for `model` and its list,
        re-read, still does not show it: then nothing is evicted for it. Otherwise None: a
        model its list does not show (spelt another way, pulled a moment ago, listed late)
        still gets the room its cost needs."""
        answered = self._missing_models.get((name, model))
        if answered is None or self.clock.now() - answered > MISSING_MODEL_S:
            return None
        if self.catalog.has(name, model) is not True:
            await self.catalog.refresh([name])
        return self.catalog.has(name, model) is True

    async def drain(self) -> None:
        """Stop accepting (queued jobs get shutting_down), let in-flight jobs finish within
        drain_timeout_s, then cancel held ComfyUI prompts (interrupting them upstream)."""
        lease = self._lease
        if lease is None:
            self.events.close()
            return
        log.info("draining: %d in flight", lease.core.in_flight)
        if self.idle is not None:
            await self.idle.aclose()  # no idle unload or warm load starts any more
        lease.shutdown()
        if not await lease.drain(self.config.scheduler.drain_timeout_s):
            log.warning(
                "drain timed out after %g s; cancelling", self.config.scheduler.drain_timeout_s
            )
        await lease.cancel_held()
        self.events.close()  # followers' streams end: closing the server waits for none

    async def aclose(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        for task in list(self._follows):
            task.cancel()
        await asyncio.gather(*self._follows, return_exceptions=True)
        if self._health is not None:
            await self._health.aclose()
        await self.catalog.aclose()
        if self.idle is not None:
            await self.idle.aclose()
        if self.prefetch is not None:
            await self.prefetch.aclose()
        if self._reader is not None:
            await self._reader.aclose()
        if self.session is not None:
            await self.session.close()

    async def reload(self, new: Config) -> list[str]:
        """Apply a re-read registry while serving; answers what changed. Known consumers keep
        their residency and queued jobs; new ones are probed and discovered; jobs queued for a
        removed consumer get no_consumer (running ones finish). `gpu` changes apply where they
        can (gpu_reload); `listen` and a new GPU reader need a restart: a registry changing
        them is refused whole, naming each such key, and the old one stays."""
        async with self._reload_lock:  # two quick SIGHUPs apply one after the other
            return await self._reload(new)

    async def _reload(self, new: Config) -> list[str]:
        old = self.config
        residency = self.residency
        restart = needs_restart(old, new, residency.view.reader)
        if restart:
            raise ValueError(refusal(restart))
        for name in set(old.consumers) - set(new.consumers):
            state = residency.view.records[name].state
            if state is State.UNLOADED:
                continue
            if residency.view.reader.backend == "static":
                # Nothing would see its memory any more: no free figure to fall back on.
                raise ValueError(
                    f"{name} would be removed while {state}: unload it first "
                    f"(POST /v1/admin/consumers/{name}/unload), then reload"
                )
            log.warning("%s removed while %s: its memory now shows only as used", name, state)
        if self.session is None:
            raise RuntimeError("broker not started")
        # A consumer whose front door alone changed is the same to the broker (the server
        # opens and closes doors): its adapter, health and residency go on.
        same = {
            n
            for n, c in new.consumers.items()
            if n in old.consumers
            and old.consumers[n].model_dump(exclude={"front_door"})
            == c.model_dump(exclude={"front_door"})
        }
        fresh = [n for n in new.consumers if n not in same]
        adapters = {
            name: self.adapters[name]
            if name in same
            else make_adapter(name, c, self.session, gpu_index=new.gpu.index)
            for name, c in new.consumers.items()
        }
        # Every await first, on the new parts only; then everything is swapped in one step.
        health = HealthMonitor(adapters, self.clock, emit=self.events.emit)
        catalog = ModelCatalog(new, adapters)
        catalog.upstream.update({n: m for n, m in self.catalog.upstream.items() if n in same})
        await asyncio.gather(health.probe_all_of(fresh), catalog.refresh(fresh))
        added = await residency.view.probe(
            new, adapters, [n for n in new.consumers if n not in old.consumers]
        )
        old_health = self.health
        health.states.update({n: s for n, s in old_health.states.items() if n in same})
        self.adapters, self._health, self.config = adapters, health, new
        old_catalog, self.catalog = self.catalog, catalog
        residency.view.reconfigure(new, adapters, added)
        residency.reconfigure_probe(health.probe_ok)
        dropped = self.lease.reconfigure(
            new.scheduler,
            {n: ConsumerPolicy(c.priority, c.max_concurrency) for n, c in new.consumers.items()},
        )
        gpu_changes = apply_gpu(old, new, residency.view.reader)
        health.start()
        catalog.start()
        await asyncio.gather(old_health.aclose(), old_catalog.aclose())
        changes = [f"+{n}" for n in new.consumers if n not in old.consumers]
        changes += [f"-{n}" for n in old.consumers if n not in new.consumers]
        changes += [f"~{n}" for n in new.consumers if n in old.consumers and n not in same]
        for key in (
            "routing",
            "audio_proxy",
            "scheduler",
            "auth",
            "max_body_mib",
            "client_idle_s",
            "header_timeout_s",  # new connections get the new limits
            "max_connections",
            "prefetch",
        ):
            if getattr(new, key) != getattr(old, key):
                changes.append(key)
        changes += gpu_changes
        if dropped:
            changes.append(f"{dropped} queued job(s) of removed consumers refused")
        return changes

    # -- parts (set by start) -----------------------------------------------------------------

    @property
    def lease(self) -> Lease:
        if self._lease is None:
            raise RuntimeError("broker not started")
        return self._lease

    @property
    def residency(self) -> Residency:
        if self._residency is None:
            raise RuntimeError("broker not started")
        return self._residency

    @property
    def jobs(self) -> JobEvents:
        if self._jobs is None:
            raise RuntimeError("broker not started")
        return self._jobs

    @property
    def waits(self) -> QueueWaits:
        if self._waits is None:
            raise RuntimeError("broker not started")
        return self._waits

    @property
    def health(self) -> HealthMonitor:
        if self._health is None:
            raise RuntimeError("broker not started")
        return self._health

    # -- jobs -----------------------------------------------------------------------------------

    def route(self, kind: str) -> str:
        name = self.config.routing.get(kind)
        if name is None:
            raise BrokerError(ErrorCode.NO_CONSUMER, f"no consumer is routed for {kind!r}")
        return name

    def ollama_consumer(self) -> str:
        """The consumer behind the Ollama-native API: the LLM route if it is Ollama, else the
        first Ollama consumer."""
        llm = self.config.routing.get("llm")
        if llm is not None and self.config.consumers[llm].type is AdapterType.OLLAMA:
            return llm
        for name, c in self.config.consumers.items():
            if c.type is AdapterType.OLLAMA:
                return name
        raise BrokerError(ErrorCode.NO_CONSUMER, "no consumer of type ollama is configured")

    def gate(self, name: str) -> None:
        """Failed probes are expected while the broker itself changes a consumer (loading,
        unloading), and while a `command` consumer it stopped is down; otherwise they gate."""
        state = self.residency.view.records[name].state
        expected = state in (State.LOADING, State.UNLOADING) or (
            self.adapters[name].stops_process and state is State.UNLOADED
        )
        self.health.gate(name, stopped_by_broker=expected)

    async def run_job(self, request: web.Request, spec: JobSpec) -> web.StreamResponse:
        """health gate ► body received ► queue ► lease ► resident ► relay (until the upstream
        is done) ► (ComfyUI: prompt finished) ► release; the client then takes the rest of its
        answer from the buffer at its own pace (proxy.finish_delivery).

        `spec.body`: the request body when the surface has read it already (a SpooledBody
        whose head was read is completed here, before the lease)."""
        name = spec.consumer
        adapter = self.adapters[name]
        consumer = self.config.consumers[name]
        self.gate(name)
        per_model = self.residency.view.model_key(name, spec.model) if adapter.per_model else None
        # The whole body first (a declared size past max_body_mib refused before queueing): a
        # client that sends slowly holds its own connection, never the lease (one byte every
        # half second would otherwise hold every consumer's jobs).
        whole = await receive_whole(request, spec.body, self.config.max_body_mib * MIB, name)
        job_spec = spec.with_body(whole)
        feedback: Feedback | None = None
        try:
            adapter.check_body(job_spec)  # a body that could never run does not queue
            check_json(request, job_spec)
            feedback = self._feedback(request, job_spec)
            if self.idle is not None:
                self.idle.interrupt()  # a warm load gives way to a job at once
            async with self.lease.job(
                name,
                priority=spec.priority,
                queue_timeout_s=self.config.scheduler.queue_timeout_s,
                model=per_model,
                label=spec.label,
                answer_first=True,
                weights=job_weights(self.config, name, job_spec.call, whole),
                on_wait=None if feedback is None else feedback.on_wait,
            ) as job:
                self.residency.view.job_started(name, per_model)
                try:
                    async with asyncio.timeout(consumer.run_timeout_s):
                        answer = await adapter.forward(request, job_spec, job)
                        if feedback is not None and feedback.live:
                            answer = await _settle(feedback, answer)
                    status = answer.status
                    if feedback is not None and feedback.upstream_status is not None:
                        status = feedback.upstream_status  # sent in-band, under a 200
                    if status >= 400:  # relayed as it came, but not done
                        job.outcome, job.status = Outcome.UPSTREAM_ERROR, status
                    if per_model is not None:
                        self._answered(name, per_model, status)
                    return answer
                except TimeoutError:
                    raise BrokerError(
                        ErrorCode.UPSTREAM_TIMEOUT,
                        f"{name} ran longer than run_timeout_s ({consumer.run_timeout_s:g} s)",
                        consumer=name,
                    ) from None
                finally:
                    self.residency.view.job_finished(name, per_model)
        finally:
            if feedback is not None:
                feedback.stop()
            if spec.body is None and isinstance(whole, SpooledBody):
                whole.close()  # spooled here; a surface's own body is closed by the surface

    def _feedback(self, request: web.Request, spec: JobSpec) -> Feedback | None:
        """How `request` is kept informed should it wait (None: it is answered as before, its
        status line telling the outcome): streamed answers of Ollama and OpenAI routes, a
        generic consumer's declared streamed routes where it gives a keepalive, and any
        answer of a consumer with early_headers."""
        consumer = self.config.consumers[spec.consumer]
        interval_s = consumer.feedback_interval_s or self.config.feedback_interval_s
        kind = streamed_kind(spec.call.path) if spec.streams else None
        keepalive, content_type = b"", ""
        if kind is None:
            route = declared_route(consumer, spec.call)
            if route is not None and consumer.keepalive is not None:
                body: object = None
                if route.stream_detect is not None and spec.body is not None:
                    raw = spec.body if isinstance(spec.body, bytes) else spec.body.read_all()
                    with contextlib.suppress(BrokerError):
                        body = parse_json(raw, "the body", spec.consumer)
                if declares_stream(route, body):
                    kind = FrameKind.GENERIC
                    keepalive = consumer.keepalive.frame.encode()
                    content_type = consumer.keepalive.content_type
        if kind is None and consumer.early_headers:
            kind = FrameKind.JSON
        if kind is None:
            return None
        plan = FeedbackPlan(
            kind,
            interval_s,
            model=spec.model,
            loading_notice=consumer.loading_notice,
            dialect=self.adapters[spec.consumer].dialect,
            keepalive=keepalive,
            content_type=content_type,
        )
        name, model = spec.consumer, spec.model

        def describe(job_id: int, stage: str) -> WaitState:
            estimate = self.waits.of(job_id) if stage == "queued" else None
            return wait_text(
                stage,
                consumer=name,
                model=model,
                position=None if estimate is None else estimate.position,
                expected_start_s=None if estimate is None else estimate.expected_start_s,
                holder=self.lease.core.holder,
            )

        def waits_for(stage: str) -> bool:
            # A model its upstream does not list is no load to wait for: the upstream's own
            # 404 comes at once, with its status (unless the job queued first).
            per_model = model is not None and self.adapters[name].per_model
            return not (
                stage == "loading" and per_model and self.catalog.has(name, model or "") is False
            )

        return Feedback(request, plan, describe, name, waits_for=waits_for)

    def _answered(self, name: str, model: str, status: int) -> None:
        """Remember an upstream's 404 for a model (its next jobs make no room for it)."""
        if status == 404:
            self._missing_models[(name, model)] = self.clock.now()
        else:
            self._missing_models.pop((name, model), None)

    def answered(
        self, name: str, method: str, path: str, status: int, body: dict[str, Any] | None = None
    ) -> None:
        """A request of `name`'s own API (`path` unquoted, no query; `body` its JSON where
        read) has been answered: if it unloaded something (client_unloads), re-read `name` at
        once and until the upstream shows it, in the background."""
        consumer = self.config.consumers.get(name)
        if consumer is None or status >= 400:
            return
        unload = client_unload(consumer, method, path, body)
        if unload is not None:
            self.follow_unload(name, unload.model)

    def follow_unload(self, name: str, model: str | None) -> None:
        task = asyncio.create_task(self._follow(name, model), name=f"follow-unload-{name}")
        self._follows.add(task)
        task.add_done_callback(self._follows.discard)

    async def _follow(self, name: str, model: str | None) -> None:
        try:
            await self.residency.follow_client_unload(name, model)
        except Exception:  # a bug here must not go unseen, nor end anything else
            log.exception("%s: re-reading after a client's unload failed", name)

    async def passthrough(
        self,
        request: web.Request,
        name: str,
        path: str,
        *,
        body: Body | None = None,
    ) -> web.StreamResponse:
        """Relay a request that is no GPU work (generated audio, Ollama metadata, model
        management) straight to `name`: not scheduled, not health-gated (a failed connect
        still answers an error). `body`: the body already read (else streamed)."""
        if self.session is None:
            raise RuntimeError("broker not started")
        response = await forward(
            request,
            self.session,
            base_url=self.config.consumers[name].url,
            method=request.method,
            path=path,
            consumer=name,
            max_body_bytes=self.config.max_body_mib * MIB,
            body=body,
        )
        self.answered(name, request.method, unquote(path.split("?", 1)[0]), response.status)
        return response

    async def admin(self, name: str, action: str) -> dict[str, object]:
        """Unload or load one consumer, under the lease like any job."""
        if name not in self.config.consumers:
            names = ", ".join(self.config.consumers) or "none"
            raise BrokerError(
                ErrorCode.NOT_FOUND, f"no consumer named {name!r}; the consumers: {names}"
            )
        residency = self.residency
        async with self.lease.job(
            name,
            queue_timeout_s=self.config.scheduler.queue_timeout_s,
            exclusive=True,
            label=f"admin {action}",
        ):
            if action == "unload":
                await residency.unload(name)  # whatever the record says: it may be wrong
            else:
                await residency.ensure_resident(name)
        return {"consumer": name, "residency": str(residency.view.records[name].state)}

    def status(self) -> Status:
        return build_status(self)


async def _settle(feedback: Feedback, answer: web.StreamResponse) -> web.StreamResponse:
    """An answer an adapter made itself (not relayed through `forward`) while the early
    answer had started: its body goes on that answer, or its error in-band."""
    body = answer.body if isinstance(answer, web.Response) else None
    raw = body if isinstance(body, bytes) else b""
    if answer.status >= 400:
        return await feedback.upstream_failed(answer.status, raw)
    response = await feedback.hand_over()
    await response.write(raw)
    await response.write_eof()
    return response


# The broker an HTTP application serves (every listener's handlers find it here).
BROKER: web.AppKey[Broker] = web.AppKey("broker", Broker)
