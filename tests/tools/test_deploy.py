"""What `make deploy` installs: the unit (rated by `systemd-analyze security`, checked by
`systemd-analyze verify`), the polkit rule written from the registry (it names exactly the
units of the `command` consumers, and polkit's own evaluation of it grants nothing more), and
deploy/install.sh + uninstall.sh run into a scratch root with the system commands stubbed."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mgpumanager.cli import main
from mgpumanager.registry import load_config, parse_config
from mgpumanager.tools.deploy import RuleError, grants, polkit_rule, systemctl_units

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "mgpumanager.service"
INSTALL = REPO / "deploy" / "install.sh"
UNINSTALL = REPO / "deploy" / "uninstall.sh"
INSTALLED_BIN = "/opt/mgpumanager/.venv/bin/mgpumanager"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze missing (apt-get install systemd; .ci/run does)"
)


def unit_settings(text: str) -> dict[str, list[str]]:
    """[Service] settings of a unit file, every value of a repeated key kept in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


# -- the unit -----------------------------------------------------------------------------------


@needs_analyze
def test_unit_exposure_is_at_most_3() -> None:
    assert ANALYZE is not None
    run = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for mgpumanager\.service: (\d+\.\d+)", run.stdout)
    assert found, run.stdout + run.stderr
    assert float(found.group(1)) <= 3.0, run.stdout


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    """`verify` checks that ExecStart's program exists. This box has no /opt/mgpumanager, so the
    copy it checks runs the same console script from this checkout's environment; every other
    line is the file as shipped."""
    assert ANALYZE is not None
    here = Path(sys.executable).parent / "mgpumanager"
    assert here.exists(), f"no console script at {here}: install the package first"
    text = UNIT.read_text()
    assert text.count(INSTALLED_BIN) == 2  # ExecStartPre and ExecStart, nothing else moved
    copy = tmp_path / "mgpumanager.service"
    copy.write_text(text.replace(INSTALLED_BIN, str(here)))
    run = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(copy)], capture_output=True, text=True, check=False
    )
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_unit_is_notify_with_watchdog_nonroot_and_reads_etc() -> None:
    unit = unit_settings(UNIT.read_text())
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] and unit["User"] == ["mgpumanager"]
    assert unit["CapabilityBoundingSet"] == [""] and unit["NoNewPrivileges"] == ["yes"]
    assert int(unit["LimitNOFILE"][0]) >= 65536
    registry = "/etc/mgpumanager/consumers.yaml"
    assert unit["ExecStart"] == [f"{INSTALLED_BIN} serve --config {registry}"]
    assert unit["ExecStartPre"] == [f"{INSTALLED_BIN} check-config {registry}"]


# -- the polkit rule ----------------------------------------------------------------------------

REGISTRY = """\
listen: 127.0.0.1:0
gpu: {backend: static, total_mib: 24576}
consumers:
  whisper:
    type: command
    url: http://127.0.0.1:9001
    vram_resident_mib: 1000
    unload: {command: [systemctl, stop, whisper-server]}
    load: {command: [/usr/bin/systemctl, --no-block, start, whisper-server.service]}
  tts:
    type: command
    url: http://127.0.0.1:9002
    vram_resident_mib: 1000
    unload: {command: [systemctl, -s, SIGINT, stop, "tts@gpu0", tts-helper.socket]}
    load: {command: [systemctl, restart, "tts@gpu0"]}
  scripted:
    type: command
    url: http://127.0.0.1:9003
    vram_resident_mib: 1000
    unload: {command: [pkill, -f, my-server]}
    load: {command: [systemctl, --user, start, my-server]}
  ollama:
    type: ollama
    url: http://127.0.0.1:11434
    vram_resident_mib: 1000
  mvoice:
    url: http://127.0.0.1:9004
    vram_resident_mib: 1000
    unload: {path: /unload}
"""

EXPECTED = {
    "tts-helper.socket": ["stop"],
    "tts@gpu0.service": ["restart", "stop"],
    "whisper-server.service": ["start", "stop"],
}


def rule_table(rule: str) -> dict[str, list[str]]:
    found = re.search(r"var units = (\{.*?\});", rule, re.DOTALL)
    assert found, rule
    table: dict[str, list[str]] = json.loads(found.group(1))
    return table


def test_rule_names_exactly_the_units_of_command_consumers() -> None:
    config = parse_config(REGISTRY)
    granted, uncovered = grants(config)
    assert {g.unit: sorted(g.verbs) for g in granted} == EXPECTED
    assert {(u.consumer, u.action) for u in uncovered} == {
        ("scripted", "unload"),
        ("scripted", "load"),
    }
    rule = polkit_rule(config, "mgpumanager")
    assert {unit: sorted(verbs) for unit, verbs in rule_table(rule).items()} == EXPECTED
    assert "consumers.scripted.unload.command" in rule  # said, in a comment, not granted


