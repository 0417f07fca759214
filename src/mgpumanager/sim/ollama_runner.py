"""The fake Ollama's pieces that are not HTTP: its settings, one model runner's state as
Ollama's scheduler sees it, and `keep_alive` durations as Ollama parses them (numbers are
seconds, strings Go durations, negative forever)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mgpumanager.sim.states import ModelState

WORDS = [
    "The",
    "sky",
    "appears",
    "blue",
    "because",
    "air",
    "molecules",
    "scatter",
    "short",
    "wavelengths",
    "of",
    "sunlight",
    "more",
]
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
FOREVER_ISO = "2318-08-16T00:00:00Z"


def parse_keep_alive(value: object) -> float | None:
    """Ollama's keep_alive in seconds; None = forever (negative), 0 = unload now.

    Numbers (and numeric strings) are seconds; other strings are Go durations ("5m", "1h30m").
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            if not _DURATION_RE.fullmatch(body):
                raise ValueError(f'time: invalid duration "{value}"') from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in _PART_RE.findall(body))
    else:
        raise ValueError(f"invalid keep_alive {value!r}")
    return None if seconds < 0 else seconds


@dataclass(frozen=True)
class OllamaSettings:
    name: str = "ollama"
    owner: str = "ollama"
    models: Mapping[str, int] = field(
        default_factory=lambda: {"llama3.1:8b": 6200, "qwen2.5:14b": 10400}
    )
    load_s: float = 2.0
    run_s: float = 1.0  # one generate / chat, spread over `chunks` NDJSON lines
    embed_s: float = 0.1
    free_delay_s: float = 1.0
    chunks: int = 8
    default_keep_alive: str = "5m"
    num_parallel: int = 1
    max_queue: int = 512
    max_loaded_models: int = 3
    vram_budget_mib: int | None = None  # Ollama's own idea of the card; None = no limit
    version: str = "0.12.6"
    # What /api/pull can fetch (name -> MiB), beside what is installed; a pull's progress
    # lines are spread over pull_s.
    library: Mapping[str, int] = field(
        default_factory=lambda: {"llama3.2:3b": 2200, "nomic-embed-text:latest": 300}
    )
    pull_s: float = 2.0
    pull_steps: int = 5


class ModelRunner:
    """One model's runner, as Ollama's scheduler sees it. Mutated only on the event loop."""

    def __init__(self, name: str, size_mib: int, num_parallel: int) -> None:
        self.name = name
        self.size_mib = size_mib
        self.state = ModelState.UNLOADED
        self.in_flight = 0
        self.waiting = 0
        self.keep_alive_s: float | None = 300.0
        self.expires_at: dt.datetime | None = None
        self.last_used = 0.0
        self.unload_pending = False
        self.parallel = asyncio.Semaphore(num_parallel)
        self.expiry: asyncio.Task[None] | None = None
        self.load_task: asyncio.Task[None] | None = None
        self.free_task: asyncio.Task[None] | None = None

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def details(self) -> dict[str, Any]:
        family = self.name.split(":")[0].rstrip("0123456789.") or "llama"
        return {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": f"{self.size_mib / 700:.1f}B",
            "quantization_level": "Q4_K_M",
        }
