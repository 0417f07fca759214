"""`mgpumanager status [--watch] | load NAME | unload NAME`: the command line against a running
broker, over its HTTP API (`/v1/status`, `/v1/admin/consumers/NAME/load|unload`).

The broker's URL comes from `--url`, else from the registry's `listen`, else the default
listen address; the token, where the broker has one, from $MGPUMANAGER_TOKEN. Every failure is
one line on stderr and a non-zero exit: no broker there, a token refused, an error envelope.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml

DEFAULT_URL = "http://127.0.0.1:8770"
TOKEN_ENV = "MGPUMANAGER_TOKEN"
# Where the registry is looked for when neither --url nor --config is given.
REGISTRIES = (Path("config/consumers.yaml"), Path("/etc/mgpumanager/consumers.yaml"))
HOLDS_MEMORY = frozenset({"loading", "resident", "unloading", "unknown"})
STATUS_TIMEOUT_S = 10.0


class RemoteError(Exception):
    """One line for the operator."""


# -- where the broker is -------------------------------------------------------------------------


def broker_url(url: str | None, config: Path | None) -> str:
    """`url` if given; else the `listen` of the registry (`config`, or the first of REGISTRIES
    that exists and can be read); else DEFAULT_URL."""
    if url:
        return url.rstrip("/")
    for path in (config,) if config is not None else REGISTRIES:
        listen = _listen_of(path, required=config is not None)
        if listen is not None:
            host, _, port = listen.rpartition(":")
            host = host.strip("[]")
            if host in ("", "0.0.0.0", "::"):  # listening everywhere: ask it on loopback
                host = "127.0.0.1"
            return f"http://{f'[{host}]' if ':' in host else host}:{port}"
    return DEFAULT_URL


def _listen_of(path: Path, *, required: bool) -> str | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise RemoteError(f"{path}: no such file") from None
        return None
    except (OSError, yaml.YAMLError) as exc:
        if required:
            raise RemoteError(f"{path}: cannot be read ({exc})") from None
        return None
    listen = data.get("listen") if isinstance(data, dict) else None
    return str(listen) if listen else "127.0.0.1:8770"


# -- talking to it -------------------------------------------------------------------------------


class Remote:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token or None

    async def request(self, method: str, path: str, timeout_s: float | None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(method, self.url + path, headers=headers) as response,
            ):
                doc = await _json(response)
        except aiohttp.InvalidURL:
            raise RemoteError(f"{self.url} is not a URL") from None
        except aiohttp.ClientConnectorError as exc:
            # asyncio words a refusal "Connect call failed (...)": the errno says it plainly. A
            # failed name lookup has a negative errno and says it in its strerror.
            error = exc.os_error
            plain = os.strerror(error.errno) if error.errno and error.errno > 0 else None
            reason = plain or error.strerror or str(error)
            raise RemoteError(f"no broker answers at {self.url} ({reason.lower()})") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            what = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            raise RemoteError(f"the broker at {self.url} failed: {what}") from None
        if response.status == 401:
            if self.token is None:
                raise RemoteError(f"the broker at {self.url} needs a token: set {TOKEN_ENV}")
            raise RemoteError(f"the broker at {self.url} refused the token in {TOKEN_ENV}")
        if response.status >= 400:
            consumer = doc.get("consumer")
            prefix = f"{consumer}: " if consumer else ""
            message = doc.get("message") or f"HTTP {response.status}"
            raise RemoteError(f"{prefix}{message}")
        return doc

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/status", STATUS_TIMEOUT_S)

    async def admin(self, name: str, action: str) -> dict[str, Any]:
        # No time limit: the action waits its turn in the broker's queue like any job.
        return await self.request("POST", f"/v1/admin/consumers/{name}/{action}", None)


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        doc = await response.json(content_type=None)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise RemoteError(f"{response.url} answered HTTP {response.status}, not the broker's JSON")
    return doc


# -- the picture -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    label: str
    mib: int
    kind: str  # measured, declared, outside, free, margin


def memory_parts(status: dict[str, Any]) -> list[Part]:
    """The card's memory, left to right: what each consumer holds (the figure the planner
    counts, `vram_mib`, by its source), memory held outside any consumer, free, and the safety
    margin. The page draws the same."""
    gpu = status["gpu"]
    parts = []
    for name, c in status["consumers"].items():
        if c["residency"] not in HOLDS_MEMORY:
            continue
        parts.append(Part(name, c["vram_mib"], c["vram_source"]))
    held = sum(p.mib for p in parts)
    used = gpu["used_mib"]
    outside = 0 if used is None else max(0, used - held)
    free = max(0, gpu["total_mib"] - held - outside)
    margin = min(gpu["safety_margin_mib"], free)
    return [
        *parts,
        Part("outside", outside, "outside"),
        Part("free", free - margin, "free"),
        Part("margin", margin, "margin"),
    ]


def device_parts(device: dict[str, Any], status: dict[str, Any]) -> list[Part]:
    """One card of a box with several, as `memory_parts` draws the whole: what each consumer
    holds on it, memory of no consumer, free, margin."""
    consumers = status["consumers"]
    parts = [
        Part(name, mib, consumers[name]["vram_source"] if name in consumers else "declared")
        for name, mib in device["vram_mib"].items()
    ]
    held = sum(p.mib for p in parts)
    used = device["used_mib"]
    outside = 0 if used is None else max(0, used - held)
    free = max(0, device["total_mib"] - held - outside)
    margin = min(status["gpu"]["safety_margin_mib"], free)
    return [
        *parts,
        Part("outside", outside, "outside"),
        Part("free", free - margin, "free"),
        Part("margin", margin, "margin"),
    ]


def device_lines(status: dict[str, Any], glyphs: dict[str, str], width: int) -> list[str]:
    """Per card (a box with several): its figures, its bar, who is bound to it."""
    lines = []
    for d in status.get("gpus") or []:
        used = "used unknown" if d["used_mib"] is None else f"{_mib(d['used_mib'])} MiB used"
        undeclared = f" · UNDECLARED: {', '.join(d['undeclared'])}" if d["undeclared"] else ""
        lines.append(
            f"GPU {d['index']} {d['name']} ({d['uuid']}): {used} of {_mib(d['total_mib'])} · "
            f"headroom {_mib(d['headroom_mib'])} MiB · bound: {', '.join(d['consumers']) or '-'}"
            + undeclared
        )
        lines.append("[" + bar(device_parts(d, status), glyphs, width) + "]")
    return lines


def _glyphs(names: list[str]) -> dict[str, str]:
    """One letter per consumer: the first of its name not taken by another."""
    out: dict[str, str] = {}
    for name in names:
        pool = [ch for ch in name.lower() if ch.isalnum()] + list("abcdefghijklmnopqrstuvwxyz")
        out[name] = next(ch for ch in pool if ch not in out.values())
    return out


FILL = {"outside": "#", "free": ".", "margin": "!"}


def bar(parts: list[Part], glyphs: dict[str, str], width: int) -> str:
    """Measured or reported memory in upper case, declared in lower case, outside `#`, free
    `.`, margin `!`; every part that holds memory gets at least one cell."""
    total = sum(p.mib for p in parts) or 1
    cells = []
    for p in parts:
        n = round(width * p.mib / total)
        if p.mib > 0 and p.kind != "free":
            n = max(1, n)
        ch = FILL.get(p.kind) or glyphs[p.label]
        cells.append((ch.upper() if p.kind in ("measured", "reported") else ch) * n)
    line = "".join(cells)
    if len(line) > width:  # rounding: take the excess from the free part
        line = line.replace(".", "", len(line) - width)
    return line[:width].ljust(width, ".")


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{round(n):,}"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def render(status: dict[str, Any], url: str, width: int = 100, evictions: int = 5) -> str:
    gpu, sched = status["gpu"], status["scheduler"]
    consumers: dict[str, Any] = status["consumers"]
    glyphs = _glyphs(list(consumers))
    parts = memory_parts(status)
    lines = [
        f"mgpumanager {status['version']} at {url} · {gpu['device']} ({gpu['backend']}) · "
        f"up {_secs(status['uptime_s'])}",
        "",
    ]
    used = "used unknown" if gpu["used_mib"] is None else f"{_mib(gpu['used_mib'])} MiB used"
    lines.append(
        f"GPU memory: {used} of {_mib(gpu['total_mib'])} · headroom {_mib(gpu['headroom_mib'])} MiB"
        + (f" · reading failed: {gpu['error']}" if gpu["error"] else "")
    )
    lines.append("[" + bar(parts, glyphs, max(20, width - 2)) + "]")
    legend = []
    for p in parts:
        if p.kind in ("measured", "reported", "declared"):
            ch = glyphs[p.label]
            up = p.kind != "declared"  # as the bar draws it
            legend.append(f"{ch.upper() if up else ch} {p.label} {_mib(p.mib)} {p.kind}")
        elif p.mib > 0 or p.kind == "margin":
            legend.append(f"{FILL[p.kind]} {p.kind} {_mib(p.mib)}")
    lines += ["  ".join(legend), ""]
    if len(status.get("gpus") or []) > 1:
        lines += [*device_lines(status, glyphs, max(20, width - 2)), ""]
    rows = [
        [
            "CONSUMER",
            "HEALTH",
            "RESIDENCY",
            "VRAM MiB",
            "LAST USED",
            "LOAD / UNLOAD",
            "QUEUE",
            "IN FLIGHT",
        ]
    ]
    for name, c in consumers.items():
        health = {None: "not probed", True: "healthy", False: "FAILING"}[c["healthy"]]
        if c.get("health_state") == "stopped":
            health = "stopped"  # on demand: its next job starts it
        residency = c["residency"]
        if c["resident_models"]:
            residency += f" ({', '.join(c['resident_models'])})"
        used_ago = c["last_used_s_ago"]
        rows.append(
            [
                name,
                health,
                residency,
                f"{_mib(c['vram_mib'])} {c['vram_source']}",
                "never" if used_ago is None else f"{_secs(used_ago)} ago",
                f"{_secs(c['last_load_s'])} / {_secs(c['last_unload_s'])}",
                str(c["queue_depth"]),
                str(c["in_flight"]),
            ]
        )
    lines += _table(rows, right={3, 4, 5, 6, 7})
    lines.append("")
    holder = sched["holder"]
    running = ", ".join(j["label"] or f"job {j['job']}" for j in sched["running"])
    lines.append(
        f"Scheduler ({sched['policy']}): "
        + (f"{holder} holds the GPU ({running})" if holder else "nothing holds the GPU")
        + f"; {len(sched['waiting'])} waiting"
    )
    for j in sched["waiting"]:
        lines.append(
            f"  #{j['job']} {j['label'] or '-'} -> {j['consumer']}, priority {j['priority']}, "
            f"waiting {_secs(j['age_s'])}"
        )
    lines.append(
        f"  completed {sched['completed']}, upstream errors {sched.get('upstream_error', 0)}, "
        f"failed {sched['failed']}, cancelled "
        f"{sched['cancelled']}, timed out {sched['timed_out']}; swaps {sched['swaps']}, "
        f"evictions {sched['evictions']} ({sched['eviction_failures']} failed)"
    )
    lines += ["", "Last evictions:"]
    recent = status["recent_evictions"][:evictions]
    if not recent:
        lines.append("  none yet")
    for e in recent:
        when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
        why = f"for {e['target']}" if e["target"] else "unload asked"
        figures = (
            f", needed {_mib(e['need_mib'])} MiB, headroom {_mib(e['headroom_mib'])} MiB"
            if e["need_mib"] is not None
            else ""
        )
        lines.append(f"  {when} {why}: {', '.join(e['victims'])}{figures} — {e['outcome']}")
    return "\n".join(lines)


# -- the commands ----------------------------------------------------------------------------------


async def status_command(
    remote: Remote, *, watch: bool, interval_s: float, out: TextIO = sys.stdout
) -> int:
    if not watch:
        doc = await remote.status()
        print(render(doc, remote.url, width=_width()), file=out)
        return 0
    while True:
        try:
            picture = render(await remote.status(), remote.url, width=_width())
        except RemoteError as exc:
            picture = f"mgpumanager: {exc}; retrying every {interval_s:g} s"
        # Home the cursor and clear the screen, then draw: no scrolling history of pictures.
        out.write("\x1b[H\x1b[2J" + picture + "\n")
        out.flush()
        await asyncio.sleep(interval_s)


async def admin_command(remote: Remote, name: str, action: str, out: TextIO = sys.stdout) -> int:
    doc = await remote.admin(name, action)
    print(f"{doc.get('consumer', name)}: {doc.get('residency', 'done')}", file=out)
    return 0


def _width() -> int:
    return min(120, shutil.get_terminal_size((100, 24)).columns)


def run(args: Any) -> int:
    """Run one of the remote commands parsed by the CLI; answers the exit status."""
    try:
        remote = Remote(broker_url(args.url, args.config), os.environ.get(TOKEN_ENV))
        if args.command == "status":
            return asyncio.run(status_command(remote, watch=args.watch, interval_s=args.interval))
        return asyncio.run(admin_command(remote, args.name, args.command))
    except RemoteError as exc:
        print(f"mgpumanager: {exc}", file=sys.stderr)
        return 1
