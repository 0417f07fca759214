"""The registry loader: every class of mistake is reported with key path and line."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import mgpumanager.registry.load as config_module
from mgpumanager.registry import AdapterType, ConfigError, load_config, parse_config, redact_url
from mgpumanager.registry.paths import demo_registry

ROOT = Path(__file__).resolve().parents[2]

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


@pytest.mark.parametrize("path", [ROOT / "config" / "consumers.yaml", demo_registry()])
def test_the_shipped_registries_load(path: Path) -> None:
    config = load_config(path)
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


# -- hostile files: each refused as problems with a line, never a traceback -----------------


def refused(raw: bytes | str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return [(p.path, p.line, p.message) for p in info.value.problems]


@pytest.mark.parametrize(
    ("raw", "line", "detail"),
    [
        (GOOD.encode("utf-16"), 1, "UTF-16"),  # with a byte-order mark
        (GOOD.encode("utf-16-le"), 1, "NUL bytes"),  # without one
        (GOOD.encode("utf-32"), 1, "UTF-32"),
        (GOOD.encode().replace(b"llm: ollama", b"llm: oll\xffama"), 2, "0xff on line 2"),
    ],
)
def test_a_registry_must_be_utf8(raw: bytes, line: int, detail: str) -> None:
    [(path, at, message)] = refused(raw)
    assert (path, at) == ("", line)
    assert "must be UTF-8" in message and detail in message


def test_a_utf8_byte_order_mark_is_fine() -> None:
    assert parse_config(GOOD.encode("utf-8-sig")).consumers.keys() == {
        "mvoice",
        "whisper",
        "ollama",
    }


def billion_laughs() -> str:
    """About 900 bytes whose aliases, inside unload.body, expand to 10**6 values."""
    levels = ["        l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n"]
    for i in range(1, 6):
        levels.append(f"        l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n")
    return GOOD.replace(
        "    priority: 3\n", "    priority: 3\n    unload:\n      path: /u\n", 1
    ).replace("      path: /u\n", "      path: /u\n      body:\n" + "".join(levels), 1)


def test_a_billion_laughs_is_refused_without_being_expanded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = billion_laughs()
    assert len(text.encode()) < 1200
    built: list[object] = []
    original = config_module._Loader.construct_document

    def spy(self: Any, node: Any) -> Any:
        built.append(node)
        return original(self, node)

    monkeypatch.setattr(config_module._Loader, "construct_document", spy)
    [(_, line, message)] = refused(text)
    assert f"more than {config_module.MAX_VALUES} values" in message
    assert line is not None and line > 10  # at the level where it outgrew the bound
    assert built == []  # refused while composing: nothing was built, let alone expanded


def test_a_few_aliases_and_merge_keys_are_fine() -> None:
    text = GOOD.replace(
        "    priority: 3\n", "    priority: 3\n    health: &probe {path: /ping, interval_s: 2}\n"
    ).replace(
        "    vram_resident_mib: 3000\n",
        "    vram_resident_mib: 3000\n    health: {<<: *probe, timeout_s: 1}\n",
    )
    config = parse_config(text)
    mvoice, whisper = config.consumers["mvoice"].health, config.consumers["whisper"].health
    assert (mvoice.path, mvoice.interval_s, mvoice.timeout_s) == ("/ping", 2, 2)
    assert (whisper.path, whisper.interval_s, whisper.timeout_s) == ("/ping", 2, 1)


def test_a_recursive_anchor_is_refused() -> None:
    [(_, line, message)] = refused(GOOD + "routing: &r {self: *r}\n")
    assert line == 19
    assert "inside its own anchor" in message


@pytest.mark.parametrize(
    "value", ["[" * 5000 + "]" * 5000, "{a: " * 5000 + "1" + "}" * 5000, "[" * 33 + "]" * 33]
)
def test_deep_nesting_is_refused(value: str) -> None:
    [(_, line, message)] = refused(GOOD + f"audio_proxy: {value}\n")
    assert line == 19
    assert f"nested deeper than {config_module.MAX_DEPTH} levels" in message


def test_nesting_grown_through_aliases_is_refused() -> None:
    deep = "[" * 20 + "]" * 20
    text = GOOD + f"a: &a {deep}\nb: [{', '.join(['*a'] * 3)}, [[[[[[[[[[[[*a]]]]]]]]]]]]]\n"
    [(_, line, message)] = refused(text)
    assert line == 20
    assert "once its aliases are expanded" in message


def test_a_registry_over_the_size_bound_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(GOOD + "# " + "x" * config_module.MAX_BYTES + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(big)
    [problem] = info.value.problems
    assert problem.line == 1 and "larger than" in problem.message


@pytest.mark.parametrize("number", ["9" * 5000, "0x" + "f" * 5000, "-" + "1" * 40])
def test_a_huge_integer_is_refused_with_its_key(number: str) -> None:
    [(path, line, message)] = refused(GOOD.replace("priority: 3", f"priority: {number}"))
    assert (path, line) == ("consumers.mvoice.priority", 8)
    assert "not a sane registry value" in message


def test_an_impossible_date_is_a_problem_not_a_crash() -> None:
    [(_, line, message)] = refused(GOOD + "audio_proxy: 2001-02-30\n")
    assert line == 19
    assert "'2001-02-30' is not a valid date" in message


def test_a_control_character_is_refused_with_its_line() -> None:
    [(_, line, message)] = refused(GOOD.replace("llm: ollama", "llm: oll\x07ama"))
    assert line == 2
    assert "#x0007" in message


def test_duplicate_keys_are_refused_with_both_lines() -> None:
    text = GOOD.replace("    priority: 3\n", "    priority: 3\n    url: http://127.0.0.1:1\n")
    [(path, line, message)] = refused(text)
    assert (path, line) == ("consumers.mvoice.url", 9)
    assert "duplicate key 'url', also on line 5" in message
    # The same text as a different YAML type is a different key: no false alarm.
    text = GOOD.replace(
        "    priority: 3\n", "    priority: 3\n    unload: {path: /u, body: {1: a, '1': b}}\n"
    )
    unload = parse_config(text).consumers["mvoice"].unload
    assert unload is not None and unload.body == {1: "a", "1": "b"}


def test_yaml_errors_never_quote_the_file() -> None:
    """A line of the registry may hold a token: the problem gives its line, not its text."""
    [(_, line, message)] = refused(GOOD + 'auth:\n  token: "s3cret-token\n')
    assert line is not None
    assert "s3cret" not in message


def test_a_mistyped_token_is_not_echoed() -> None:
    [(path, _, message)] = refused(GOOD + "auth: {token: 1234567890}\n")
    assert path == "auth.token"
    assert "1234567890" not in message


# -- paths, listen ---------------------------------------------------------------------------


def test_a_health_path_must_start_with_a_slash() -> None:
    text = GOOD.replace("    priority: 3\n", "    priority: 3\n    health: {path: no-slash}\n")
    [(path, line, message)] = refused(text)
    assert (path, line) == ("consumers.mvoice.health.path", 9)
    assert "must start with '/'" in message and "'no-slash'" in message


@pytest.mark.parametrize("action", ["unload", "load"])
def test_action_path_problems_are_at_the_path_line(action: str) -> None:
    block = f"    {action}:\n      method: POST\n      path: api/{action}\n"
    [(path, line, message)] = refused(
        GOOD.replace("    priority: 3\n", "    priority: 3\n" + block)
    )
    assert (path, line) == (f"consumers.mvoice.{action}.path", 11)
    assert "must start with '/'" in message


def test_a_path_with_spaces_is_refused() -> None:
    text = GOOD.replace("    priority: 3\n", "    priority: 3\n    paths: {tts: {path: /a b}}\n")
    [(path, _, message)] = refused(text)
    assert path == "consumers.mvoice.paths.tts.path"
    assert "no spaces" in message


@pytest.mark.parametrize("listen", ["9470", "[1, 2]", "localhost"])
def test_listen_must_be_host_port(listen: str) -> None:
    [(path, line, message)] = refused(GOOD + f"listen: {listen}\n")
    assert (path, line) == ("listen", 19)
    assert "listen must be HOST:PORT, e.g. 127.0.0.1:9470" in message


# -- auth ------------------------------------------------------------------------------------

TOKENS = """\
auth:
  tokens:
    - {name: ops, token: ops-token-1}
    - {name: batch, token: batch-token-2, max_priority: 1}
