"""A tiny ``systemctl start/stop`` for the demo and the tests: start a command detached, stop it.

Mimics what a ``command``-type adapter runs for a service that has no unload endpoint
(whisper-server: ``systemctl stop whisper-server``, then ``systemctl start whisper-server``)::

    python -m mgpumanager.sim.launcher start --pidfile F [--log FILE] -- ARGV...
    python -m mgpumanager.sim.launcher stop --pidfile F [--timeout-s 10]
    python -m mgpumanager.sim.launcher status --pidfile F

``start`` runs ARGV in a new session (its own process group), writes the pidfile and exits 0 at
once; it is a no-op when the pidfile names a live process. ``stop`` sends SIGTERM to the group,
waits for the process to exit (SIGKILL after ``--timeout-s``), removes the pidfile and exits 0,
also when nothing was running (idempotent, like ``systemctl stop``). ``status`` exits 0 when
running, 3 when not (like ``systemctl is-active``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_POLL_S = 0.05


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def running_pid(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process is still the one we started and alive."""
    try:
        fields = pidfile.read_text().split()
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return None
    if len(fields) > 1 and _start_time(pid) not in (None, fields[1]):
        return None  # the pid was reused by another process
    return pid if _alive(pid) else None


def start(argv: Sequence[str], pidfile: Path, log_path: Path | None = None) -> int:
    """Start ``argv`` detached in a new session; write ``pidfile``; return the pid."""
    if not argv:
        raise ValueError("nothing to start")
    existing = running_pid(pidfile)
    if existing is not None:
        return existing
    out_fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_fd, 1),
            (os.POSIX_SPAWN_DUP2, out_fd, 2),
        ]
        pid = os.posix_spawnp(
            argv[0], list(argv), dict(os.environ), file_actions=actions, setsid=True
        )
    finally:
        os.close(out_fd)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = pidfile.with_name(pidfile.name + ".tmp")
    tmp.write_text(f"{pid} {_start_time(pid) or ''}".strip() + "\n")
    tmp.replace(pidfile)
    return pid


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def stop(pidfile: Path, timeout_s: float = 10.0) -> bool:
    """SIGTERM the process of ``pidfile`` and wait for it to exit; True if one was running."""
    pid = running_pid(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    _signal_group(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout_s):
        _signal_group(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    pidfile.unlink(missing_ok=True)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, command = args[:cut], args[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m mgpumanager.sim.launcher", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_start = sub.add_parser("start", help="start `-- ARGV...` detached and write the pidfile")
    p_start.add_argument("--pidfile", type=Path, required=True)
    p_start.add_argument(
        "--log", type=Path, default=None, help="stdout+stderr of the process (default: discard)"
    )
    p_stop = sub.add_parser("stop", help="SIGTERM, wait for exit, remove the pidfile")
    p_stop.add_argument("--pidfile", type=Path, required=True)
    p_stop.add_argument("--timeout-s", type=float, default=10.0)
    p_status = sub.add_parser("status", help="exit 0 when running, 3 when not")
    p_status.add_argument("--pidfile", type=Path, required=True)
    ns = parser.parse_args(args)
    if ns.action == "start":
        if not command:
            parser.error("start needs a command after --")
        try:
            start(command, ns.pidfile, ns.log)
        except OSError as exc:
            print(f"launcher: cannot start {command[0]}: {exc}", file=sys.stderr)
            return 1
        return 0
    if ns.action == "stop":
        stop(ns.pidfile, ns.timeout_s)
        return 0
    return 0 if running_pid(ns.pidfile) is not None else 3


if __name__ == "__main__":
    raise SystemExit(main())
