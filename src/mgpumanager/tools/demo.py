"""`mgpumanager demo`: a simulated 24 GiB GPU, fake Ollama / ComfyUI / mVoice / whisper.cpp /
speaches servers that speak the real protocols, and the broker in front of them — no GPU
needed.

The fakes listen where the demo's registry (`demo.yaml`, package data) says; whisper starts
stopped, like a service the broker will start on the first transcription (its `load.command`).
`--port N` moves the whole demo: the broker to N and every other piece by the same distance
(the simulated GPU to N+29, the fakes to N+31..N+35 with the shipped registry); `--port 0`
gives every piece a free port, and the banner names them. A port that is taken is one line
naming the piece and the flag.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from mgpumanager.broker import Broker
from mgpumanager.daemon import Server, StartupError, start_server
from mgpumanager.registry import Action, AdapterType, Config, load_config, parse_config, redact_url
from mgpumanager.sim.cluster import BindError, FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.sim.speaches import SpeachesSettings
from mgpumanager.sim.whisper import WhisperSettings

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
        speaches=_speaches(config),
    )


def _speaches(config: Config) -> SpeachesSettings | None:
    """The fake speaches with the registry's models and sizes (OpenAI's audio routes)."""
    c = config.consumers.get("speaches")
    if c is None:
        return None
    models = {m.name: m.vram_mib or c.vram_resident_mib for m in c.models}
    return SpeachesSettings(models=models or SpeachesSettings().models, load_s=0.8, run_s=0.4)


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


DEMO_ALIAS = "gpt-4o-mini"  # an OpenAI model name, mapped to DEMO_MODEL in demo.yaml


def curl_examples(
    base: str, comfyui_url: str | None = None, *, with_audio: bool = False
) -> list[str]:
    """Commands to try, one per surface; `#` lines say what the next one shows. `comfyui_url`:
    the fake ComfyUI's own address, to show work done around the broker; `with_audio`: a
    consumer serves OpenAI's audio routes."""
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
    if with_audio:
        speech = '{"model": "tts-1", "input": "Hello from the broker", "voice": "af_heart"}'
        examples += [
            "# OpenAI's audio routes (speaches): voices, speech, a transcription",
            f"curl -s {base}/v1/audio/voices",
            f"curl -s {base}/v1/audio/speech {json_body} '{speech}' -o speech.wav "
            "-w '%{http_code} %{content_type} %{size_download} bytes -> speech.wav\\n'",
            f"curl -s {base}/v1/audio/transcriptions -F model=whisper-1 "
            "-F 'file=@/dev/null;filename=silence.wav'",
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
        f"  sim GPU     {cluster.gpu_url}/v1/gpu   ({_cards(cluster)})",
    ]
    for name, c in config.consumers.items():
        lines.append(f"  {name:<11} {redact_url(c.url)}   ({c.type}, {c.vram_resident_mib} MiB)")
    lines += [
        "",
        "Point your clients at the broker:",
        f"  Ollama clients   OLLAMA_HOST={base}   (ollama CLI, Open WebUI, Home Assistant)",
        f"  OpenAI SDKs      base_url={base}/v1   (models: curl -s {base}/v1/models)",
        f"  OpenAI audio     base_url={base}/v1   (Open WebUI's audio: tts-1, whisper-1)",
        f"  ComfyUI clients  {base}/upstream/comfyui   (every consumer: /upstream/<name>)",
        "",
        "Try:",
    ]
    comfyui = config.consumers.get("comfyui")
    with_audio = any(c.type is AdapterType.SPEACHES for c in config.consumers.values())
    lines += curl_examples(
        base, comfyui.url if comfyui is not None else None, with_audio=with_audio
    )
    lines += ["", "Ctrl-C stops everything.", ""]
    return "\n".join(lines)


def _cards(cluster: SimCluster) -> str:
    if len(cluster.cards) == 1:
        return f"{cluster.gpu.total_mib} MiB"
    return f"{len(cluster.cards)} cards of {cluster.gpu.total_mib} MiB"


PIECES = {"gpu": "the simulated GPU"}  # any other piece is a fake consumer of that name


def demo_ports(config: Config, port: int | None) -> dict[str, int]:
    """Where each piece listens: `broker`, `gpu` and every consumer. None: where the registry
    says; N: the broker at N and each piece as far from it as in the registry; 0: any."""
    _, registry_port = config.listen_host_port
    ports = {name: _port(c.url) for name, c in config.consumers.items()}
    ports["gpu"] = _port(config.gpu.sim_url)
    ports["broker"] = registry_port
    if port is None:
        return ports
    if port == 0:
        return dict.fromkeys(ports, 0)
    moved = {name: p - registry_port + port for name, p in ports.items()}
    if not all(0 < p <= 65535 for p in moved.values()):
        raise StartupError(f"demo: --port {port} puts a piece past port 65535; choose a lower N")
    return moved


