"""The adapter registry: every `type:` has an adapter, and the registry's `unload:` / `load:`
keys are either honoured by that type or refused by check-config, never silently ignored."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from mgpumanager.registry import (
    HONOURED_ACTIONS,
    AdapterType,
    ConfigError,
    ConsumerConfig,
    parse_config,
)
from mgpumanager.upstreams.adapters import ADAPTERS, make_adapter

HONOURED = {
    AdapterType.GENERIC: {"unload", "load"},
    AdapterType.OLLAMA: set(),
    AdapterType.COMFYUI: {"unload"},
    AdapterType.SPEACHES: set(),
    AdapterType.COMMAND: {"unload", "load"},
    AdapterType.VLLM: {"unload", "load"},
    AdapterType.DOCKER: set(),  # stopping and starting its container
}


def registry(kind: AdapterType, **keys: Any) -> str:
    lines = [
        "gpu: {backend: static, total_mib: 24000}",
        "consumers:",
        "  x:",
        f"    type: {kind}",
        "    url: http://127.0.0.1:9",
        "    vram_resident_mib: 1000",
    ]
    lines += [f"    {key}: {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def action(kind: AdapterType) -> str:
    return "{command: [/bin/true]}" if kind is AdapterType.COMMAND else "{path: /x}"


def test_every_type_has_an_adapter() -> None:
    assert set(ADAPTERS) == set(AdapterType) == set(HONOURED)


@pytest.mark.parametrize("kind", list(AdapterType))
@pytest.mark.parametrize("key", ["unload", "load"])
def test_an_action_key_is_honoured_or_refused(kind: AdapterType, key: str) -> None:
    keys = {key: action(kind)}
    if kind is AdapterType.COMMAND and key == "unload":
        keys["load"] = action(kind)  # a command consumer that is stopped must be startable
    if kind is AdapterType.DOCKER:
        keys["container"] = "c"
    text = registry(kind, **keys)
    if key in HONOURED[kind]:
        assert HONOURED_ACTIONS[kind] == HONOURED[kind]
        parse_config(text)  # accepted
    else:
        with pytest.raises(ConfigError) as caught:
            parse_config(text)
        [problem] = caught.value.problems
        assert problem.path == f"consumers.x.{key}"
        assert problem.line == 7
        assert f"not applicable to type {kind}" in problem.message


async def test_a_partial_health_section_keeps_the_types_default_path() -> None:
    """`health: {interval_s: 2}` on Ollama still probes /api/version (its own liveness call)."""
    config = ConsumerConfig.model_validate(
        {
            "type": "ollama",
            "url": "http://127.0.0.1:9",
            "vram_resident_mib": 1000,
            "health": {"interval_s": 2},
        }
    )
    async with aiohttp.ClientSession() as session:
        adapter = make_adapter("o", config, session)
    assert adapter.health_config.path == "/api/version"
    assert adapter.health_config.interval_s == 2


GPU_ROUTES: dict[AdapterType, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
    # type: (routes of its own API that are GPU jobs, routes that are not)
    AdapterType.OLLAMA: (
        [("POST", "/api/chat"), ("POST", "/api/embed"), ("POST", "/v1/chat/completions")],
        [("POST", "/api/pull"), ("GET", "/api/tags"), ("POST", "/api/show"), ("GET", "/")],
    ),
    AdapterType.COMFYUI: (
        [("POST", "/prompt"), ("POST", "/api/prompt")],
        [("GET", "/prompt"), ("GET", "/view"), ("POST", "/upload/image"), ("GET", "/ws")],
    ),
    AdapterType.SPEACHES: (
        [("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/speech")],
        [("GET", "/v1/models"), ("DELETE", "/api/ps/m")],
    ),
    AdapterType.VLLM: (
        [("POST", "/v1/completions"), ("POST", "/v1/chat/completions")],
        [("POST", "/sleep"), ("GET", "/is_sleeping"), ("GET", "/metrics")],
    ),
    AdapterType.GENERIC: (
        [("POST", "/speak"), ("PUT", "/render")],
        [("GET", "/speak"), ("POST", "/v1/chat/completions"), ("GET", "/audio/x.wav")],
    ),
}


@pytest.mark.parametrize("kind", list(GPU_ROUTES))
async def test_which_routes_of_a_consumers_own_api_are_gpu_work(kind: AdapterType) -> None:
    config = ConsumerConfig.model_validate(
        {
            "type": kind,
            "url": "http://127.0.0.1:9",
            "vram_resident_mib": 1000,
            "paths": {"tts": {"path": "/speak"}} if kind is AdapterType.GENERIC else {},
            "scheduled": [{"method": "PUT", "path": "/render"}],
        }
    )
    gpu, other = GPU_ROUTES[kind]
    async with aiohttp.ClientSession() as session:
        adapter = make_adapter("x", config, session)
    assert [r for r in gpu if not adapter.uses_gpu(*r)] == []
    assert [r for r in other if adapter.uses_gpu(*r)] == []


async def test_a_generic_consumer_that_serves_openai_routes() -> None:
    config = ConsumerConfig.model_validate(
        {"url": "http://127.0.0.1:9", "vram_resident_mib": 1000, "openai": True}
    )
    async with aiohttp.ClientSession() as session:
        adapter = make_adapter("tts", config, session)
    assert adapter.uses_gpu("POST", "/v1/audio/speech")
    assert adapter.names_model("POST", "/v1/audio/speech")
    assert not adapter.uses_gpu("GET", "/v1/models")
    assert str(adapter.dialect) == "openai"
