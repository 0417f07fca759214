"""The daemon: its listeners, signals, reloads and ordered shutdown.

It listens on `listen` and on each consumer's `front_door` (that consumer's API at the root);
every listener is opened by `open_listener`, with the same settings (one connection guard for
them all: a header deadline, the connection cap, protocol errors answered as envelopes).
SIGHUP re-reads the registry off the event loop and applies it in one step; SIGTERM drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from mgpumanager.api.app import make_app, make_front_door
from mgpumanager.broker import Broker
from mgpumanager.notify import Notifier
from mgpumanager.registry import Config, ConfigError, load_config, split_listen
from mgpumanager.relay.listener import ConnectionGuard, guard_runner, raise_file_limit

log = logging.getLogger(__name__)

# Connections the kernel queues for a listener before it accepts them (capped at
# net.core.somaxconn): a burst of clients past it waits a second for its SYN to be sent again.
LISTEN_BACKLOG = 1024


# How long SIGHUP may spend reading the new registry. The read runs off the event loop, so
# even a pathological file (a FIFO nobody writes, a nesting bomb) cannot freeze serving.
RELOAD_READ_TIMEOUT_S = 10.0


class StartupError(Exception):
    """The daemon cannot start for a reason outside the registry's validity (its port is
    taken): one line for the operator, no traceback."""


class ListenError(StartupError):
    """A listener cannot bind its address. `key` is the registry key that asked for it
    (`listen`, `consumers.NAME.front_door`): the one to change."""

    def __init__(self, key: str, address: str, reason: str, consumer: str | None = None) -> None:
        self.key = key
        self.address = address
        what = "" if consumer is None else f" (front door of {consumer})"
        super().__init__(f"cannot listen on {address}{what}: {reason}")


class Listener:
    """One address the daemon accepts connections on: an application's runner and the sockets
    bound for it. `open_listener` binds without accepting, so that a reload can take a front
    door's port before it changes anything (and be refused whole if the port is taken);
    `serve` starts accepting."""

    def __init__(
        self, key: str, configured: str, runner: web.AppRunner, server: asyncio.Server
    ) -> None:
        self.key = key
        self.configured = configured  # HOST:PORT as the registry says (port 0: any free one)
        self.runner = runner
        self.server = server

    @property
    def address(self) -> str:
        """HOST:PORT it is bound to (the port chosen, where the registry said 0)."""
        host, port = self.server.sockets[0].getsockname()[:2]
        return _join(host, port)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def serve(self) -> None:
        await self.server.start_serving()

    async def aclose(self, grace_s: float = 0.0, cut: asyncio.Event | None = None) -> None:
        """Stop accepting at once. Requests in flight get `grace_s` to finish (idle keep-alive
        connections close now), or until `cut` is set; what still runs then is cancelled (1 s
        bound), and everything is released."""
        self.server.close()  # not wait_closed(): it would wait for every connection to end
        handlers = self.runner.server
        if grace_s > 0 and handlers is not None:
            handlers.pre_shutdown()
            waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(handlers.shutdown(grace_s))}
            if cut is not None:
                waits.add(asyncio.ensure_future(cut.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
        await self.runner.cleanup()


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_reason(exc: OSError) -> str:
    # asyncio words it "error while attempting to bind on address ...": say only why.
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)  # a host that does not resolve (negative errno)


async def open_listener(
    app: web.Application,
    key: str,
    address: str,
    *,
    guard: ConnectionGuard,
    consumer: str | None = None,
) -> Listener:
    """Bind HOST:PORT `address` for `app`, not accepting yet (`Listener.serve`). Every listener
    the daemon opens, `listen` and each front door, is opened here: one place for the settings
    they all share. A port that cannot be bound is a ListenError naming `key`."""
    host, port = split_listen(address)
    # handler_cancellation: a client that disconnects cancels its handler, which leaves the
    # queue or aborts the upstream request (aiohttp ≥3.9 no longer does this by default).
    # shutdown_timeout: by cleanup time the broker has drained; what still runs is cancelled.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    guard_runner(runner, guard)  # header deadline, connection cap, protocol errors as envelopes
    handlers = runner.server
    if handlers is None:
        raise RuntimeError("the runner has no server after setup")
    try:
        # The host's every address (a name, or empty for all), as aiohttp's TCPSite binds.
        server = await asyncio.get_running_loop().create_server(
            handlers, host or None, port, start_serving=False, backlog=LISTEN_BACKLOG
        )
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(key, address, _bind_reason(exc), consumer) from exc
    return Listener(key, address, runner, server)


async def open_front_door(
    broker: Broker, name: str, address: str, guard: ConnectionGuard
) -> Listener:
    return await open_listener(
        make_front_door(broker, name),
        f"consumers.{name}.front_door",
        address,
        guard=guard,
        consumer=name,
    )


class Server:
    """A started broker behind its listeners: `listen`, and the front door of each consumer
    that declares one."""

    def __init__(
        self,
        broker: Broker,
        listener: Listener,
        front_doors: dict[str, Listener] | None = None,
        guard: ConnectionGuard | None = None,
    ) -> None:
        self.broker = broker
        self.listener = listener
        self.front_doors: dict[str, Listener] = {}
        self._set_front_doors(front_doors or {})
        # One guard for every listener: the connection cap counts across them all.
        self.guard = guard or ConnectionGuard(lambda: broker.config)
        self.reload_read_timeout_s = RELOAD_READ_TIMEOUT_S
        self._reloads: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        self._retiring: set[asyncio.Task[None]] = set()  # front doors a reload removed
        self._cut = asyncio.Event()  # set at shutdown: retired doors' requests are cut

    @property
    def url(self) -> str:
        return self.listener.url

    def _set_front_doors(self, doors: dict[str, Listener]) -> None:
        self.front_doors = doors
        self.broker.front_doors = {name: door.address for name, door in doors.items()}

    def reload_later(self, path: Path, notifier: Notifier | None = None) -> asyncio.Task[None]:
        """What SIGHUP does (a signal handler cannot await): reload in a task that `stop`
        waits for."""
        task = asyncio.create_task(self.reload(path, notifier), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        return task

    async def reload(self, path: Path, notifier: Notifier | None = None) -> None:
        """Re-read the registry at `path` and apply it. A file that cannot be read in time, a
        bad file, one that changes what needs a restart, or a front door whose port cannot be
        bound is refused with one ERROR line (every problem listed in it), and the old registry
        stays in force. Reloads run one at a time; systemd hears RELOADING=1 before and READY=1
        after, whatever the outcome (unless the daemon has begun to stop meanwhile: it said
        STOPPING=1 then)."""
        async with self._reload_lock:
            if notifier is not None:
                notifier.reloading("reloading the registry")
            try:
                await self._reload(path)
            finally:
                if notifier is not None and not self._stopping:
                    notifier.ready(f"listening on {self.url}")

    async def _reload(self, path: Path) -> None:
        refused = "SIGHUP: new registry refused, keeping the old one"
        try:
            async with asyncio.timeout(self.reload_read_timeout_s):
                new = await _in_daemon_thread(load_config, path)
        except TimeoutError:
            log.error(
                "%s: reading %s took longer than %g s", refused, path, self.reload_read_timeout_s
            )
            return
        except ConfigError as exc:
            log.error("%s:\n%s", refused, exc)
            return
        except Exception as exc:  # RecursionError on a deeply nested file, MemoryError, ...
            log.error("%s: %s cannot be read: %s: %s", refused, path, type(exc).__name__, exc)
            return
        if new == self.broker.config:
            log.info("SIGHUP: registry unchanged")
            return
        try:
            changes = await self.apply(new)
        except (ValueError, ListenError) as exc:
            log.error("%s: %s", refused, exc)
            return
        log.info("SIGHUP: registry reloaded (%s)", ", ".join(changes) or "no effective change")

    async def apply(self, new: Config) -> list[str]:
        """Apply a re-read registry: the broker's part (`Broker.reload`) and the front doors.
        The doors `new` adds or moves are bound first, not yet accepting; a port that cannot
        be bound (ListenError), or a registry the broker refuses (ValueError), leaves
        everything as it was. Then the new doors accept, and those `new` removes or moves stop
        accepting at once, their requests in flight given `scheduler.drain_timeout_s`."""
        opened: dict[str, Listener] = {}
        try:
            for name, c in new.consumers.items():
                door = self.front_doors.get(name)
                if c.front_door is not None and (door is None or door.configured != c.front_door):
                    opened[name] = await open_front_door(
                        self.broker, name, c.front_door, self.guard
                    )
            changes = await self.broker.reload(new)
        except BaseException:
            await asyncio.gather(*(door.aclose() for door in opened.values()))
            raise
        doors: dict[str, Listener] = {}
        for name, door in self.front_doors.items():
            now = new.consumers.get(name)
            if name not in opened and now is not None and now.front_door == door.configured:
                doors[name] = door
                continue
            if name not in opened:
                changes.append(f"front door of {name} closed")
            task = asyncio.create_task(
                door.aclose(new.scheduler.drain_timeout_s, self._cut), name=f"close {door.key}"
            )
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        for name, door in opened.items():
            try:
                await door.serve()
            except OSError as exc:  # bound, yet it cannot listen: the rest stays applied
                log.error(
                    "front door of %s: %s",
                    name,
                    ListenError(door.key, door.configured, _bind_reason(exc), name),
                )
                await door.aclose()
                continue
            doors[name] = door
            changes.append(f"front door of {name} on {door.address}")
        self._set_front_doors(doors)
        return changes

    async def stop(self) -> None:
        """Ordered shutdown: finish reloads in flight (their reads are bounded), drain with a
        bound, stop accepting on every listener, cancel the rest (closing a listener cancels
        handlers still running, which aborts their upstream requests), release."""
        self._stopping = True
        while pending := [task for task in self._reloads if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
        await self.broker.drain()
        self._cut.set()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await asyncio.gather(
            *(each.aclose() for each in (self.listener, *self.front_doors.values()))
        )
        await self.broker.aclose()


T = TypeVar("T")


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """`asyncio.to_thread`, but in a daemon thread of its own: a read that never returns is
    abandoned at its timeout and cannot hold up the process's exit (the default executor's
    threads are joined when the loop closes)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        def settle() -> None:
            if not future.done():  # the awaiting side may have given up (timeout, cancel)
                setter(value)

        # RuntimeError: the loop has closed meanwhile, and nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            deliver(future.set_exception, exc)
        else:
            deliver(future.set_result, result)

    threading.Thread(target=work, name=getattr(fn, "__name__", "work"), daemon=True).start()
    return await future


