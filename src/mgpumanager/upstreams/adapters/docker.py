"""`container: NAME` — a consumer that runs in a Docker container, unloaded by stopping the
container and loaded by starting it, through the Engine API (upstreams/containers.py).

A driver, not only a type: Ollama in a container stays `type: ollama` (its API at the root, its
models tracked one by one through /api/ps) and gains `container:`; `make_adapter` then builds
its class with `ContainerDriver` in front. `type: docker` is the plain one, for a service with
no protocol of its own (whisper.cpp, a speech server): HTTP probes and jobs as `generic`, and
the container for unload and load.

How Docker behaves, and what the driver does about it:
- `POST /containers/NAME/stop?t=N` sends the image's STOPSIGNAL (SIGTERM), SIGKILL after N s
  (`stop_timeout_s`), and answers once the container has exited (304: it was stopped
  already). The process's exit frees its VRAM, yet the driver's figure lags 0.5-1.5 s:
  `unloaded()` says the container stopped, and the broker's confirmation waits for the GPU too.
- `POST /containers/NAME/start` answers once the process runs, long before it serves: `load`
  waits until the service's own health probe passes, then runs the type's own load (an
  Ollama's preloaded models), all within `load_timeout_s`.
- A container stopped by someone else (`docker stop`, a crash, `restart: no` after a reboot) is
  `stopped`: not resident and not failing; its next job starts it. Only a container that runs
  and does not answer fails its probes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import aiohttp

from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import ConsumerConfig
from mgpumanager.upstreams.adapters.base import BaseAdapter, HealthResult, ResidencyReport
from mgpumanager.upstreams.adapters.generic import GenericAdapter
from mgpumanager.upstreams.containers import Container, DockerClient, DockerError

log = logging.getLogger(__name__)

# How often `load` asks the service whether it serves yet.
READY_POLL_S = 0.1


class ContainerDriver(BaseAdapter):
    """Put in front of a type's adapter class (`driven`): unload, load, residency and health
    go through the container first, and to the type's own calls where it runs."""

    def __init__(self, name: str, config: ConsumerConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(name, config, session)
        self.docker = DockerClient()  # DOCKER_HOST's socket, else /var/run/docker.sock

    @property
    def container(self) -> str:
        name = self.config.container
        if name is None:  # make_adapter drives only consumers with a container
            raise BrokerError(ErrorCode.SCHEDULER_ERROR, "no container", consumer=self.name)
        return name

    stops_process = True
    loads_itself = True
    unloads_itself = True

    async def inspect(self) -> Container:
        return await self.docker.inspect(self.container)

    async def health(self) -> HealthResult:
        try:
            container = await self.inspect()
        except DockerError as exc:
            return HealthResult(False, str(exc))
        if not container.running:
            # Stopped (by the broker or anyone else): nothing listens, and that is expected.
            return HealthResult(False, f"stopped: {_state(container)}", refused=True)
        return await super().health()

    async def residency(self) -> ResidencyReport:
        try:
            container = await self.inspect()
        except DockerError as exc:
            raise BrokerError(ErrorCode.UPSTREAM_ERROR, str(exc), consumer=self.name) from exc
        if not container.running:
            return ResidencyReport(
                False,
                detail=f"stopped: {_state(container)}",
                models={} if self.per_model else None,
            )
        report = await super().residency()
        if report.resident is None and not self.per_model:
            # Up = resident, as for any process whose exit is its unload (type command).
            return ResidencyReport(True, busy=report.busy, detail=f"container {container.status}")
        return report

    async def unload(self) -> None:
        grace_s = self.config.stop_timeout_s
        try:
            stopped = await self.docker.stop(self.container, grace_s)
        except DockerError as exc:
            raise BrokerError(
                ErrorCode.EVICTION_FAILED,
                f"{self.name}: stopping container {self.container} failed: {exc}",
                consumer=self.name,
            ) from exc
        log.info(
            "%s: container %s %s",
            self.name,
            self.container,
            "stopped" if stopped else "was stopped already",
        )

    async def unloaded(self) -> bool:
        try:
            return not (await self.inspect()).running
        except DockerError as exc:
            raise BrokerError(ErrorCode.EVICTION_FAILED, str(exc), consumer=self.name) from exc

    async def load(self) -> None:
        try:
            started = await self.docker.start(self.container)
        except DockerError as exc:
            raise BrokerError(
                ErrorCode.LOAD_FAILED,
                f"{self.name}: starting container {self.container} failed: {exc}",
                consumer=self.name,
            ) from exc
        log.info(
            "%s: container %s %s",
            self.name,
            self.container,
            "started" if started else "was running already",
        )
        # The caller bounds this with load_timeout_s.
        while True:
            result = await super().health()
            if result.ok:
                break
            container = await self.inspect() if result.refused else None
            if container is not None and not container.running:
                raise BrokerError(
                    ErrorCode.LOAD_FAILED,
                    f"{self.name}: container {self.container} exited while starting "
                    f"({_state(container)})",
                    consumer=self.name,
                )
            await asyncio.sleep(READY_POLL_S)
        if super().has_load:
            await super().load()


def _state(c: Container) -> str:
    code = f" with code {c.exit_code}" if c.exit_code is not None and c.status == "exited" else ""
    return f"container {c.name} {c.status}{code}"


class DockerAdapter(ContainerDriver, GenericAdapter):
    """`type: docker`: probes and jobs over HTTP as written in the registry; the container
    for the rest."""


_DRIVEN: dict[type[BaseAdapter], type[BaseAdapter]] = {}


def driven(cls: type[BaseAdapter]) -> type[BaseAdapter]:
    """`cls` with the container driver in front of it (one class per type)."""
    if issubclass(cls, ContainerDriver):
        return cls
    if cls not in _DRIVEN:
        made = type(f"Container{cls.__name__}", (ContainerDriver, cls), {})
        _DRIVEN[cls] = cast(type[BaseAdapter], made)
    return _DRIVEN[cls]


__all__ = ["ContainerDriver", "DockerAdapter", "driven"]
