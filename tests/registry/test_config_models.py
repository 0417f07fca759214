"""Registry keys for models, aliases, the OpenAI surface and idle handling."""

from __future__ import annotations

import pytest

from mgpumanager.registry import ConfigError, parse_config

BASE = """
gpu: {backend: static, total_mib: 24000}
consumers:
  ollama:
    type: ollama
    url: http://127.0.0.1:11434
    vram_resident_mib: 14000
"""


def test_models_may_be_plain_names_or_mappings() -> None:
    config = parse_config(
        BASE
        + """    models:
      - qwen2.5:14b
      - {name: nomic-embed-text, vram_mib: 600}
      - {name: llama3:8b, vram_mib: 6000, preload: true}
    aliases: {gpt-4o-mini: qwen2.5:14b}
  tts:
    url: http://127.0.0.1:9000
    vram_resident_mib: 2000
    idle_unload_s: 1800
idle:
  warm: [ollama/llama3:8b]
  warm_after_s: 45
"""
    )
    c = config.consumers["ollama"]
    assert [(m.name, m.vram_mib, m.preload) for m in c.models] == [
        ("qwen2.5:14b", None, True),  # a plain name: loaded by its load call, as before
        ("nomic-embed-text", 600, False),
        ("llama3:8b", 6000, True),
    ]
    assert c.preload_models == ["qwen2.5:14b", "llama3:8b"]
    entry = c.model_entry("gpt-4o-mini")
    assert entry is not None and entry.name == "qwen2.5:14b"
    assert config.consumers["tts"].idle_unload_s == 1800
    assert config.idle.warm == ["ollama/llama3:8b"] and config.idle.warm_after_s == 45


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ("    models: [a, a]\n", "consumers.ollama.models", "listed twice"),
        ("    models: [a]\n    aliases: {gpt: b}\n", "consumers.ollama.aliases.gpt", "'b'"),
        ("    models: [{vram_mib: 3}]\n", "consumers.ollama.models.0.name", "missing"),
        ("idle: {warm: [nobody]}\n", "idle.warm.0", "not a consumer"),
        ("    models: [a]\nidle: {warm: [ollama/b]}\n", "idle.warm.0", "not one of"),
        ("    idle_unload_s: 0\n", "consumers.ollama.idle_unload_s", "greater than 0"),
        ("    idle_unload_s: 60\nidle: {warm: [ollama]}\n", "idle.warm.0", "warm it or unload it"),
    ],
)
def test_bad_model_keys_are_refused_with_their_path(extra: str, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + extra)
    assert any(p.path == path and words in p.message for p in caught.value.problems), str(
        caught.value
    )