async def start_server(broker: Broker, host: str | None = None, port: int | None = None) -> Server:
    """Start `broker` behind its listeners: `listen` (`host`, `port` override it) and each
    consumer's `front_door`. A port that cannot be bound is a ListenError naming its registry
    key, and nothing is left running: every address is bound (not yet accepting) before the
    broker starts and probes its upstreams."""
    cfg_host, cfg_port = broker.config.listen_host_port
    address = _join(cfg_host if host is None else host, cfg_port if port is None else port)
    opened: list[Listener] = []
    doors: dict[str, Listener] = {}
    guard = ConnectionGuard(lambda: broker.config)
    if guard.max_connections < broker.config.max_connections:
        log.warning(
            "max_connections %d lowered to %d: this process may open %s files (LimitNOFILE)",
            broker.config.max_connections,
            guard.max_connections,
            guard.files,
        )
    started = False
    try:
        listener = await open_listener(make_app(broker), "listen", address, guard=guard)
        opened.append(listener)
        for name, c in broker.config.consumers.items():
            if c.front_door is not None:
                doors[name] = await open_front_door(broker, name, c.front_door, guard)
                opened.append(doors[name])
        started = True
        await broker.start()
        for each in opened:
            await each.serve()
    except BaseException:
        await asyncio.gather(*(each.aclose() for each in opened))
        if started:
            await broker.aclose()
        raise
    return Server(broker, listener, doors, guard)