def test_shipped_registry_grants_its_whisper_server_only() -> None:
    rule = polkit_rule(load_config(REPO / "config" / "consumers.yaml"), "mgpumanager")
    assert rule_table(rule) == {"whisper-server.service": ["start", "stop"]}


def test_systemctl_argv_parsing() -> None:
    assert systemctl_units(["systemctl", "stop", "a", "b.timer"]) == (
        "stop",
        ["a.service", "b.timer"],
    )
    assert systemctl_units(["systemctl", "--job-mode=fail", "start", "a"]) == (
        "start",
        ["a.service"],
    )
    assert systemctl_units(["systemctl", "-H", "box", "stop", "a"]) is None
    assert systemctl_units(["systemctl", "enable", "a"]) is None
    assert systemctl_units(["sudo", "systemctl", "stop", "a"]) is None
    with pytest.raises(RuleError, match="pattern"):
        systemctl_units(["systemctl", "stop", "whisper-*"])


NODE = shutil.which("node")
HARNESS = """
const fs = require("fs"), vm = require("vm");
const rules = [];
const polkit = {Result: {YES: "yes", NO: "no", AUTH_ADMIN: "auth_admin", NOT_HANDLED: null},
                addRule: (f) => rules.push(f)};
vm.runInNewContext(fs.readFileSync(process.argv[2], "utf8"), {polkit: polkit});
const answers = JSON.parse(process.argv[3]).map(([id, user, unit, verb]) => {
  const action = {id: id, lookup: (k) => ({unit: unit, verb: verb})[k]};
  for (const rule of rules) {
    const r = rule(action, {user: user});
    if (r !== null && r !== undefined) return r;
  }
  return null;
});
console.log(JSON.stringify(answers));
"""


@pytest.mark.skipif(NODE is None, reason="node missing: the rule is not evaluated as polkit does")
def test_polkit_evaluating_the_rule_grants_nothing_more(tmp_path: Path) -> None:
    """The rule run in a JavaScript engine against a stand-in `polkit` object, as polkitd runs
    it: yes exactly for the registry's verbs on its units, to its user, for manage-units."""
    assert NODE is not None
    rule = tmp_path / "50-mgpumanager.rules"
    rule.write_text(polkit_rule(parse_config(REGISTRY), "mgpumanager"))
    units = [*EXPECTED, "sshd.service", "whisper-server", "my-server.service", "constructor"]
    verbs = ["start", "stop", "restart", "reload", "kill", "try-restart"]
    actions = [
        "org.freedesktop.systemd1.manage-units",
        "org.freedesktop.systemd1.manage-unit-files",
    ]
    cases = [
        (a, user, unit, verb)
        for a in actions
        for user in ("mgpumanager", "nobody")
        for unit in units
        for verb in verbs
    ]
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    run = subprocess.run(
        [NODE, str(harness), str(rule), json.dumps(cases)],
        capture_output=True,
        text=True,
        check=True,
    )
    answers = json.loads(run.stdout)
    granted = {case for case, answer in zip(cases, answers, strict=True) if answer == "yes"}
    assert set(answers) <= {"yes", None}, run.stdout
    assert granted == {
        (actions[0], "mgpumanager", unit, verb)
        for unit, unit_verbs in EXPECTED.items()
        for verb in unit_verbs
    }


