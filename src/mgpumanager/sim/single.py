"""`mgpumanager sim SERVICE --port N`: one fake service (or the simulated card) on its own, to
try the broker against a mix of real and fake services.

    mgpumanager sim gpu --port 8799 --total-mib 24576     # the simulated card
    mgpumanager sim ollama --port 11434 --gpu http://127.0.0.1:8799
    mgpumanager sim comfyui --port 8188                    # a card of its own (24576 MiB)

A fake given `--gpu URL` allocates its memory on that simulated card (a `sim gpu`), as the
services of one box share one card: a broker with `gpu: {backend: sim, sim_url: URL}` then
sees each one's memory. Without `--gpu` a fake has a card of its own (`--total-mib`), and
works alone. Each prints where it listens and runs until Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from typing import Any

from mgpumanager.sim.activity import ActivityLog, ActivitySink
from mgpumanager.sim.comfyui import ComfyUISettings, FakeComfyUI
from mgpumanager.sim.gpu import GpuLedger, HttpLedger, LocalLedger, SimGPU, gpu_app
from mgpumanager.sim.mvoice import FakeMVoice, MVoiceSettings
from mgpumanager.sim.ollama import FakeOllama, OllamaSettings
from mgpumanager.sim.server import RunningApp, serve_app
from mgpumanager.sim.speaches import FakeSpeaches, SpeachesSettings
from mgpumanager.sim.vllm import FakeVLLM, VLLMSettings
from mgpumanager.sim.whisper import FakeWhisper, WhisperSettings

DEFAULT_TOTAL_MIB = 24576

# What each fake is (as `sim --help` lists it), its settings and its class.
FAKES: dict[str, tuple[str, type[Any], type[Any]]] = {
    "ollama": ("Ollama (/api/*, OpenAI /v1)", OllamaSettings, FakeOllama),
    "comfyui": ("ComfyUI (/prompt, /history, websocket)", ComfyUISettings, FakeComfyUI),
    "speaches": ("speaches (OpenAI audio routes)", SpeachesSettings, FakeSpeaches),
    "whisper": ("whisper.cpp's whisper-server (/inference)", WhisperSettings, FakeWhisper),
    "mvoice": ("mVoice (TTS and STT with unload/load)", MVoiceSettings, FakeMVoice),
    "vllm": ("vLLM (OpenAI routes, sleep mode)", VLLMSettings, FakeVLLM),
}
SERVICES = ["gpu", *FAKES]
TIMING_FIELDS = ("load_s", "run_s", "free_delay_s", "wake_s", "embed_s", "pull_s")


def _ollama_models(pairs: list[str]) -> dict[str, int]:
    models = {}
    for pair in pairs:
        name, sep, mib = pair.rpartition("=")
        if not sep or not name or not mib.isdigit():
            raise SystemExit(f"mgpumanager sim: --model takes NAME=MIB (got {pair!r})")
        models[name] = int(mib)
    return models


def settings_for(ns: argparse.Namespace) -> Any:
    """The fake's settings: its defaults, with what the options change."""
    settings = FAKES[ns.service][1]()
    names = {f.name for f in dataclasses.fields(settings)}
    if ns.instant:
        settings = dataclasses.replace(
            settings, **{name: 0 for name in TIMING_FIELDS if name in names}
        )
    if ns.service == "ollama":
        if ns.model:
            settings = dataclasses.replace(settings, models=_ollama_models(ns.model))
        if ns.gpu is None:  # Ollama believes the whole card is its own
            settings = dataclasses.replace(settings, vram_budget_mib=ns.total_mib)
    elif ns.model:
        raise SystemExit("mgpumanager sim: --model is for ollama")
    return settings


def add_parser(sub: Any) -> None:
    """The `sim` subcommand, on the CLI's subparsers."""
    listed = ", ".join(f"{name}: {what}" for name, (what, _, _) in FAKES.items())
    sim = sub.add_parser(
        "sim",
        help="run one fake service (or the simulated GPU) on a port of your choice",
        description=f"One fake service or the simulated card. {listed}; gpu: the card.",
    )
    sim.add_argument("service", choices=SERVICES)
    sim.add_argument("--port", type=int, required=True, help="the port (0: any free one)")
    sim.add_argument("--host", default="127.0.0.1", help="the address (default 127.0.0.1)")
    sim.add_argument(
        "--total-mib",
        type=int,
        default=DEFAULT_TOTAL_MIB,
        help=f"the simulated card's size (gpu; or a fake's own card), default {DEFAULT_TOTAL_MIB}",
    )
    sim.add_argument(
        "--gpu",
        metavar="URL",
        help="the simulated card to allocate on (a `sim gpu`); default: a card of its own",
    )
    sim.add_argument(
        "--instant", action="store_true", help="no load or run time (the fakes' own are real-ish)"
    )
    sim.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=MIB",
        help="ollama: a model it has installed, with its size (repeatable)",
    )


@dataclasses.dataclass
class Running:
    server: RunningApp
    ledger: HttpLedger | None = None  # the shared card's client, closed last

    @property
    def url(self) -> str:
        return self.server.url

    async def aclose(self) -> None:
        await self.server.aclose()
        if self.ledger is not None:
            await self.ledger.aclose()


async def serve_one(ns: argparse.Namespace) -> Running:
    """Start the piece `ns` names; answers it running (the caller closes it)."""
    if ns.service == "gpu":
        gpu = SimGPU(ns.total_mib, "Simulated GPU")
        app = gpu_app(gpu, ActivityLog())
        return Running(await serve_app(app, host=ns.host, port=ns.port))
    ledger: GpuLedger
    sink: ActivitySink
    http = None
    if ns.gpu is None:
        own = SimGPU(ns.total_mib, "Simulated GPU")
        ledger, sink = LocalLedger(own, pid=os.getpid()), ActivityLog()
    else:
        http = HttpLedger(ns.gpu)
        ledger, sink = http, http
    fake = FAKES[ns.service][2](settings_for(ns), ledger=ledger, activity=sink)
    try:
        return Running(await serve_app(fake.app, host=ns.host, port=ns.port), http)
    except BaseException:
        if http is not None:
            await http.aclose()
        raise


async def run(ns: argparse.Namespace) -> int:
    if ns.service == "gpu" and ns.gpu is not None:
        print("mgpumanager sim: --gpu is for a fake, not for the card itself", file=sys.stderr)
        return 2
    try:
        server = await serve_one(ns)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(
            f"mgpumanager sim: {ns.service} cannot listen on {ns.host}:{ns.port}: {reason}",
            file=sys.stderr,
        )
        return 1
    if ns.service == "gpu":
        where = f"the simulated GPU ({ns.total_mib} MiB): {server.url}/v1/gpu"
    else:
        card = ns.gpu or f"a simulated card of its own ({ns.total_mib} MiB)"
        where = f"fake {ns.service} on {server.url} (memory on {card})"
    print(f"{where}; Ctrl-C stops it", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await server.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgpumanager.sim")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return asyncio.run(run(parser.parse_args(["sim", *(argv or sys.argv[1:])])))


__all__ = ["FAKES", "SERVICES", "Running", "add_parser", "main", "run", "serve_one"]