async def serve(
    config_path: Path,
    *,
    notifier: Notifier | None = None,
    reload_read_timeout_s: float = RELOAD_READ_TIMEOUT_S,
) -> int:
    """`mgpumanager serve`: run until SIGTERM/SIGINT; SIGHUP re-reads the registry. Under
    systemd (`Type=notify`) it says READY=1 once the port accepts connections and the first
    residency discovery is done, and sends watchdog keep-alives from this loop throughout."""
    config = load_config(config_path)
    raise_file_limit()  # before the first connection: the cap follows from it
    own = notifier is None
    notifier = Notifier.from_environ() if notifier is None else notifier
    # From the start: discovery may take a while, and the watchdog runs from the exec.
    watchdog = notifier.start_watchdog()
    try:
        return await _serve(config, config_path, notifier, reload_read_timeout_s)
    finally:
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        if own:
            notifier.close()


async def _serve(
    config: Config, config_path: Path, notifier: Notifier, reload_read_timeout_s: float
) -> int:
    try:
        server = await start_server(Broker(config))
    except ListenError as exc:
        # The CLI asks who holds the port (tools.port_holder) and says so.
        raise StartupError(f"broker: {exc}; change `{exc.key}` in {config_path}") from exc
    server.reload_read_timeout_s = reload_read_timeout_s
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handlers: dict[signal.Signals, Callable[[], object]] = {
        signal.SIGTERM: stop.set,
        signal.SIGINT: stop.set,
        signal.SIGHUP: lambda: server.reload_later(config_path, notifier),
    }
    previous = {sig: signal.getsignal(sig) for sig in handlers}
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        # Only now: whoever waits for this line (or READY=1) may signal us, and the handlers
        # are in place.
        log.info("listening on %s", server.url)
        for name, door in server.front_doors.items():
            log.info("front door of %s on %s", name, door.url)
        notifier.ready(f"listening on {server.url}")
        await stop.wait()
        notifier.stopping("draining")
        loop.remove_signal_handler(signal.SIGHUP)  # no new reload once draining
        log.info("signal received: draining")
        await server.stop()
    finally:
        for sig, old in previous.items():
            loop.remove_signal_handler(sig)
            if old is not None:
                signal.signal(sig, old)  # as they were: asyncio.run's own SIGINT handler, say
    log.info("stopped")
    return 0
