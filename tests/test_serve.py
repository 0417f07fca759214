"""`mgpumanager serve` as a process, with real signals: SIGTERM drains, SIGHUP re-reads the
registry and refuses a bad one."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web

from conftest import Upstream, wait_for

REGISTRY = """\
listen: 127.0.0.1:0
gpu: {{backend: static, total_mib: 24576}}
scheduler: {{drain_timeout_s: 20}}
routing: {{tts: mvoice}}
consumers:
  mvoice:
    url: {url}
    health: {{path: /health, interval_s: 0.2}}
    vram_resident_mib: 1000
"""


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log: list[str] = []
        self.url = ""
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        assert self.proc.stderr is not None
        while True:
            line = (await asyncio.wait_for(self.proc.stderr.readline(), 30)).decode()
            if not line:
                raise AssertionError("serve exited early:\n" + "".join(self.log))
            self.log.append(line)
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m.group(1)
                break
        self._pump = asyncio.create_task(self._read_rest())

    async def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.append(line.decode())

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.log)

    async def wait(self) -> int:
        code = await asyncio.wait_for(self.proc.wait(), 30)
        if self._pump is not None:
            await self._pump
        return code


@asynccontextmanager
async def serve(config: Path) -> AsyncIterator[Daemon]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mgpumanager.cli", "serve", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    daemon = Daemon(proc)
    try:
        await daemon.start()
        yield daemon
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if daemon._pump is not None:
            daemon._pump.cancel()


async def post_tts(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    async with session.post(f"{url}/v1/tts", json={}) as resp:
        return resp.status, json.loads(await resp.read())


async def test_sigterm_drains_in_flight_and_refuses_queued(
    upstream: Upstream, tmp_path: Path
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"spoken": True})

    upstream.route("POST", "/api/synthesize", slow)
    await upstream.start()
    config = tmp_path / "consumers.yaml"
    config.write_text(REGISTRY.format(url=upstream.url))
    async with serve(config) as daemon, aiohttp.ClientSession() as session:
        running = asyncio.create_task(post_tts(session, daemon.url))
        await asyncio.wait_for(entered.wait(), 10)
        queued = asyncio.create_task(post_tts(session, daemon.url))

        async def queue_depth() -> bool:
            async with session.get(f"{daemon.url}/v1/status") as resp:
                return bool((await resp.json())["scheduler"]["queue_depth"] == 1)

        await wait_for(queue_depth, what="second job queued")
        daemon.proc.send_signal(signal.SIGTERM)
        status, body = await queued
        assert (status, body["error"]) == (503, "shutting_down")
        assert daemon.proc.returncode is None  # still draining the running job
        release.set()
        assert await running == (200, {"spoken": True})
        assert await daemon.wait() == 0
    assert daemon.logged("draining") and daemon.logged("stopped")


async def test_sighup_refuses_a_bad_registry_and_keeps_serving(
    upstream: Upstream, tmp_path: Path
) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"spoken": True})

    upstream.route("POST", "/api/synthesize", ok)
    await upstream.start()
    config = tmp_path / "consumers.yaml"
    config.write_text(REGISTRY.format(url=upstream.url))
    async with serve(config) as daemon, aiohttp.ClientSession() as session:
        config.write_text(
            REGISTRY.format(url=upstream.url).replace("priority", "x") + "  typo: 1\n"
        )
        daemon.proc.send_signal(signal.SIGHUP)
        await wait_for(
            lambda: daemon.logged("new registry refused"), what=f"refusal logged: {daemon.log}"
        )
        assert daemon.logged("consumers.typo")
        assert await post_tts(session, daemon.url) == (200, {"spoken": True})
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait() == 0
