"""The polkit rule that lets the daemon's user manage its `command` consumers' units, and no
other unit: `mgpumanager deploy-rules --config FILE` prints it, `make deploy` installs it.

Under systemd the daemon runs as an unprivileged user. A `command` consumer's
`systemctl stop whisper-server` then goes over D-Bus to systemd, which asks polkit whether
that user may `stop` `whisper-server.service`. The rule answers yes for exactly the verbs and
units the registry's unload/load argv lists name, and nothing for anything else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

from mgpumanager.registry import AdapterType, Config

VERBS = ("start", "stop", "restart")
# Options of systemctl that take a separate value (`-s SIGNAL`); skipped with their value.
_VALUED = frozenset(
    {"-s", "--signal", "--kill-whom", "--kill-value", "--job-mode", "--timestamp", "--what"}
)
# Options that point systemctl elsewhere than the local system manager: no polkit rule here
# can grant those.
_ELSEWHERE = frozenset({"--user", "-H", "--host", "-M", "--machine", "--root", "--image"})
# Unit suffixes systemctl recognises; a bare name means `.service`, as systemctl itself does.
_SUFFIXES = (
    ".service",
    ".socket",
    ".target",
    ".device",
    ".mount",
    ".automount",
    ".swap",
    ".timer",
    ".path",
    ".slice",
    ".scope",
)


@dataclass(frozen=True)
class Grant:
    unit: str
    verbs: tuple[str, ...]


@dataclass(frozen=True)
class Uncovered:
    """A `command` the rule cannot cover: it runs as the daemon's user with no added rights."""

    consumer: str
    action: str
    argv: tuple[str, ...]
    reason: str


class RuleError(ValueError):
    """A `command` that names units the rule cannot name exactly (a glob pattern)."""


def systemctl_units(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """(verb, units) when `argv` is `systemctl [options] start|stop|restart UNIT...` for the
    system manager, else None. Units come back as systemd names them (`x` -> `x.service`)."""
    if not argv or PurePath(argv[0]).name != "systemctl":
        return None
    words: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        option = arg.split("=", 1)[0]
        if option in _ELSEWHERE:
            return None
        if arg in _VALUED:
            next(args, None)
        elif not arg.startswith("-"):
            words.append(arg)
    if len(words) < 2 or words[0] not in VERBS:
        return None
    return words[0], [unit_name(word) for word in words[1:]]


def unit_name(word: str) -> str:
    if any(c in word for c in "*?["):
        raise RuleError(f"{word!r} is a pattern: name each unit the broker may manage")
    return word if word.endswith(_SUFFIXES) else f"{word}.service"


def grants(config: Config) -> tuple[list[Grant], list[Uncovered]]:
    """Which verbs on which units the registry's `command` consumers use, and the commands
    that are not a `systemctl start|stop|restart UNIT`."""
    verbs: dict[str, set[str]] = {}
    uncovered: list[Uncovered] = []
    for name, consumer in config.consumers.items():
        if consumer.type is not AdapterType.COMMAND:
            continue
        for action_name in ("unload", "load"):
            action = getattr(consumer, action_name)
            if action is None or action.command is None:
                continue
            argv = tuple(action.command)
            try:
                found = systemctl_units(argv)
            except RuleError as exc:
                raise RuleError(f"consumers.{name}.{action_name}.command: {exc}") from exc
            if found is None:
                reason = "not `systemctl start|stop|restart UNIT` on the system manager"
                uncovered.append(Uncovered(name, action_name, argv, reason))
                continue
            verb, units = found
            for unit in units:
                verbs.setdefault(unit, set()).add(verb)
    granted = [Grant(unit, tuple(v for v in VERBS if v in verbs[unit])) for unit in sorted(verbs)]
    return granted, uncovered


def polkit_rule(config: Config, user: str, source: str = "the registry") -> str:
    """The JavaScript polkit rule (polkit 0.106 or later) for `user`. With no `command`
    consumer managing a unit it grants nothing (and says so)."""
    granted, uncovered = grants(config)
    source = "".join(c if c.isprintable() else "?" for c in source)
    lines = [
        f"// Written by `mgpumanager deploy-rules` from {source}: the units its `command`",
        f"// consumers start and stop. {user} may run exactly these verbs on exactly these",
        "// units, and manage no other unit. Regenerate it after changing those consumers.",
    ]
    lines += [
        f"// Not covered (runs as {user} with no added rights): consumers.{u.consumer}."
        f"{u.action}.command {json.dumps(list(u.argv))}: {u.reason}"
        for u in uncovered
    ]
    if not granted:
        lines.append("// No `command` consumer manages a unit: this rule grants nothing.")
    table = json.dumps({g.unit: list(g.verbs) for g in granted}, indent=4, sort_keys=True)
    lines += [
        "polkit.addRule(function(action, subject) {",
        '    if (action.id != "org.freedesktop.systemd1.manage-units" ||',
        f"        subject.user != {json.dumps(user)}) {{",
        "        return polkit.Result.NOT_HANDLED;",
        "    }",
        "    var units = " + table.replace("\n", "\n    ") + ";",
        '    var unit = action.lookup("unit");',
        "    if (Object.prototype.hasOwnProperty.call(units, unit) &&",
        '        units[unit].indexOf(action.lookup("verb")) >= 0) {',
        "        return polkit.Result.YES;",
        "    }",
        "    return polkit.Result.NOT_HANDLED;",
        "});",
    ]
    return "\n".join(lines) + "\n"
