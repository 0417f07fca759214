"""Which process listens on a port, its children, and the systemd unit it runs in: what
`mgpumanager init` needs from the box besides HTTP answers.

`LocalSystem` is the seam (tests stand in for /proc and systemd); `ProcSystem` reads /proc and
the cgroup systemd put a process in, so it needs neither `systemctl` nor a running systemd: on a
box without one it finds no units, and processes of other users are visible to root only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. ollama.service
    user: bool = False  # a `systemctl --user` unit: the broker's user cannot manage it


class LocalSystem(Protocol):
    def listening_pid(self, port: int) -> int | None:
        """The process listening on this TCP port of this machine, where it can be seen."""
        ...

    def listening_ports(self) -> set[int]:
        """Every TCP port something listens on here (where a moved service must not go)."""
        ...

    def descendants(self, pid: int) -> set[int]:
        """Its children, their children, and so on."""
        ...

    def unit_of(self, pid: int) -> Unit | None:
        """The systemd service the process runs in, or None (no systemd, not in a unit)."""
        ...


class ProcSystem:
    """/proc: listening sockets (`net/tcp`, `net/tcp6`), who holds them (`*/fd`), parents
    (`*/stat`), and the cgroup systemd put a process in (`*/cgroup`). Processes of other users
    are only visible to root: then no pid, and no unit."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self.root = proc_root

    def _listening(self) -> list[tuple[int, str]]:
        """(port, socket inode) of every listening TCP socket."""
        found = []
        for name in ("tcp", "tcp6"):
            try:
                lines = (self.root / "net" / name).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
                    continue
                found.append((int(fields[1].rpartition(":")[2], 16), fields[9]))
        return found

    def listening_ports(self) -> set[int]:
        return {port for port, _ in self._listening()}

    def _pids(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir() if p.name.isdigit()]
        except OSError:
            return []

    def listening_pid(self, port: int) -> int | None:
        wanted = {f"socket:[{inode}]" for p, inode in self._listening() if p == port}
        if not wanted:
            return None
        for proc in self._pids():
            try:
                fds = list((proc / "fd").iterdir())
            except OSError:
                continue  # another user's process, or gone
            for fd in fds:
                try:
                    if str(fd.readlink()) in wanted:
                        return int(proc.name)
                except OSError:
                    continue
        return None

    def _parents(self) -> dict[int, int]:
        parents = {}
        for proc in self._pids():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            rest = stat.rpartition(")")[2].split()
            if len(rest) >= 2 and rest[1].isdigit():
                parents[int(proc.name)] = int(rest[1])
        return parents

    def descendants(self, pid: int) -> set[int]:
        children: dict[int, list[int]] = {}
        for child, parent in self._parents().items():
            children.setdefault(parent, []).append(child)
        found: set[int] = set()
        todo = [pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    def unit_of(self, pid: int) -> Unit | None:
        try:
            lines = (self.root / str(pid) / "cgroup").read_text().splitlines()
        except OSError:
            return None
        # cgroup v2 ("0::/system.slice/x.service") or v1's systemd hierarchy.
        paths = [
            line.split(":", 2)[2]
            for line in lines
            if line.count(":") >= 2 and line.split(":", 2)[1] in ("", "name=systemd")
        ]
        for path in paths:
            services = [part for part in path.split("/") if part.endswith(".service")]
            if not services:
                continue
            if "/user.slice/" in path or path.startswith("/user.slice"):
                # user@1000.service/app.slice/x.service: a user's own unit.
                inner = [s for s in services if not re.fullmatch(r"user@\d+\.service", s)]
                return Unit(inner[-1], user=True) if inner else None
            return Unit(services[-1])
        return None


__all__ = ["LocalSystem", "ProcSystem", "Unit"]
