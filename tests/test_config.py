"""The registry loader: every class of mistake is reported with key path and line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mgpumanager.config import AdapterType, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
gpu: {backend: static, total_mib: 24576}
routing: {tts: mvoice, llm: ollama}
consumers:
  mvoice:
    url: http://127.0.0.1:8765
    vram_resident_mib: 6000
    can_coexist_with: [whisper]
    priority: 3
  whisper:
    type: command
    url: http://127.0.0.1:8080
    vram_resident_mib: 3000
    unload: {command: [systemctl, stop, whisper-server]}
    load: {command: [systemctl, start, whisper-server]}
  ollama:
    type: ollama
    url: http://127.0.0.1:11434
    vram_resident_mib: 14000
"""


def problems(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text))
    return [(p.path, p.line, p.message) for p in info.value.problems]


def test_a_good_registry_loads_with_defaults() -> None:
    config = parse_config(GOOD)
    assert config.listen == "127.0.0.1:8770"
    assert config.max_body_mib == 256
    assert config.scheduler.max_queue == 256
    assert config.consumers["whisper"].type is AdapterType.COMMAND
    assert config.consumers["mvoice"].health.interval_s == 5.0
    assert config.coexist("whisper", "mvoice")  # symmetric: only mvoice lists whisper
    assert not config.coexist("ollama", "mvoice")


@pytest.mark.parametrize("name", ["consumers.yaml", "demo.yaml"])
def test_the_shipped_registries_load(name: str) -> None:
    config = load_config(ROOT / "config" / name)
    assert config.consumers


def test_unknown_key_is_a_typo() -> None:
    [(path, line, message)] = problems(GOOD.replace("priority: 3", "priorty: 3"))
    assert (path, line) == ("consumers.mvoice.priorty", 8)
    assert "unknown key" in message


def test_wrong_type() -> None:
    [(path, line, message)] = problems(
        GOOD.replace("vram_resident_mib: 6000", "vram_resident_mib: lots")
    )
    assert (path, line) == ("consumers.mvoice.vram_resident_mib", 6)
    assert "integer" in message and "'lots'" in message


def test_routing_to_a_missing_consumer() -> None:
    [(path, line, message)] = problems(GOOD.replace("llm: ollama", "llm: olama"))
    assert (path, line) == ("routing.llm", 2)
    assert "'olama'" in message


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1:1", "http://", "127.0.0.1:8765", "http://h:99999", "http://h/?q=1"]
)
def test_bad_url(url: str) -> None:
    [(path, line, message)] = problems(GOOD.replace("http://127.0.0.1:8765", url))
    assert (path, line) == ("consumers.mvoice.url", 5)
    assert message.startswith("bad_consumer_url")


def test_consumer_bigger_than_the_gpu() -> None:
    [(path, line, message)] = problems(GOOD.replace("14000", "24500"))
    assert (path, line) == ("consumers.ollama.vram_resident_mib", 18)
    assert "cannot fit" in message


def test_coexistence_with_an_unknown_name() -> None:
    [(path, line, message)] = problems(GOOD.replace("[whisper]", "[whisper, furbotto]"))
    assert (path, line) == ("consumers.mvoice.can_coexist_with.1", 7)
    assert "'furbotto'" in message


@pytest.mark.parametrize("priority", ["-1", "5"])
def test_priority_outside_0_to_4(priority: str) -> None:
    [(path, line, _)] = problems(GOOD.replace("priority: 3", f"priority: {priority}"))
    assert (path, line) == ("consumers.mvoice.priority", 8)


def test_every_problem_is_listed_at_once() -> None:
    found = problems(
        GOOD.replace("priority: 3", "priority: 9")
        .replace("llm: ollama", "llm: nobody")
        .replace("http://127.0.0.1:11434", "not a url")
        .replace("vram_resident_mib: 3000", "vram_resident_mib: -1")
    )
    assert {p for p, _, _ in found} == {
        "consumers.mvoice.priority",
        "routing.llm",
        "consumers.ollama.url",
        "consumers.whisper.vram_resident_mib",
    }


def test_command_actions_need_the_command_type() -> None:
    text = GOOD.replace("type: command", "type: generic")
    found = problems(text)
    assert ("consumers.whisper.unload.command", 13, "'command' actions need type: command") in found


def test_not_yaml_and_not_a_mapping() -> None:
    [(_, line, message)] = problems("consumers: [\n")
    assert "not valid YAML" in message and line is not None
    [(_, _, message)] = problems("- just\n- a list\n")
    assert "mapping" in message


def test_check_config_cli_lists_problems_and_exits_non_zero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("priority: 3", "priorty: 3").replace("llm: ollama", "llm: x"))
    run = subprocess.run(
        [sys.executable, "-m", "mgpumanager.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert "consumers.mvoice.priorty (line 8): unknown key" in run.stderr
    assert "routing.llm (line 2)" in run.stderr
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    run = subprocess.run(
        [sys.executable, "-m", "mgpumanager.cli", "check-config", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "OK" in run.stdout


def test_serve_refuses_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("priority: 3", "priority: 7"))
    run = subprocess.run(
        [sys.executable, "-m", "mgpumanager.cli", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert run.returncode == 2
    assert "consumers.mvoice.priority (line 8)" in run.stderr


def test_the_example_registry_shows_every_adapter() -> None:
    """The commented-out consumers at the end of consumers.yaml (speaches, vllm) are valid
    registry text too: uncommented, the file still loads, and every adapter type appears."""
    text = (ROOT / "config" / "consumers.yaml").read_text()
    head, marker, tail = text.partition("  # Further adapters")
    assert marker, "the example lost its block of further adapters"
    body = "\n".join(
        line.replace("  # ", "  ", 1) for line in tail.splitlines()[1:] if line.strip() != "#"
    )
    config = parse_config(head + body + "\n")
    assert {c.type for c in config.consumers.values()} == set(AdapterType)


def test_a_command_consumer_that_can_be_stopped_must_be_startable() -> None:
    text = GOOD.replace("    load: {command: [systemctl, start, whisper-server]}\n", "")
    [(path, line, message)] = problems(text)
    assert (path, line) == ("consumers.whisper.unload", 13)
    assert "needs a load" in message
