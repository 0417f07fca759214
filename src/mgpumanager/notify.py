"""Telling systemd how the daemon is doing (`Type=notify`, `WatchdogSec=`).

The protocol is one datagram per message to the AF_UNIX socket named by `$NOTIFY_SOCKET`
(a path, or `@name` for the abstract namespace), holding newline-separated `KEY=value`
lines: `READY=1`, `RELOADING=1` (with `MONOTONIC_USEC=`), `STOPPING=1`, `WATCHDOG=1`,
`STATUS=text`. Without `$NOTIFY_SOCKET` (not under systemd, or not `Type=notify`) every call
is a no-op.

The watchdog keep-alive is an asyncio task on the daemon's own event loop, every half of
`$WATCHDOG_USEC`: a loop that freezes stops sending, and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify messages; `Notifier(None)` sends nothing."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop on a full receive queue: a lost datagram is better.
            self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Reads the variables systemd sets and removes them, so that the processes the daemon
        starts (`command` consumers) do not inherit them."""
        env = os.environ if environ is None else environ
        address, usec, pid = (env.pop(name, None) for name in _ENV)
        watchdog_usec: int | None = None
        if usec is not None and (pid is None or pid == str(os.getpid())):
            with contextlib.suppress(ValueError):
                watchdog_usec = int(usec) if int(usec) > 0 else None
        return cls(address or None, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half the watchdog timeout, as systemd recommends; None when there is no watchdog."""
        if self._sock is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, *fields: str) -> bool:
        """One datagram of `KEY=value` lines; False when not sent (disabled, or it failed)."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise log every ping
                log.warning("systemd notify socket %r: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def start_watchdog(self) -> asyncio.Task[None] | None:
        """Start pinging from the running loop; None when systemd asked for no watchdog."""
        interval = self.watchdog_interval_s
        if interval is None:
            return None
        return asyncio.create_task(self._ping(interval), name="watchdog")

    async def _ping(self, interval_s: float) -> None:
        while True:
            self.watchdog()
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    return () if text is None else (f"STATUS={text}",)
