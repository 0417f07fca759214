"""A simulated GPU and fake inference services that speak the real upstreams' protocols.

Part of the product: ``make demo``, the test suite and the benchmarks run on it, and a user can
try a registry on it before pointing it at a real card. ``docs/upstreams.md`` describes the
behaviour of the real services that each fake mimics.

- :mod:`~mgpumanager.sim.gpu`: the ledger (``SimGPU``), its HTTP face (``gpu_app``), and the
  ``GpuLedger`` seam the fakes allocate through (``LocalLedger``, ``HttpLedger``).
- :mod:`~mgpumanager.sim.activity`: who ran GPU work when, measured at the fakes.
- fakes: ``FakeMVoice``, ``FakeOllama``, ``FakeComfyUI``, ``FakeWhisper``, ``FakeSpeaches``,
  ``FakeVLLM``, each an aiohttp app (``fake.app``) built from a frozen settings object.
- :mod:`~mgpumanager.sim.cluster`: ``start_cluster`` runs a GPU and a set of fakes on loopback.
- :mod:`~mgpumanager.sim.launcher`: ``systemctl``-like start/stop of a detached process.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mgpumanager.sim.activity import ActivityLog, ActivitySink, Interval, recording
    from mgpumanager.sim.cluster import FakeSpec, SimCluster, WhisperProcess, start_cluster
    from mgpumanager.sim.comfyui import ComfyUISettings, FakeComfyUI
    from mgpumanager.sim.gpu import (
        CudaOutOfMemory,
        GpuEvent,
        GpuEventKind,
        GpuLedger,
        GpuMemory,
        GpuMemoryView,
        HttpLedger,
        LedgerError,
        LocalLedger,
        SimGPU,
        gpu_app,
    )
    from mgpumanager.sim.mvoice import FakeMVoice, MVoiceSettings
    from mgpumanager.sim.ollama import FakeOllama, OllamaSettings, parse_keep_alive
    from mgpumanager.sim.server import RunningApp, serve_app, serving, wait_until
    from mgpumanager.sim.speaches import FakeSpeaches, SpeachesSettings
    from mgpumanager.sim.states import ModelState
    from mgpumanager.sim.vllm import FakeVLLM, VLLMSettings
    from mgpumanager.sim.whisper import FakeWhisper, WhisperSettings

# Lazy re-exports (PEP 562): `python -m mgpumanager.sim.whisper` / `.launcher` must not find
# their own module already imported by this package (runpy warns, and the process would pay
# for importing every fake).
_EXPORTS: dict[str, str] = {
    "ActivityLog": "mgpumanager.sim.activity",
    "ActivitySink": "mgpumanager.sim.activity",
    "ComfyUISettings": "mgpumanager.sim.comfyui",
    "CudaOutOfMemory": "mgpumanager.sim.gpu",
    "FakeComfyUI": "mgpumanager.sim.comfyui",
    "FakeMVoice": "mgpumanager.sim.mvoice",
    "FakeOllama": "mgpumanager.sim.ollama",
    "FakeSpeaches": "mgpumanager.sim.speaches",
    "FakeSpec": "mgpumanager.sim.cluster",
    "FakeVLLM": "mgpumanager.sim.vllm",
    "FakeWhisper": "mgpumanager.sim.whisper",
    "GpuEvent": "mgpumanager.sim.gpu",
    "GpuEventKind": "mgpumanager.sim.gpu",
    "GpuLedger": "mgpumanager.sim.gpu",
    "GpuMemory": "mgpumanager.sim.gpu",
    "GpuMemoryView": "mgpumanager.sim.gpu",
    "HttpLedger": "mgpumanager.sim.gpu",
    "Interval": "mgpumanager.sim.activity",
    "LedgerError": "mgpumanager.sim.gpu",
    "LocalLedger": "mgpumanager.sim.gpu",
    "MVoiceSettings": "mgpumanager.sim.mvoice",
    "ModelState": "mgpumanager.sim.states",
    "OllamaSettings": "mgpumanager.sim.ollama",
    "RunningApp": "mgpumanager.sim.server",
    "SimCluster": "mgpumanager.sim.cluster",
    "SimGPU": "mgpumanager.sim.gpu",
    "SpeachesSettings": "mgpumanager.sim.speaches",
    "VLLMSettings": "mgpumanager.sim.vllm",
    "WhisperProcess": "mgpumanager.sim.cluster",
    "WhisperSettings": "mgpumanager.sim.whisper",
    "gpu_app": "mgpumanager.sim.gpu",
    "parse_keep_alive": "mgpumanager.sim.ollama",
    "recording": "mgpumanager.sim.activity",
    "serve_app": "mgpumanager.sim.server",
    "serving": "mgpumanager.sim.server",
    "start_cluster": "mgpumanager.sim.cluster",
    "wait_until": "mgpumanager.sim.server",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ActivityLog",
    "ActivitySink",
    "ComfyUISettings",
    "CudaOutOfMemory",
    "FakeComfyUI",
    "FakeMVoice",
    "FakeOllama",
    "FakeSpeaches",
    "FakeSpec",
    "FakeVLLM",
    "FakeWhisper",
    "GpuEvent",
    "GpuEventKind",
    "GpuLedger",
    "GpuMemory",
    "GpuMemoryView",
    "HttpLedger",
    "Interval",
    "LedgerError",
    "LocalLedger",
    "MVoiceSettings",
    "ModelState",
    "OllamaSettings",
    "RunningApp",
    "SimCluster",
    "SimGPU",
    "SpeachesSettings",
    "VLLMSettings",
    "WhisperProcess",
    "WhisperSettings",
    "gpu_app",
    "parse_keep_alive",
    "recording",
    "serve_app",
    "serving",
    "start_cluster",
    "wait_until",
]