def _spare_port(host: str) -> int:
    """A free port for a `command` consumer, whose process the broker starts later and must
    know its URL now: bound and released at once (the one port the demo names before its
    process exists)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _moved(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


def relocated(config: Config, urls: Mapping[str, str], broker_port: int, run_dir: Path) -> Config:
    """The registry with the broker on `broker_port` and every piece at its URL in `urls`
    (`gpu` and the consumers'). A `command` consumer's argv follows: its `--port`, a URL of
    another piece, and its `--pidfile` (moved into `run_dir`, so two demos never share one)."""
    old_urls = {c.url: urls[name] for name, c in config.consumers.items()}
    old_urls[config.gpu.sim_url] = urls["gpu"]

    def argv(name: str, command: list[str]) -> list[str]:
        out: list[str] = []
        for i, token in enumerate(command):
            flag = command[i - 1] if i else ""
            if flag == "--port" and token == str(_port(config.consumers[name].url)):
                token = str(_port(urls[name]))
            elif flag == "--pidfile":
                token = str(run_dir / f"{name}.pid")
            out.append(old_urls.get(token, token))
        return out

    def action(name: str, act: Action | None) -> Action | None:
        if act is None or act.command is None:
            return act
        return act.model_copy(update={"command": argv(name, act.command)})

    consumers = {
        name: c.model_copy(
            update={
                "url": urls[name],
                "load": action(name, c.load),
                "unload": action(name, c.unload),
            }
        )
        for name, c in config.consumers.items()
    }
    host, _ = config.listen_host_port
    return config.model_copy(
        update={
            "listen": f"[{host}]:{broker_port}" if ":" in host else f"{host}:{broker_port}",
            "gpu": config.gpu.model_copy(update={"sim_url": urls["gpu"]}),
            "consumers": consumers,
        }
    )


# Where the demo puts each fake on a box of several cards, unless the registry binds it: the
# chat model on the first card, images on the second, speech with the chat model (whisper's
# own process allocates through the GPU server, on the first card).
DEMO_PLACEMENT = {"ollama": 0, "comfyui": 1, "mvoice": 0, "whisper": 0, "speaches": 1}


def demo_placement(config: Config, gpus: int) -> dict[str, int]:
    """The card each consumer's fake allocates on: the first index its `devices:` names, else
    DEMO_PLACEMENT (wrapped to the cards there are), else the first card."""
    out = {}
    for name, c in config.consumers.items():
        first = next((d for d in c.devices or () if isinstance(d, int)), None)
        out[name] = first if first is not None else DEMO_PLACEMENT.get(name, 0)
        out[name] %= gpus
    return out


def bound_to(config: Config, placement: Mapping[str, int]) -> Config:
    """Consumers that declare no `devices:` bound to the card their fake is on."""
    consumers = {
        name: c if c.devices is not None else c.model_copy(update={"devices": [placement[name]]})
        for name, c in config.consumers.items()
    }
    return config.model_copy(update={"consumers": consumers})


async def run_demo(config_path: Path, port: int | None = None, gpus: int = 1) -> int:
    config = load_config(config_path)
    placement = demo_placement(config, gpus)
    if gpus > 1:
        config = bound_to(config, placement)
    # The registry's commands say `python`: make that the interpreter running the demo.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    ports = demo_ports(config, port)
    host = urlsplit(config.gpu.sim_url).hostname or "127.0.0.1"
    commands = [n for n, c in config.consumers.items() if c.type is AdapterType.COMMAND]
    in_process = {n: p for n, p in ports.items() if n != "broker" and n not in commands}
    flag = "start the demo with --port N (it moves every piece), or --port 0 for free ports"
    try:
        cluster = await start_cluster(
            host=host, ports=in_process, spec=demo_spec(config), gpus=gpus, devices=placement
        )
    except BindError as exc:
        what = PIECES.get(exc.piece, f"the fake {exc.piece}")
        reason = os.strerror(exc.errno) if exc.errno else exc.strerror
        raise StartupError(
            f"demo: {what} cannot listen on {exc.host}:{exc.port}: {reason}; {flag}"
        ) from None
    server: Server | None = None
    try:
        if port is not None:
            urls = {**cluster.urls, "gpu": cluster.gpu_url}
            for name in commands:
                spare = ports[name] or _spare_port(host)
                urls[name] = _moved(config.consumers[name].url, spare)
            config = relocated(config, urls, ports["broker"], cluster.run_dir)
        try:
            server = await start_server(Broker(config))
        except OSError as exc:
            raise StartupError(
                f"demo: the broker cannot listen on {config.listen}: "
                f"{os.strerror(exc.errno) if exc.errno else exc}; {flag}"
            ) from None
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


__all__ = [
    "curl_examples",
    "demo_ports",
    "demo_spec",
    "ephemeral_registry",
    "ephemeral_spec",
    "relocated",
    "run_demo",
]
