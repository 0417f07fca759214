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


DEMO_ALIAS = "gpt-4o-mini"  # an OpenAI model name, mapped to DEMO_MODEL in config/demo.yaml


def curl_examples(base: str, comfyui_url: str | None = None) -> list[str]:
    """Commands to try, one per surface; `#` lines say what the next one shows. `comfyui_url`:
    the fake ComfyUI's own address, to show work done around the broker."""
    json_body = "-H 'Content-Type: application/json' -d"
    llm = f'{{"model": "{DEMO_MODEL}", "prompt": "Why is the sky blue?"}}'
    tts = '{"text": "Hello from the broker"}'
    graph = '{"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}}'
    chat = '[{"role": "user", "content": "Why is the sky blue?"}]'
    ollama_chat = f'{{"model": "{DEMO_MODEL}", "messages": {chat}, "stream": false}}'
    openai_chat = f'{{"model": "{DEMO_ALIAS}", "messages": {chat}}}'
    comfy = f"{base}/upstream/comfyui"
    saved = '{"3": {"class_type": "KSampler", "inputs": {"seed": 2}}, "9": {"class_type": '
    saved += '"SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "demo"}}}'
    # ComfyUI's own API: post the prompt, wait for its history to name the image, fetch it.
    comfy_round_trip = (
        f"P=$(curl -s {comfy}/prompt {json_body} '{{\"prompt\": {saved}}}' "
        '| sed -E \'s/.*"prompt_id": *"([^"]+)".*/\\1/\') && '
        f"for i in $(seq 120); do curl -s {comfy}/history/$P | grep -q filename && break; "
        "sleep 0.5; done && "
        f'F=$(curl -s {comfy}/history/$P | grep -oE \'"filename": *"[^"]+"\' '
        "| cut -d'\"' -f4) && "
        f'curl -s "{comfy}/view?filename=$F&type=output" -o comfyui.png '
        "-w '%{http_code} %{content_type} %{size_download} bytes -> comfyui.png\\n'"
    )
    examples = [
        "# the broker's own facade",
        f"curl -s {base}/v1/status",
        f"curl -sN {base}/v1/llm {json_body} '{llm}'",
        f"curl -s {base}/v1/tts {json_body} '{tts}'",
        f"curl -s {base}/v1/image {json_body} '{graph}'",
        f"curl -s {base}/v1/stt -F 'file=@/dev/null;filename=silence.wav'",
        f"curl -s {base}/metrics",
        "# Ollama's API, as the ollama CLI, Open WebUI or Home Assistant call it",
        f"curl -s {base}/api/chat {json_body} '{ollama_chat}'",
        "# OpenAI-compatible /v1, as the OpenAI SDKs call it (an alias, routed by model)",
        f"curl -s {base}/v1/chat/completions {json_body} '{openai_chat}'",
        "# ComfyUI's own API under /upstream/comfyui: prompt, wait, fetch the image",
        comfy_round_trip,
    ]
    if comfyui_url is not None:
        # A prompt posted straight to ComfyUI's own port loads FLUX there, around the broker;
        # the LLM job after it needs that room, and still succeeds: the broker sees it.
        around = (
            f"P=$(curl -s {comfyui_url}/prompt {json_body} '{graph}' "
            '| sed -E \'s/.*"prompt_id": *"([^"]+)".*/\\1/\') && '
            f"for i in $(seq 120); do curl -s {comfyui_url}/history/$P | grep -q status "
            "&& break; sleep 0.5; done && "
            f"curl -s {base}/v1/llm {json_body} '{llm}'"
        )
        examples[2:2] = [
            "# work done around the broker: a prompt straight to ComfyUI's own port, then an",
            "# LLM job that needs its room (the broker sees FLUX loaded outside and evicts it)",
            around,
        ]
    return examples


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
    lines += [
        "",
        "Point your clients at the broker:",
        f"  Ollama clients   OLLAMA_HOST={base}   (ollama CLI, Open WebUI, Home Assistant)",
        f"  OpenAI SDKs      base_url={base}/v1   (models: curl -s {base}/v1/models)",
        f"  ComfyUI clients  {base}/upstream/comfyui   (every consumer: /upstream/<name>)",
        "",
        "Try:",
    ]
    comfyui = config.consumers.get("comfyui")
    lines += curl_examples(base, comfyui.url if comfyui is not None else None)
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
