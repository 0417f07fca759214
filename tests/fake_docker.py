"""A stand-in for the Docker Engine API on a unix socket: the few calls the broker makes
(ping, list, inspect, start, stop), over containers that are plain records. `on_stop` and
`on_start` let a test run what the container's process would do (free its memory, serve)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web


@dataclass
class FakeContainer:
    name: str
    running: bool = True
    image: str = "example/service:latest"
    host_network: bool = True
    ports: list[int] = field(default_factory=list)
    gpu: bool = True
    exit_code: int = 0

    @property
    def id(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    def inspect(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "Name": "/" + self.name,
            "Config": {"Image": self.image, "Env": ["PATH=/usr/bin"]},
            "State": {
                "Status": "running" if self.running else "exited",
                "ExitCode": 0 if self.running else self.exit_code,
            },
            "HostConfig": {
                "NetworkMode": "host" if self.host_network else "bridge",
                "DeviceRequests": [{"Capabilities": [["gpu"]]}] if self.gpu else None,
            },
            "NetworkSettings": {
                "Ports": {
                    f"{p}/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(p)}] for p in self.ports
                }
            },
        }


@dataclass
class FakeDocker:
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    on_stop: Callable[[FakeContainer], Any] | None = None
    on_start: Callable[[FakeContainer], Any] | None = None

    def add(self, container: FakeContainer) -> FakeContainer:
        self.containers[container.name] = container
        return container

    def find(self, ref: str) -> FakeContainer | None:
        return self.containers.get(ref) or next(
            (c for c in self.containers.values() if c.id == ref), None
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_ping", self._ping)
        app.router.add_get("/containers/json", self._list)
        app.router.add_get("/containers/{ref}/json", self._inspect)
        app.router.add_post("/containers/{ref}/start", self._start)
        app.router.add_post("/containers/{ref}/stop", self._stop)
        return app

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _list(self, request: web.Request) -> web.Response:
        running = [c for c in self.containers.values() if c.running]
        return web.json_response([{"Id": c.id, "Names": ["/" + c.name]} for c in running])

    def _get(self, request: web.Request) -> FakeContainer:
        found = self.find(request.match_info["ref"])
        if found is None:
            raise web.HTTPNotFound(
                text='{"message": "No such container"}', content_type="application/json"
            )
        return found

    async def _inspect(self, request: web.Request) -> web.Response:
        return web.json_response(self._get(request).inspect())

    async def _start(self, request: web.Request) -> web.Response:
        c = self._get(request)
        self.calls.append(f"start {c.name}")
        if c.running:
            return web.Response(status=304)
        c.running = True
        if self.on_start is not None:
            await self.on_start(c)
        return web.Response(status=204)

    async def _stop(self, request: web.Request) -> web.Response:
        c = self._get(request)
        self.calls.append(f"stop {c.name} t={request.query.get('t')}")
        if not c.running:
            return web.Response(status=304)
        if self.on_stop is not None:
            await self.on_stop(c)
        c.running = False
        return web.Response(status=204)


@asynccontextmanager
async def serving(fake: FakeDocker, socket_path: Path) -> AsyncIterator[str]:
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.UnixSite(runner, str(socket_path))
    await site.start()
    try:
        yield str(socket_path)
    finally:
        await runner.cleanup()
