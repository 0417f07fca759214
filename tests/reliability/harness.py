"""The box the reliability runs stand on: the simulated GPU and the fakes in the test process,
the broker as a real `mgpumanager serve` process (its log in a file, real signals, its RSS read
from /proc).

Sizes scale with `MGPU_SOAK`: unset, each run is a smaller version that fits `make test`;
`make soak` sets it and the same runs go to the figures published in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from conftest import wait_for
from mgpumanager.registry import Config

SOAK = bool(os.environ.get("MGPU_SOAK"))


def scaled(small: int, soak: int) -> int:
    return soak if SOAK else small


def figure(name: str, value: float | int | str) -> None:
    """A measured figure: printed (`pytest -s` shows it) and, where `MGPU_FIGURES` names a file,
    appended to it as a JSON line (how `make soak` collects what docs/reliability.md publishes)."""
    print(f"FIGURE {name} = {value}")
    path = os.environ.get("MGPU_FIGURES")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"name": name, "value": value}) + "\n")


def raise_open_file_limit() -> int:
    """The test process opens thousands of client sockets: its soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def write_registry(path: Path, config: Config | Mapping[str, Any], **top: Any) -> Path:
    """`config` as a registry file (JSON is YAML), with top-level keys replaced by `top`."""
    # What was written, not the defaults: `command: null` would read as a key set.
    data = config.model_dump(exclude_unset=True) if isinstance(config, Config) else dict(config)
    data.update(top)
    path.write_text(json.dumps(data, indent=1, default=_plain))
    return path


def _plain(value: object) -> object:
    if isinstance(value, SecretStr):
        return value.get_secret_value()  # the daemon needs the token itself
    raise TypeError(f"{type(value).__name__} in a registry")


class Daemon:
    """`mgpumanager serve` as a process; stderr goes to `log_path` (appended across restarts)."""

    def __init__(self, registry: Path, log_path: Path) -> None:
        self.registry = registry
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self) -> str:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mgpumanager.cli", "--log-level", "INFO",
                "serve", "--config", str(self.registry),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
        found: list[str] = []

        def listening() -> bool:
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            with self.log_path.open("rb") as log:
                log.seek(offset)
                m = re.search(rb"listening on (http://\S+)", log.read())
            if m:
                found.append(m.group(1).decode())
            return bool(found)

        await wait_for(listening, timeout_s=60, what="the daemon listening")
        self.url = found[0]
        return self.url

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        m = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert m is not None
        return int(m.group(1)) / 1024

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0


def assert_clean_log(text: str) -> None:
    """No traceback and no ERROR line: what a client or an upstream did is a WARNING at most."""
    assert "Traceback (most recent call last)" not in text, _around(text, "Traceback")
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert not errors, errors[:5]


def _around(text: str, needle: str, width: int = 3000) -> str:
    at = text.find(needle)
    return text[max(0, at - 500) : at + width]


@asynccontextmanager
async def daemon(registry: Path, log_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(registry, log_path)
    try:
        await d.start()
        yield d
    finally:
        if d.proc is not None and d.proc.returncode is None:
            d.send(signal.SIGTERM)
            try:
                await d.wait(30)
            except TimeoutError:
                await d.kill()
