"""The rules of the browser guard, as pure functions: which Host names a listener answers to,
which origins are its own, and what `auth.allowed_hosts` / `auth.allowed_origins` accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from mgpumanager.cli import main
from mgpumanager.registry import ConfigError, parse_config
from mgpumanager.registry.origins import (
    Verdict,
    host_allowed,
    judge_origin,
    normal_host,
    normal_origin,
    parse_host,
)


@pytest.mark.parametrize(
    ("host", "local", "allowed", "served"),
    [
        ("localhost:8770", "127.0.0.1", [], True),
        ("LOCALHOST.", "127.0.0.1", [], True),
        ("127.0.0.1:1", "127.0.0.1", [], True),
        ("127.0.0.2", "127.0.0.1", [], True),  # all of 127/8 is loopback
        ("[::1]:8770", "127.0.0.1", [], True),
        ("192.168.1.5:8770", "192.168.1.5", [], True),  # the address it arrived on
        ("192.168.1.5", "::ffff:192.168.1.5", [], True),  # a dual-stack socket's view
        ("192.168.1.6:8770", "192.168.1.5", [], False),
        ("attacker.example:8770", "127.0.0.1", [], False),
        ("localhost.attacker.example", "127.0.0.1", [], False),
        ("app.localhost", "127.0.0.1", [], False),
        ("gpubox.lan:8770", "0.0.0.0", ["gpubox.lan"], True),
        ("GPUBOX.LAN.", "0.0.0.0", ["gpubox.lan"], True),
        ("gpubox:8770", "0.0.0.0", ["gpubox.lan"], False),
        ("anything.example", None, ["*"], True),
        ("::1", "127.0.0.1", [], False),  # not a Host header (brackets missing)
        ("local host", "127.0.0.1", [], False),
        ("localhost:99999", "127.0.0.1", [], False),
        ("user@localhost", "127.0.0.1", [], False),
        ("", "127.0.0.1", [], False),
    ],
)
def test_host_check(host: str, local: str | None, allowed: list[str], served: bool) -> None:
    assert host_allowed(host, local, allowed) is served


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "verdict"),
    [
        ("http://127.0.0.1:8770", "127.0.0.1:8770", [], Verdict.OWN),
        ("http://localhost:8770", "localhost:8770", [], Verdict.OWN),  # dashboard as localhost
        ("http://[::1]:8770", "[::1]:8770", [], Verdict.OWN),
        ("http://localhost:9000", "localhost:9000", [], Verdict.OWN),  # an SSH tunnel's port
        ("http://localhost", "localhost", [], Verdict.OWN),
        ("https://box.example", "box.example", [], Verdict.OWN),  # behind a TLS proxy
        ("http://localhost:3000", "localhost", [], Verdict.FOREIGN),  # another port
        ("http://localhost:3000", "localhost:8770", [], Verdict.FOREIGN),
        ("http://127.0.0.1:8770", "localhost:8770", [], Verdict.FOREIGN),  # another origin
        ("http://attacker.example", "127.0.0.1:8770", [], Verdict.FOREIGN),
        ("null", "127.0.0.1:8770", [], Verdict.FOREIGN),
        ("file://", "127.0.0.1:8770", [], Verdict.FOREIGN),
        ("http://localhost:3000", "127.0.0.1:8770", ["http://localhost:3000"], Verdict.LISTED),
        ("HTTP://LocalHost:3000", "127.0.0.1:8770", ["http://localhost:3000"], Verdict.LISTED),
        ("https://localhost:3000", "127.0.0.1:8770", ["http://localhost:3000"], Verdict.FOREIGN),
        ("http://localhost:3000", None, [], Verdict.FOREIGN),
    ],
)
def test_origin_check(origin: str, host: str | None, allowed: list[str], verdict: Verdict) -> None:
    assert judge_origin(origin, host, allowed) is verdict


def test_host_headers_parse_as_browsers_send_them() -> None:
    assert parse_host("[::1]:8770") == ("::1", 8770)
    assert parse_host("Example.COM.") == ("example.com", None)
    assert parse_host("[not-an-ip]") is None


@pytest.mark.parametrize(
    ("entry", "normal"),
    [("GpuBox.lan", "gpubox.lan"), ("[::1]", "::1"), ("fd00::1", "fd00::1"), ("*", "*")],
)
def test_allowed_hosts_entries(entry: str, normal: str) -> None:
    assert normal_host(entry) == normal


@pytest.mark.parametrize(
    ("entry", "normal"),
    [
        ("http://LocalHost:3000/", "http://localhost:3000"),
        ("https://chat.example:443", "https://chat.example"),
        ("http://[::1]:80", "http://[::1]"),
    ],
)
def test_allowed_origins_entries(entry: str, normal: str) -> None:
    assert normal_origin(entry) == normal


def test_bad_entries_are_refused_by_key_and_line() -> None:
    text = """\
listen: 127.0.0.1:8770
auth:
  allowed_hosts: [gpubox.lan, "http://gpubox.lan", "gpubox.lan:8770"]
  allowed_origins: ["*", "http://localhost:3000/chat", "localhost:3000", http://ok.example]
consumers: {}
"""
    with pytest.raises(ConfigError) as refused:
        parse_config(text, "registry.yaml")
    problems = {(p.path, p.line) for p in refused.value.problems}
    assert problems == {
        ("auth.allowed_hosts.1", 3),
        ("auth.allowed_hosts.2", 3),
        ("auth.allowed_origins.0", 4),
        ("auth.allowed_origins.1", 4),
        ("auth.allowed_origins.2", 4),
    }
    message = str(refused.value)
    assert "without scheme or port" in message
    assert "every web page" in message


def test_check_config_explains_both_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        """\
listen: 0.0.0.0:8770
auth: {token: s3cret, allowed_hosts: [gpubox.lan], allowed_origins: ["http://localhost:3000"]}
consumers:
  ollama:
    type: ollama
    url: http://127.0.0.1:11435
    vram_resident_mib: 1000
    front_door: box.example:11434
"""
    )
    assert main(["check-config", str(registry)]) == 0
    out = capsys.readouterr().out
    assert "OK (1 consumers: ollama)" in out
    assert "answers to Host localhost, 127.0.0.1, [::1] (any port), gpubox.lan" in out
    assert "listen 0.0.0.0:8770 is reachable beyond loopback" in out
    assert "front door of ollama box.example:11434 listens on the name box.example" in out
    assert "front ends let in, with CORS headers: http://localhost:3000" in out
    registry.write_text("listen: 127.0.0.1:8770\nauth: {allowed_hosts: ['*']}\nconsumers: {}\n")
    assert main(["check-config", str(registry)]) == 0
    out = capsys.readouterr().out
    assert "DNS rebinding (a web page on a name that resolves to this box) is not stopped" in out
    assert "to let one, add its origin, e.g. auth.allowed_origins: [http://localhost:3000]" in out
