"""`mgpumanager serve` as a process, with real signals: SIGTERM drains, SIGHUP re-reads the
registry and refuses a bad one, a taken port is one line; and in-process, the lifecycle's
order: reloads off the loop and bounded, awaited at shutdown, signal handlers restored."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from conftest import Upstream, wait_for
from mgpumanager.daemon import serve as serve_in_process
from mgpumanager.notify import Notifier

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
async def serve(config: Path, loop: str = "") -> AsyncIterator[Daemon]:
    """`mgpumanager serve` in a process of its own; `loop`: MGPUMANAGER_LOOP (empty: the
    default, Python's own)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mgpumanager.cli", "serve", "--config", str(config),
        env={**os.environ, "MGPUMANAGER_LOOP": loop},
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


@pytest.mark.parametrize("loop", ["", "uvloop"], ids=["default-loop", "uvloop"])
async def test_sigterm_drains_in_flight_and_refuses_queued(
    upstream: Upstream, tmp_path: Path, loop: str
) -> None:
    """On either event loop: Python's own by default, uvloop where MGPUMANAGER_LOOP asks for it
    (the `fast` extra, installed with the dev extras)."""
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    expected = loop or "asyncio"
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"spoken": True})

    upstream.route("POST", "/api/synthesize", slow)
    await upstream.start()
    config = tmp_path / "consumers.yaml"
    config.write_text(REGISTRY.format(url=upstream.url))
    async with serve(config, loop) as daemon, aiohttp.ClientSession() as session:
        assert daemon.logged(f"event loop {expected}")
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
        errors = [line for line in daemon.log if " ERROR " in line]
        assert len(errors) == 1, daemon.log  # one record, every problem listed in it
        assert not daemon.logged("Traceback")
        assert await post_tts(session, daemon.url) == (200, {"spoken": True})
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait() == 0


async def test_a_taken_port_is_one_line_naming_the_key(upstream: Upstream, tmp_path: Path) -> None:
    await upstream.start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "consumers.yaml"
        config.write_text(
            REGISTRY.format(url=upstream.url).replace("127.0.0.1:0", f"127.0.0.1:{port}")
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mgpumanager.cli", "serve", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = err.decode().splitlines()
    assert proc.returncode == 1, lines
    assert lines[-1] == (
        f"mgpumanager: broker: cannot listen on 127.0.0.1:{port}: Address already in use; "
        f"change `listen` in {config}"
    )
    assert not any("Traceback" in line for line in lines)


async def test_shutdown_awaits_a_stuck_reload_and_restores_signal_handlers(
    upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process, real signals. The new registry is a FIFO nobody writes: reading it never
    ends. The read runs off the loop (the daemon keeps answering), is refused at its bound, and
    SIGTERM's shutdown waits for that refusal before draining; then the signal handlers are the
    ones that were there before."""
    caplog.set_level(logging.INFO)
    await upstream.start()
    config = tmp_path / "consumers.yaml"
    config.write_text(REGISTRY.format(url=upstream.url))
    notify_path = tmp_path / "notify"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(notify_path))
    systemd.setblocking(False)
    loop = asyncio.get_running_loop()

    async def expect(key: str) -> str:
        while True:
            data = (await asyncio.wait_for(loop.sock_recv(systemd, 4096), 30)).decode()
            if data.startswith(key):
                return data

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("the test's own SIGHUP handler ran")

    before = signal.signal(signal.SIGHUP, mine)
    term_before = signal.getsignal(signal.SIGTERM)
    notifier = Notifier(str(notify_path))
    served = asyncio.create_task(
        serve_in_process(config, notifier=notifier, reload_read_timeout_s=0.5)
    )
    try:
        ready = await expect("READY=1")
        url = ready.split("listening on ")[1].strip()
        config.unlink()
        os.mkfifo(config)
        os.kill(os.getpid(), signal.SIGHUP)
        await expect("RELOADING=1")
        async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as resp:
            assert resp.status == 200  # the loop runs while the read is stuck
        assert not served.done()
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(served, 30) == 0
        messages = [r.getMessage() for r in caplog.records]
        refusal = next(i for i, m in enumerate(messages) if "took longer than 0.5 s" in m)
        assert refusal < messages.index("stopped")  # awaited before the daemon stopped
        refused = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(refused) == 1 and refused[0].exc_info is None
        assert signal.getsignal(signal.SIGHUP) is mine
        assert signal.getsignal(signal.SIGTERM) == term_before
    finally:
        if not served.done():
            served.cancel()
        # Let the abandoned reader finish: a writer opening the FIFO ends its open().
        if config.is_fifo():
            with contextlib.suppress(OSError):  # ENXIO: no reader left
                os.close(os.open(config, os.O_WRONLY | os.O_NONBLOCK))
        signal.signal(signal.SIGHUP, before)
        notifier.close()
        systemd.close()
