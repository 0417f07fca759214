"""Start a simulated GPU and a set of fake consumers on loopback, as one box would run them.

What ``make demo``, the end-to-end tests and the benchmarks stand on::

    cluster = await start_cluster(total_mib=24576, spec=FakeSpec.instant())
    cluster.urls["ollama"]   # http://127.0.0.1:<port>
    cluster.gpu.oom_count    # the number the broker exists to keep at 0
    await cluster.aclose()

Every fake shares one :class:`SimGPU` (served at ``gpu_url`` by :func:`gpu_app`) and one
:class:`ActivityLog`. Ports are 0 (any free port, read back from the socket) unless ``ports``
names them: keys ``gpu`` and the consumer names. With ``FakeSpec.whisper_subprocess`` the
whisper fake runs as its own process through the launcher (pidfile, ``HttpLedger``), so it can
be stopped and started again by commands, like ``systemctl stop/start whisper-server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from mgpumanager.sim import launcher
from mgpumanager.sim.activity import ActivityLog
from mgpumanager.sim.box import SimBox
from mgpumanager.sim.comfyui import ComfyUISettings, FakeComfyUI
from mgpumanager.sim.gpu import LocalLedger, SimGPU, gpu_app
from mgpumanager.sim.mvoice import FakeMVoice, MVoiceSettings
from mgpumanager.sim.ollama import FakeOllama, OllamaSettings
from mgpumanager.sim.server import RunningApp, serve_app, wait_until
from mgpumanager.sim.speaches import FakeSpeaches, SpeachesSettings
from mgpumanager.sim.vllm import FakeVLLM, VLLMSettings
from mgpumanager.sim.whisper import FakeWhisper, WhisperSettings

_TIMING_FIELDS = ("load_s", "run_s", "free_delay_s", "wake_s", "embed_s")


@dataclass(frozen=True)
class FakeSpec:
    """Which fakes to start (None = not started) and their settings."""

    mvoice: MVoiceSettings | None = field(default_factory=MVoiceSettings)
    ollama: OllamaSettings | None = field(default_factory=OllamaSettings)
    comfyui: ComfyUISettings | None = field(default_factory=ComfyUISettings)
    whisper: WhisperSettings | None = field(default_factory=WhisperSettings)
    speaches: SpeachesSettings | None = None
    vllm: VLLMSettings | None = None
    whisper_subprocess: bool = False  # run whisper as its own process via the launcher

    def with_timing(self, **seconds: float) -> FakeSpec:
        """Every enabled fake with the given timing fields (``load_s=0, run_s=0.05, ...``)."""
        unknown = set(seconds) - set(_TIMING_FIELDS)
        if unknown:
            raise ValueError(f"unknown timing fields {sorted(unknown)}; known: {_TIMING_FIELDS}")
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            settings = getattr(self, f.name)
            if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
                names = {g.name for g in dataclasses.fields(settings)}
                changes[f.name] = dataclasses.replace(
                    settings, **{k: v for k, v in seconds.items() if k in names}
                )
        return dataclasses.replace(self, **changes)

    @classmethod
    def instant(cls, **kwargs: Any) -> FakeSpec:
        """The default fakes with every delay 0 (for tests)."""
        return cls(**kwargs).with_timing(load_s=0, run_s=0, free_delay_s=0, wake_s=0, embed_s=0)


@dataclass(frozen=True)
class WhisperProcess:
    """The whisper fake running as its own process; the argv lists are what a ``command``
    adapter's ``unload.command`` / ``load.command`` should run."""

    url: str
    port: int
    pidfile: Path
    log_path: Path
    start_argv: list[str]
    stop_argv: list[str]

    def running(self) -> bool:
        return launcher.running_pid(self.pidfile) is not None


class BindError(OSError):
    """A piece of the cluster could not listen where it was told: which one, and where."""

    def __init__(self, piece: str, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.piece = piece
        self.host = host
        self.port = port


async def _serve(piece: str, app: Any, host: str, port: int) -> RunningApp:
    try:
        return await serve_app(app, host=host, port=port)
    except OSError as exc:
        raise BindError(piece, host, port, exc) from exc


class SimCluster:
    def __init__(
        self,
        gpu: SimGPU,
        activity: ActivityLog,
        gpu_server: RunningApp,
        run_dir: Path,
        own_dir: bool,
    ) -> None:
        self.gpu = gpu  # the first card (the only one, unless started with gpus=N)
        self.cards: list[SimGPU] = [gpu]
        self.activity = activity
        self.gpu_url = gpu_server.url
        self.urls: dict[str, str] = {}
        self.fakes: dict[str, object] = {}
        self.servers: dict[str, RunningApp] = {"gpu": gpu_server}
        self.whisper_process: WhisperProcess | None = None
        self.run_dir = run_dir
        self._own_dir = own_dir

    @property
    def oom_count(self) -> int:
        """Out-of-memory failures on every card."""
        return sum(card.oom_count for card in self.cards)

    async def aclose(self) -> None:
        """Stop the fakes (and the whisper process), then the GPU server last."""
        for name, server in reversed(list(self.servers.items())):
            if name != "gpu":
                await server.aclose()
        if self.whisper_process is not None:
            await asyncio.to_thread(launcher.stop, self.whisper_process.pidfile, 10.0)
        await self.servers["gpu"].aclose()
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    async def __aenter__(self) -> SimCluster:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _launcher_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "mgpumanager.sim.launcher", *args]


