"""`type: command` — servers with no unload endpoint (whisper.cpp's whisper-server): unload and
load are argv lists from the registry (`systemctl stop whisper-server`), never from a request.
Up = resident: its health answering means its model is loaded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
from typing import IO

from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import Action
from mgpumanager.upstreams.adapters.base import BaseAdapter, ResidencyReport

log = logging.getLogger(__name__)


class CommandAdapter(BaseAdapter):
    stops_process = True

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


def _tail(out: IO[bytes], limit: int = 500) -> str:
    """The last `limit` characters a command wrote, as ": <text>" (empty when it wrote nothing)."""
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - 4 * limit))  # a chatty command: only its last words matter
    text = out.read().decode(errors="replace").strip()[-limit:]
    return f": {text}" if text else ""