def test_cli_prints_the_rule_and_refuses_a_pattern(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "consumers.yaml"
    registry.write_text(REGISTRY)
    assert main(["deploy-rules", "--config", str(registry), "--user", "gpu"]) == 0
    out = capsys.readouterr().out
    assert out == polkit_rule(parse_config(REGISTRY), "gpu", str(registry))
    assert 'subject.user != "gpu"' in out
    registry.write_text(REGISTRY.replace("stop, whisper-server]", "stop, 'whisper-*']"))
    assert main(["deploy-rules", "--config", str(registry)]) == 2
    err = capsys.readouterr().err
    assert "consumers.whisper.unload.command" in err and "pattern" in err


# -- install.sh / uninstall.sh ------------------------------------------------------------------

STUB = """#!/usr/bin/env bash
# Stand-in for a system command: logs its call; users and groups live in $STATE.
echo "$(basename "$0") $*" >>"$STATE/calls"
case "$(basename "$0")" in
  id)
    [ "$1" = -nG ] && { echo "$2"; exit 0; }
    grep -qx "${@: -1}" "$STATE/users" 2>/dev/null ;;
  getent) grep -qx "$2" "$STATE/users" 2>/dev/null ;;
  useradd) echo "${@: -1}" >>"$STATE/users" ;;
  userdel) sed -i "/^$1\\$/d" "$STATE/users" ;;
esac
"""
STUBBED = ("id", "getent", "useradd", "usermod", "userdel", "groupdel", "chown", "chgrp")


class Box:
    """A scratch root with the tree as `make deploy` leaves it in /opt/mgpumanager, and the
    commands that change the real system (users, ownership, systemctl) stubbed."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.state = tmp_path / "state"
        self.state.mkdir()
        stubs = tmp_path / "stubs"
        stubs.mkdir()
        for name in (*STUBBED, "systemctl"):
            (stubs / name).write_text(STUB)
            (stubs / name).chmod(0o755)
        app = self.root / "opt" / "mgpumanager"
        (app / "config").mkdir(parents=True)
        (app / "deploy").mkdir()
        (app / "src" / "pkg").mkdir(parents=True)
        (app / "src" / "pkg" / "mod.py").write_text("X = 1\n")
        shutil.copy(REPO / "config" / "consumers.yaml", app / "config")
        shutil.copy(UNIT, app / "deploy")
        venv_bin = app / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        (venv_bin / "python").symlink_to(sys.executable)
        (venv_bin / "mgpumanager").symlink_to(Path(sys.executable).parent / "mgpumanager")
        (self.root / "etc" / "polkit-1" / "rules.d").mkdir(parents=True)
        (self.root / "etc" / "systemd" / "system").mkdir(parents=True)
        self.env = {**os.environ, "ROOT": str(self.root), "STATE": str(self.state)}
        self.env["PATH"] = f"{stubs}:{self.env['PATH']}"

    def run(self, script: Path) -> str:
        (self.state / "calls").write_text("")
        done = subprocess.run(
            ["bash", str(script)], env=self.env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    @property
    def calls(self) -> list[str]:
        return (self.state / "calls").read_text().splitlines()

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_is_idempotent_and_uninstall_keeps_the_registry(tmp_path: Path) -> None:
    box = Box(tmp_path)
    registry = box.path("/etc/mgpumanager/consumers.yaml")
    rule = box.path("/etc/polkit-1/rules.d/50-mgpumanager.rules")
    unit = box.path("/etc/systemd/system/mgpumanager.service")

    out = box.run(INSTALL)
    assert "created system user mgpumanager" in out
    assert box.calls[0] == "id -u mgpumanager" and box.calls[1].startswith("useradd --system")
    assert registry.read_text() == (REPO / "config" / "consumers.yaml").read_text()
    assert (mode(registry), mode(registry.parent)) == (0o640, 0o750)
    assert f"chown root:mgpumanager {registry}" in box.calls  # readable by its group only
    assert rule.read_text() == polkit_rule(load_config(registry), "mgpumanager", str(registry))
    assert unit.read_text() == UNIT.read_text() and mode(unit) == 0o644
    assert box.calls[-3:] == [
        "systemctl daemon-reload",
        "systemctl enable --quiet mgpumanager.service",
        "systemctl restart mgpumanager.service",
    ]
    assert box.path("/opt/mgpumanager/src/pkg/__pycache__").is_dir()

    edited = registry.read_text() + "# edited on the box\n"
    registry.write_text(edited)
    out = box.run(INSTALL)  # again: nothing new created, the edited registry kept
    assert not any(call.startswith("useradd") for call in box.calls)
    assert "created" not in out and "installed the example" not in out
    assert registry.read_text() == edited
    assert box.calls[-1] == "systemctl restart mgpumanager.service"

    out = box.run(UNINSTALL)
    assert not unit.exists() and not rule.exists()
    assert not box.path("/opt/mgpumanager").exists()
    assert registry.read_text() == edited and "kept the registry" in out
    assert "systemctl disable --now --quiet mgpumanager.service" in box.calls
    assert "userdel mgpumanager" in box.calls
    assert box.calls.index(f"chgrp -R root {registry.parent}") < box.calls.index(
        "userdel mgpumanager"
    )
    box.run(UNINSTALL)  # again: nothing left to remove
    assert not any(c.startswith(("systemctl", "userdel")) for c in box.calls)


def test_install_without_polkit_rules_dir_warns(tmp_path: Path) -> None:
    box = Box(tmp_path)
    shutil.rmtree(box.path("/etc/polkit-1"))
    out = box.run(INSTALL)
    assert "WARNING: no" in out and "polkit" in out
    assert not box.path("/etc/polkit-1").exists()