"""


def test_named_tokens_and_the_single_token_are_callers() -> None:
    config = parse_config(GOOD + TOKENS + "  token: single-token\n")
    callers = {
        caller.name: (caller.max_priority, secret) for caller, secret in config.auth.callers()
    }
    assert callers == {
        "ops": (4, b"ops-token-1"),
        "batch": (1, b"batch-token-2"),
        "default": (4, b"single-token"),
    }
    assert "ops-token-1" not in repr(config)  # secrets stay out of repr (and so of logs)


def test_token_names_and_values_are_unique() -> None:
    text = GOOD + TOKENS + "    - {name: ops, token: batch-token-2}\n  token: ops-token-1\n"
    found = refused(text)
    assert ("auth.tokens.2.name", 23, "'ops' is taken by auth.tokens.0") in found
    assert (
        "auth.tokens.2.token",
        23,
        "the same token as auth.tokens.1: each token names one caller",
    ) in found
    assert (
        "auth.tokens.0.token",
        21,
        "the same token as auth.token: each token names one caller",
    ) in found


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ("{name: ops, token: 'has space'}", "auth.tokens.0.token"),
        ("{name: ops, token: 'tøken'}", "auth.tokens.0.token"),
        ("{name: '', token: t}", "auth.tokens.0.name"),
        ("{name: 'a b', token: t}", "auth.tokens.0.name"),
        ("{name: ops, token: t, max_priority: 5}", "auth.tokens.0.max_priority"),
        ("{name: ops}", "auth.tokens.0.token"),
    ],
)
def test_a_bad_token_entry(entry: str, where: str) -> None:
    [(path, line, _)] = refused(GOOD + f"auth:\n  tokens:\n    - {entry}\n")
    assert (path, line) == (where, 21)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "[::]", "192.168.1.5", "gpu-box.lan"])
def test_listening_beyond_loopback_needs_a_token(host: str) -> None:
    [(path, line, message)] = refused(GOOD + f"listen: '{host}:8770'\n")
    assert (path, line) == ("listen", 19)
    assert "auth.token" in message and "auth.allow_unauthenticated: true" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "[::1]"])
def test_loopback_needs_no_token(host: str) -> None:
    assert parse_config(GOOD + f"listen: '{host}:8770'\n").listen_host_port[1] == 8770


@pytest.mark.parametrize(
    "auth", ["auth: {token: t0ken}\n", TOKENS, "auth: {allow_unauthenticated: true}\n"]
)
def test_beyond_loopback_with_a_token_or_on_purpose(auth: str) -> None:
    assert parse_config(GOOD + "listen: 0.0.0.0:8770\n" + auth).listen == "0.0.0.0:8770"


# -- credentials in URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://ops:pw@host:8080/x", "http://***@host:8080/x"),
        ("http://token@host", "http://***@host"),
        ("https://a@b:c@host", "https://***@host"),
        ("http://host:8080", "http://host:8080"),
        ("http://u:p@[::1", "http://***@[::1"),  # not parseable: still redacted
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_bad_url_problem_does_not_show_its_password() -> None:
    [(path, _, message)] = refused(GOOD.replace("http://127.0.0.1:8765", "ftp://ops:pw@h:1"))
    assert path == "consumers.mvoice.url"
    assert "pw" not in message and "***@h:1" in message


# -- the CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        GOOD.encode("utf-16"),
        GOOD.encode("utf-16-le"),
        b"\xff\xfe\xfa" + GOOD.encode(),
        (GOOD + "routing: &r {self: *r}\n").encode(),
        (GOOD + "audio_proxy: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
        GOOD.replace("priority: 3", "priority: " + "9" * 5000).encode(),
        billion_laughs().encode(),
        (GOOD + "listen: 9470\n").encode(),
    ],
    ids=["utf16", "utf16-nobom", "latin1", "recursive", "deep", "bigint", "laughs", "listen"],
)
def test_check_config_lists_hostile_files_without_a_traceback(tmp_path: Path, raw: bytes) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(raw)
    run = subprocess.run(
        [sys.executable, "-m", "mgpumanager.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert re.search(r"\(line \d+\): ", run.stderr), run.stderr


def test_problems_of_the_walk_and_of_construction_are_listed_together() -> None:
    text = GOOD.replace("priority: 3", "priority: 3\n    priority: 2") + "audio_proxy: 2001-02-30\n"
    found = refused(text)
    assert [(path, line) for path, line, _ in found] == [("consumers.mvoice.priority", 9), ("", 20)]
