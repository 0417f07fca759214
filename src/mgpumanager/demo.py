"""`mgpumanager demo`: a simulated 24 GiB GPU, fake Ollama / ComfyUI / mVoice / whisper.cpp
servers that speak the real protocols, and the broker in front of them — no GPU needed.

The fakes listen where `config/demo.yaml` says; whisper starts stopped, like a service the
broker will start on the first transcription (its `load.command`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .app import Server, start_server
from .broker import Broker
from .config import AdapterType, Config, load_config, parse_config, redact_url
from .sim.cluster import FakeSpec, SimCluster, start_cluster
from .sim.comfyui import ComfyUISettings
from .sim.mvoice import MVoiceSettings
from .sim.ollama import OllamaSettings
from .sim.whisper import WhisperSettings

DEMO_MODEL = "qwen2.5:14b"


def _port(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"the demo needs explicit ports, got {url!r}")
    return port


def demo_spec(config: Config) -> FakeSpec:
    """Fakes sized as the registry declares them, with timings scaled from real ones."""
    c = config.consumers
    return FakeSpec(
        mvoice=MVoiceSettings(
            vram_mib=c["mvoice"].vram_resident_mib, load_s=1.0, run_s=0.3, free_delay_s=0.5
        ),
        ollama=OllamaSettings(
            models={DEMO_MODEL: c["ollama"].vram_resident_mib},
            load_s=1.5,
            run_s=1.2,
            free_delay_s=0.8,
            chunks=12,
        ),
        comfyui=ComfyUISettings(
            model_mib=c["comfyui"].vram_resident_mib - 300,
            ctx_mib=300,
            load_s=2.0,
            run_s=3.0,
            free_delay_s=0.5,
        ),
        whisper=None,  # a process of its own, started and stopped by the broker's commands
    )


def ephemeral_spec(config: Config) -> FakeSpec:
    """`demo_spec`, with whisper started by the cluster as a process of its own (its pidfile in
    the cluster's directory, not the demo's fixed one)."""
    whisper = WhisperSettings(
        model_mib=config.consumers["whisper"].vram_resident_mib, load_s=0.5, run_s=0.4
    )
    return dataclasses.replace(demo_spec(config), whisper=whisper, whisper_subprocess=True)


def ephemeral_registry(path: Path, cluster: SimCluster, **top: Any) -> Config:
    """The demo's registry at `path`, pointed at `cluster` (started on any free ports, with
    `ephemeral_spec`) and listening on port 0: the stack of `make demo` for tests and
    benchmarks, which must never take the demo's fixed ports. `top`: keys to replace (auth)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["listen"] = "127.0.0.1:0"
    data["gpu"]["sim_url"] = cluster.gpu_url
    for name, consumer in data["consumers"].items():
        consumer["url"] = cluster.urls[name]
        if consumer.get("type") == "command" and cluster.whisper_process is not None:
            consumer["load"]["command"] = cluster.whisper_process.start_argv
            consumer["unload"]["command"] = cluster.whisper_process.stop_argv
    data.update(top)
    return parse_config(yaml.safe_dump(data), str(path))


def curl_examples(base: str) -> list[str]:
    json_body = "-H 'Content-Type: application/json' -d"
    llm = f'{{"model": "{DEMO_MODEL}", "prompt": "Why is the sky blue?"}}'
    tts = '{"text": "Hello from the broker"}'
    graph = '{"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}}'
    return [
        f"curl -s {base}/v1/status",
        f"curl -sN {base}/v1/llm {json_body} '{llm}'",
        f"curl -s {base}/v1/tts {json_body} '{tts}'",
        f"curl -s {base}/v1/image {json_body} '{graph}'",
        f"curl -s {base}/v1/stt -F 'file=@/dev/null;filename=silence.wav'",
        f"curl -s {base}/metrics",
    ]


def banner(server: Server, cluster: SimCluster, config: Config) -> str:
    base = server.url
    lines = [
        "",
        "mgpumanager demo — simulated GPU, fake consumers, the broker",
        f"  broker      {base}   (status: {base}/v1/status, metrics: {base}/metrics)",
        f"  dashboard   {base}/ui/   (or `mgpumanager status --watch --url {base}`)",
        f"  sim GPU     {cluster.gpu_url}/v1/gpu   ({cluster.gpu.total_mib} MiB)",
    ]
    for name, c in config.consumers.items():
        lines.append(f"  {name:<11} {redact_url(c.url)}   ({c.type}, {c.vram_resident_mib} MiB)")
    lines += ["", "Try:"]
    lines += curl_examples(base)
    lines += ["", "Ctrl-C stops everything.", ""]
    return "\n".join(lines)


async def run_demo(config_path: Path) -> int:
    config = load_config(config_path)
    # The registry's commands say `python`: make that the interpreter running the demo.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    ports = {name: _port(c.url) for name, c in config.consumers.items()}
    ports["gpu"] = _port(config.gpu.sim_url)
    cluster = await start_cluster(ports=ports, spec=demo_spec(config))
    server: Server | None = None
    try:
        server = await start_server(Broker(config))
        print(banner(server, cluster, config), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if server is not None:
            await server.stop()
        await _stop_command_consumers(config)
        await cluster.aclose()
    return 0


async def _stop_command_consumers(config: Config) -> None:
    """Leave no process behind: run the unload command of every `command` consumer. Not a
    blocking subprocess.run: the stopping process releases its memory through the simulated
    GPU served by this very event loop."""
    for c in config.consumers.values():
        if c.type is AdapterType.COMMAND and c.unload is not None and c.unload.command:
            proc = await asyncio.create_subprocess_exec(*c.unload.command)
            try:
                async with asyncio.timeout(c.unload.timeout_s):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


__all__ = ["curl_examples", "demo_spec", "ephemeral_registry", "ephemeral_spec", "run_demo"]