def _read_port(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


async def _start_whisper_process(
    cluster: SimCluster, settings: WhisperSettings, host: str, port: int
) -> WhisperProcess:
    pidfile = cluster.run_dir / "whisper-server.pid"
    port_file = cluster.run_dir / "whisper-server.port"
    log_path = cluster.run_dir / "whisper-server.log"
    port_file.unlink(missing_ok=True)

    def serve_argv(p: int) -> list[str]:
        return [
            sys.executable, "-m", "mgpumanager.sim.whisper",
            "--host", host, "--port", str(p), "--ledger", cluster.gpu_url,
            "--owner", settings.owner, "--model", settings.model_path,
            "--model-mib", str(settings.model_mib), "--load-s", str(settings.load_s),
            "--run-s", str(settings.run_s), "--free-delay-s", str(settings.free_delay_s),
            "--port-file", str(port_file), "--activity",
        ]  # fmt: skip

    proc = await asyncio.create_subprocess_exec(
        *_launcher_argv(
            "start", "--pidfile", str(pidfile), "--log", str(log_path), "--", *serve_argv(port)
        )
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"launcher could not start whisper; see {log_path}")
    await wait_until(
        lambda: _read_port(port_file) is not None, timeout_s=20.0, what="whisper port file"
    )
    bound = _read_port(port_file)
    if bound is None:
        raise RuntimeError(f"whisper wrote no port to {port_file}")
    host_part = f"[{host}]" if ":" in host else host
    return WhisperProcess(
        url=f"http://{host_part}:{bound}",
        port=bound,
        pidfile=pidfile,
        log_path=log_path,
        # A restart binds the same port again, so the broker's URL stays valid.
        start_argv=_launcher_argv(
            "start", "--pidfile", str(pidfile), "--log", str(log_path), "--", *serve_argv(bound)
        ),
        stop_argv=_launcher_argv("stop", "--pidfile", str(pidfile)),
    )


async def start_cluster(
    *,
    total_mib: int = 24576,
    host: str = "127.0.0.1",
    ports: Mapping[str, int] | None = None,
    spec: FakeSpec | None = None,
    gpu_name: str = "Simulated GPU",
    run_dir: Path | None = None,
    gpus: int = 1,
    devices: Mapping[str, int] | None = None,
) -> SimCluster:
    """Start the simulated GPU and the fakes of ``spec`` (default: mvoice, ollama, comfyui,
    whisper with their default settings). ``run_dir`` holds pidfiles and logs of subprocesses
    (a temporary directory, removed on close, when not given). ``gpus``: cards of
    ``total_mib`` each (sim/box.py); ``devices``: the card each fake allocates on (default 0)."""
    spec = spec or FakeSpec()
    ports = dict(ports or {})
    activity = ActivityLog()
    if gpus == 1:
        cards = [SimGPU(total_mib, gpu_name, busy=activity.busy)]
        box = None
    else:
        cards = [SimGPU(total_mib, f"{gpu_name} {i}", busy=activity.busy) for i in range(gpus)]
        box = SimBox(cards)
    gpu = cards[0]
    app = gpu_app(gpu, activity, snapshot=None if box is None else box.snapshot)
    gpu_server = await _serve("gpu", app, host, ports.get("gpu", 0))
    own_dir = run_dir is None
    cluster = SimCluster(
        gpu, activity, gpu_server, run_dir or Path(tempfile.mkdtemp(prefix="mgpu-sim-")), own_dir
    )
    cluster.cards = cards
    ledgers = [LocalLedger(card) for card in cards]
    on = dict(devices or {})

    def ledger_of(name: str) -> LocalLedger:
        return ledgers[min(on.get(name, 0), gpus - 1)]

    try:
        fakes: dict[str, Any] = {}
        if spec.mvoice is not None:
            fakes["mvoice"] = FakeMVoice(spec.mvoice, ledger=ledger_of("mvoice"), activity=activity)
        if spec.ollama is not None:
            ollama = spec.ollama
            if ollama.vram_budget_mib is None:  # Ollama believes the whole card is its own
                ollama = dataclasses.replace(ollama, vram_budget_mib=total_mib)
            fakes["ollama"] = FakeOllama(ollama, ledger=ledger_of("ollama"), activity=activity)
        if spec.comfyui is not None:
            fakes["comfyui"] = FakeComfyUI(
                spec.comfyui, ledger=ledger_of("comfyui"), activity=activity
            )
        if spec.whisper is not None and not spec.whisper_subprocess:
            fakes["whisper"] = FakeWhisper(
                spec.whisper, ledger=ledger_of("whisper"), activity=activity
            )
        if spec.speaches is not None:
            fakes["speaches"] = FakeSpeaches(
                spec.speaches, ledger=ledger_of("speaches"), activity=activity
            )
        if spec.vllm is not None:
            fakes["vllm"] = FakeVLLM(spec.vllm, ledger=ledger_of("vllm"), activity=activity)
        for name, fake in fakes.items():
            server = await _serve(name, fake.app, host, ports.get(name, 0))
            cluster.servers[name] = server
            cluster.urls[name] = server.url
            cluster.fakes[name] = fake
        if spec.whisper is not None and spec.whisper_subprocess:
            proc = await _start_whisper_process(
                cluster, spec.whisper, host, ports.get("whisper", 0)
            )
            cluster.whisper_process = proc
            cluster.urls["whisper"] = proc.url
            cluster.fakes["whisper"] = proc
    except BaseException:
        with contextlib.suppress(Exception):
            await cluster.aclose()
        raise
    return cluster
