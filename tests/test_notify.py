"""The systemd notify protocol against a fake `$NOTIFY_SOCKET`: a datagram socket the test
binds. READY=1 only once the port accepts connections and discovery is done, RELOADING=1 and
READY=1 around SIGHUP, STOPPING=1 on drain, and watchdog pings from the event loop, which
stop while the loop is blocked."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
from aiohttp import web

from conftest import Upstream
from mgpumanager.notify import Notifier

Message = dict[str, str]


class FakeSystemd:
    """The receiving end of `$NOTIFY_SOCKET`: every datagram, parsed into its fields."""

    def __init__(self, path: Path) -> None:
        assert len(os.fsencode(path)) < 100, f"AF_UNIX path too long: {path}"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[Message] = []

    async def receive(self, timeout_s: float = 30.0) -> Message:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout_s)
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append(message)
        return message

    async def expect(self, key: str, timeout_s: float = 30.0) -> Message:
        """The next message carrying `key`, skipping watchdog pings."""
        while True:
            message = await self.receive(timeout_s)
            if key in message:
                return message
            assert set(message) == {"WATCHDOG"}, f"unexpected {message} while waiting for {key}"

    def pending(self) -> list[Message]:
        """What arrived and was not read yet, without waiting."""
        out: list[Message] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                self.seen.extend(out)
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def listen_blocking(self, span_s: float) -> list[bytes]:
        """Block the calling thread (and so its event loop) for `span_s`, collecting whatever
        arrives meanwhile: the deadline of a socket receive, not a sleep."""
        got: list[bytes] = []
        self.sock.settimeout(span_s)
        try:
            while True:
                got.append(self.sock.recv(4096))
        except TimeoutError:
            return got
        finally:
            self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify")
    try:
        yield fake
    finally:
        fake.close()


# -- the notifier on its own --------------------------------------------------------------------


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready() and not notifier.watchdog() and not notifier.stopping()


def test_environment_is_read_once_and_not_passed_on(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": "@mgpumanager-test", "WATCHDOG_USEC": "3000000", "PATH": "/bin"}
    notifier = Notifier.from_environ(env)
    assert notifier.address == "\0mgpumanager-test"  # '@' is the abstract namespace
    assert notifier.watchdog_interval_s == 1.5  # half of WATCHDOG_USEC
    assert env == {"PATH": "/bin"}  # the processes it starts do not inherit them
    notifier.close()
    other_pid = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    notifier = Notifier.from_environ(other_pid)
    assert notifier.watchdog_interval_s is None  # the watchdog is another process's
    notifier.close()


def test_messages_are_what_systemd_reads(tmp_path: Path) -> None:
    with fake_systemd(tmp_path) as fake:
        notifier = Notifier(str(fake.path))
        assert notifier.ready("up") and notifier.reloading() and notifier.stopping()
        ready, reloading, stopping = fake.pending()
        assert ready == {"READY": "1", "STATUS": "up"}
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert stopping == {"STOPPING": "1"}
        notifier.close()


def test_a_missing_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.enabled and not notifier.ready()
    notifier.close()


async def test_watchdog_pings_come_from_the_loop_and_stop_while_it_is_blocked(
    tmp_path: Path,
) -> None:
    with fake_systemd(tmp_path) as fake:
        notifier = Notifier(str(fake.path), watchdog_usec=20_000)
        assert notifier.watchdog_interval_s == 0.01
        pinger = notifier.start_watchdog()
        assert pinger is not None
        try:
            for _ in range(3):
                assert await fake.receive(10) == {"WATCHDOG": "1"}
            # Block the loop, as a frozen daemon would, for 20 ping intervals: drop what was
            # sent before the block, then listen with the loop unable to run.
            fake.pending()
            assert fake.listen_blocking(0.2) == []
            for _ in range(3):  # the loop runs again: so do the pings
                assert await fake.receive(10) == {"WATCHDOG": "1"}
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
            notifier.close()


# -- `mgpumanager serve` under a fake systemd ---------------------------------------------------

REGISTRY = """\
listen: 127.0.0.1:0
gpu: {{backend: static, total_mib: 24576}}
consumers:
  mvoice:
    url: {url}
    health: {{path: /slow-health, interval_s: 0.2}}
    vram_resident_mib: 1000
"""


@asynccontextmanager
async def serve_under(
    fake: FakeSystemd, config: Path, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {**os.environ, "NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": "200000"}
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mgpumanager.cli", "serve", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
            env=env,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_ready_after_discovery_and_listening_reload_and_stop(
    upstream: Upstream, tmp_path: Path
) -> None:
    probed, release = asyncio.Event(), asyncio.Event()

    async def slow_health(request: web.Request) -> web.Response:
        probed.set()
        await release.wait()  # the first residency discovery waits on this answer
        return web.json_response({"ok": True})

    upstream.route("GET", "/slow-health", slow_health)
    await upstream.start()
    config = tmp_path / "consumers.yaml"
    config.write_text(REGISTRY.format(url=upstream.url))
    log = tmp_path / "serve.log"
    with fake_systemd(tmp_path) as fake:
        async with serve_under(fake, config, log) as proc, aiohttp.ClientSession() as http:
            await asyncio.wait_for(probed.wait(), 30)
            # Discovery is held: the watchdog already runs, but nothing says ready.
            assert all("READY" not in m for m in fake.pending())
            release.set()
            ready = await fake.expect("READY")
            match = re.fullmatch(r"listening on (http://\S+)", ready["STATUS"])
            assert match, ready
            url = match.group(1)
            # At once: the port accepts connections, and discovery has run.
            async with http.get(f"{url}/v1/status") as resp:
                assert resp.status == 200
                assert (await resp.json())["consumers"]["mvoice"]["healthy"] is True
            for _ in range(3):  # WATCHDOG_USEC=200000: a ping every 100 ms
                assert await fake.expect("WATCHDOG") == {"WATCHDOG": "1"}

            proc.send_signal(signal.SIGHUP)
            reloading = await fake.expect("RELOADING")
            assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
            assert (await fake.expect("READY"))["READY"] == "1"

            proc.send_signal(signal.SIGTERM)
            assert (await fake.expect("STOPPING"))["STOPPING"] == "1"
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert "Traceback" not in log.read_text()
