"""`mgpumanager init`: look at the box and write a registry that works.

It reads the GPU (NVML, the simulated GPU with `--gpu-sim URL`, or takes its size from
`--total-mib N` on a box without NVML: `backend: static`), probes the usual ports and
the `--scan` list (`discover.py`), builds a proposal (`proposal.py`: sizes, routing,
coexistence, priorities, front doors) and writes it as an annotated registry: each value with
a comment saying where it comes from, and `CHECK` wherever it is a guess.

The text is checked with the registry's own loader before it is written, and must read back as
exactly the mapping that was checked. An existing file is replaced only with `--force` (and
kept as FILE.bak).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mgpumanager.registry import ConfigError, parse_config
from mgpumanager.tools.broker_doors import leave_out_doors
from mgpumanager.tools.containers import (
    container_targets,
    find_containers,
    place,
    with_container,
)
from mgpumanager.tools.containers import summary_lines as container_summary
from mgpumanager.tools.discover import (
    USUAL_PORTS,
    ServiceKind,
    Target,
    scan_targets,
    targets_to_probe,
)
from mgpumanager.tools.frontends import FRONT_END_PORTS, find_front_ends
from mgpumanager.tools.procfs import LocalSystem, ProcSystem
from mgpumanager.tools.proposal import (
    LISTEN,
    PRIORITY_WORD,
    Consumer,
    InitError,
    Plan,
    make_plan,
    one_line,
    read_gpu,
)
from mgpumanager.upstreams.containers import DockerClient
from mgpumanager.upstreams.gpu import GpuReading, NvmlApi

BROKER_PORT = int(LISTEN.rsplit(":", 1)[1])

# -- writing the registry -------------------------------------------------------------------


def _plain_ok(text: str, probe: str) -> bool:
    if not text or text != text.strip() or re.search(r"[#,\[\]{}&*!|>'\"%@`]|: |^[-?:]", text):
        return False
    try:
        return bool(yaml.safe_load(probe) == ({"k": text} if probe.startswith("k:") else [text]))
    except yaml.YAMLError:
        return False


def _scalar(value: Any, *, flow: bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    probe = f"[{text}]" if flow else f"k: {text}"
    return text if _plain_ok(text, probe) else quoted(text)


def quoted(text: str) -> str:
    """A YAML double-quoted scalar in plain ASCII: everything else escaped. (JSON's escapes
    are not enough: YAML reads a surrogate pair as two characters.)"""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def flow(value: Any) -> str:
    """`value` as one line of YAML flow style (keys are init's own identifiers)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    return _scalar(value, flow=True)


class _Doc:
    """Block-style YAML lines with comments, and the mapping they must read back as."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def comment(self, text: str, indent: int = 0) -> None:
        pad = " " * indent
        for line in textwrap.wrap(
            one_line(text, 10_000), width=98 - indent, break_on_hyphens=False
        ) or [""]:
            self.lines.append(f"{pad}# {line}".rstrip())

    def blank(self) -> None:
        self.lines.append("")

    def put(self, key: str, value: Any, indent: int = 0, note: str = "") -> None:
        pad = " " * indent
        shown = flow(value) if isinstance(value, dict | list) else _scalar(value, flow=False)
        line = f"{pad}{key}: {shown}"
        if note:
            line += f"  # {one_line(note)}"
        self.lines.append(line)

    def open(self, key: str, indent: int = 0, note: str = "") -> None:
        self.lines.append(f"{' ' * indent}{key}:" + (f"  # {one_line(note)}" if note else ""))

    def item(self, value: Any, indent: int, note: str = "") -> None:
        line = f"{' ' * indent}- {flow(value)}"
        self.lines.append(line + (f"  # {one_line(note)}" if note else ""))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _consumer_data(c: Consumer) -> dict[str, Any]:
    svc = c.service
    kind = svc.kind
    data: dict[str, Any] = {
        "type": {
            ServiceKind.MVOICE: "generic",
            ServiceKind.WHISPER: "command",
        }.get(kind, kind.value),
        "url": svc.target.url,
        "health": {
            "path": {ServiceKind.OLLAMA: "/api/version", ServiceKind.COMFYUI: "/system_stats"}.get(
                kind, "/health"
            )
        },
    }
    if kind is ServiceKind.MVOICE:
        data["paths"] = {"tts": {"path": "/api/synthesize"}, "stt": {"path": "/api/transcribe"}}
    if kind is ServiceKind.WHISPER:
        data["paths"] = {"stt": {"path": "/inference"}}
    data["vram_resident_mib"] = c.cost.mib
    if c.models:
        data["models"] = [
            {"name": m.name} if s is None else {"name": m.name, "vram_mib": s.mib}
            for m, s in c.models
        ]
    if kind is ServiceKind.MVOICE:
        data["unload"] = {"path": "/api/admin/unload", "body": {}}
        data["load"] = {"path": "/api/admin/load"}
    if kind is ServiceKind.WHISPER and svc.unit is not None and not svc.unit.user:
        data["unload"] = {"command": ["systemctl", "--no-ask-password", "stop", svc.unit.name]}
        data["load"] = {"command": ["systemctl", "--no-ask-password", "start", svc.unit.name]}
    if c.coexist:
        data["can_coexist_with"] = list(c.coexist)
    data["priority"] = c.priority
    if kind is ServiceKind.VLLM and not svc.sleep_mode:
        data["pinned"] = True
    if c.gpu_processes:
        data["gpu_processes"] = list(c.gpu_processes)
    with_container(kind, svc.container, data)
    return data


def devices_used(patterns: list[str], reading: GpuReading) -> list[int]:
    """The NVML indices of the devices where processes matching `patterns` hold memory: what
    a consumer on a box with several GPUs is proposed to be bound to."""
    return [
        d.index
        for d in reading.devices
        if any(any(pat in p.name for pat in patterns) for p in d.processes)
    ]


def _describe_service(c: Consumer) -> str:
    svc = c.service
    what = svc.kind.label + (f" {svc.version}" if svc.version else "")
    parts = [f"{what} at {svc.target.address}", "healthy" if svc.healthy else "NOT healthy"]
    if svc.unit is not None:
        parts.append(f"systemd {'user ' if svc.unit.user else ''}unit {svc.unit.name}")
    if svc.pid is not None:
        parts.append(f"pid {svc.pid}")
    state = {True: "loaded now", False: "not loaded now", None: "residency not told"}
    parts.append(state[svc.loaded])
    return "; ".join(parts)


def render(plan: Plan, written_at: dt.datetime | None = None) -> tuple[str, dict[str, Any]]:
    """The annotated registry, and the mapping it must read back as."""
    when = (written_at or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    r = plan.gpu.reading
    doc = _Doc()
    data: dict[str, Any] = {}
    doc.comment(f"Written by `mgpumanager init` on {when} from what this box showed.")
    doc.comment(
        f"GPU: {r.device}, {r.total_mib} MiB, {_in_use(r.used_mib)}. Found: "
        + (", ".join(f"{c.name} ({c.service.kind.label})" for c in plan.consumers) or "nothing")
        + "."
    )
    doc.comment(
        "Sizes say where they come from: measured (the GPU's per-process figures now), "
        "reported (the service's own figure), or CHECK (a guess: read it before serving). "
        "After editing: mgpumanager check-config FILE."
    )
    doc.blank()
    data["listen"] = LISTEN
    doc.put("listen", LISTEN, note="the broker's own address")
    _write_front_ends(doc, plan)
    gpu: dict[str, Any] = {"backend": plan.gpu.backend}
    if plan.gpu.sim_url is not None:
        gpu["sim_url"] = plan.gpu.sim_url
    if plan.gpu.backend == "static":
        gpu["total_mib"] = r.total_mib
    gpu["safety_margin_mib"] = plan.margin_mib
    data["gpu"] = gpu
    doc.open("gpu")
    doc.put("backend", gpu["backend"], 2, note=f"{one_line(r.device, 60)}, {r.total_mib} MiB")
    if "sim_url" in gpu:
        doc.put("sim_url", gpu["sim_url"], 2)
    if "total_mib" in gpu:
        doc.put("total_mib", gpu["total_mib"], 2, note="the card's size, as given: never read")
    doc.put("safety_margin_mib", plan.margin_mib, 2, note="always kept free")
    doc.blank()
    if plan.routing:
        data["routing"] = dict(plan.routing)
        doc.comment("Each kind found goes to one consumer; a kind left out answers no_consumer.")
        doc.open("routing")
        for kind, name in plan.routing.items():
            others = plan.alternatives.get(kind)
            doc.put(kind, name, 2, note=f"also able: {', '.join(others)}" if others else "")
    if plan.audio_proxy is not None:
        data["audio_proxy"] = plan.audio_proxy
        doc.put("audio_proxy", plan.audio_proxy, note="its generated audio under /audio/*")
    doc.blank()
    doc.comment(
        "Priorities: speech 3, chat 2, images 1. can_coexist_with: every pair whose sizes fit "
        f"on the card together, {plan.usable_mib} MiB with the margin."
    )
    data["consumers"] = {}
    if not plan.consumers:
        doc.put("consumers", {})
    else:
        doc.open("consumers")
    for c in plan.consumers:
        cdata = _consumer_data(c)
        if len(r.devices) > 1 and (placed := devices_used(c.gpu_processes, r)):
            cdata["devices"] = placed
        data["consumers"][c.name] = cdata
        _write_consumer(doc, c, cdata, plan)
    return doc.text(), data


def _write_front_ends(doc: _Doc, plan: Plan) -> None:
    """The origins of the web front ends found, proposed for auth.allowed_origins, commented."""
    if not plan.front_ends:
        return
    found = ", ".join(f"{f.name} on {f.target.address}" for f in plan.front_ends)
    doc.comment(
        f"Front ends found: {found}. A web page of another origin may not use the broker "
        "(403 forbidden) unless listed here; a front end whose server talks to the broker "
        "(Open WebUI's does by default) sends no Origin and needs nothing. Uncomment for "
        "pages that call the broker from the browser:"
    )
    doc.lines.append("# auth:")
    doc.lines.append("#   allowed_origins:")
    for f in plan.front_ends:
        for origin in f.origins:
            doc.lines.append(f"#     - {origin}  # {f.name}")


def _write_consumer(doc: _Doc, c: Consumer, cdata: dict[str, Any], plan: Plan) -> None:
    doc.open(c.name, 2)
    doc.comment(_describe_service(c), 4)
    fd = c.front_door
    if fd is not None:
        doc.comment(
            "Suggested front door: the broker answers on this service's address, so its "
            f"clients go through the broker unchanged. First move {c.service.kind.label} to "
            f"{fd.moved_url.removeprefix('http://')} ({fd.how}), then set url: "
            f"{fd.moved_url} and:",
            4,
        )
        doc.lines.append(f"    # front_door: {fd.listen}")
    notes = {
        "vram_resident_mib": c.cost.note,
        "priority": PRIORITY_WORD[c.priority],
        "pinned": "CHECK: no sleep mode, so nothing can unload it",
        "can_coexist_with": "fit together with it",
        "gpu_processes": "" if c.patterns_seen else "CHECK: usual names, not seen on the GPU now",
        "container": "stopped to unload, started to load (its processes on the GPU: this one's)",
        "devices": "the GPUs (NVML index) its processes use now; CHECK: the ones it may use",
    }
    if c.service.kind is ServiceKind.WHISPER and "unload" in cdata:
        notes["unload"] = "whisper-server has no unload call: stopping its unit frees the card"
    for key, value in cdata.items():
        if key == "models":
            doc.open("models", 4)
            for (_, s), entry in zip(c.models, value, strict=True):
                note = s.note if s is not None else "size not known (not loaded alone)"
                doc.item(entry, 6, note=note)
            continue
        if key == "paths":
            doc.open("paths", 4)
            for kind, call in value.items():
                doc.put(kind, call, 6)
            continue
        doc.put(key, value, 4, note=notes.get(key, ""))


def registry_text(plan: Plan, written_at: dt.datetime | None = None) -> str:
    """The registry, checked: it reads back as the mapping init meant, and the registry's own
    loader accepts it. Anything else is a bug here, never a file written."""
    text, data = render(plan, written_at)
    if yaml.safe_load(text) != data:
        raise InitError("internal error: the written YAML does not read back as planned")
    try:
        parse_config(text, "<mgpumanager init>")
    except ConfigError as exc:
        raise InitError(f"internal error: the registry init wrote does not pass: {exc}") from exc
    return text


# -- the summary ----------------------------------------------------------------------------


def _in_use(used_mib: int | None) -> str:
    """What was in use on the card, where it was read (a static card is not)."""
    return "memory in use not read" if used_mib is None else f"{used_mib} MiB in use when read"


def summary(plan: Plan, out: Path) -> str:
    r = plan.gpu.reading
    lines = [
        f"mgpumanager init: wrote {out} ({len(plan.consumers)} consumers; check-config: OK)",
        "",
        f"GPU  {r.device}: {r.total_mib} MiB, {_in_use(r.used_mib)} ({plan.gpu.backend})",
        "",
        "Found:",
    ]
    for c in plan.consumers:
        svc = c.service
        health = "healthy" if svc.healthy else "NOT healthy"
        lines.append(
            f"  {c.name:<12} {svc.kind.label:<18} {svc.target.url:<24} {health:<11} "
            f"{c.cost.mib} MiB {c.cost.how}"
        )
    for s in plan.scan.services:
        if s.kind is ServiceKind.BROKER:
            lines.append(f"  {'-':<12} {s.kind.label:<18} {s.target.url:<24} (left out)")
    for u in plan.scan.unidentified:
        lines.append(f"  {'?':<12} {'not identified':<18} {u.target.url:<24} {u.detail}")
    for t in plan.scan.silent:
        lines.append(f"  {'-':<12} {'nothing answers':<18} {t.url}")
    for f in plan.front_ends:
        lines.append(f"  {'-':<12} {f.name:<18} {f.target.url:<24} a front end, not a consumer")
    if plan.containers is not None:
        lines += container_summary(plan.containers, r)
    lines += ["", "Proposed:"]
    routes = ", ".join(f"{k} -> {v}" for k, v in plan.routing.items())
    lines.append(f"  routing      {routes or 'none'}")
    pairs = sorted({tuple(sorted((c.name, o))) for c in plan.consumers for o in c.coexist})
    costs = {c.name: c.cost.mib for c in plan.consumers}
    shown = ", ".join(f"{a} + {b} ({costs[a] + costs[b]} MiB)" for a, b in pairs)
    lines.append(f"  coexistence  {shown or 'none (no two fit together)'}")
    by_priority: dict[int, list[str]] = {}
    for c in plan.consumers:
        by_priority.setdefault(c.priority, []).append(c.name)
    lines.append(
        "  priorities   "
        + ", ".join(
            f"{PRIORITY_WORD[p]} {p} ({', '.join(names)})"
            for p, names in sorted(by_priority.items(), reverse=True)
        )
    )
    lines.append("  front doors  (comments in the file; each needs the service moved first)")
    for c in plan.consumers:
        if c.front_door is not None:
            fd = c.front_door
            lines.append(
                f"    {c.name}: broker on {fd.listen}, {c.service.kind.label} moves to "
                f"{fd.moved_url.removeprefix('http://')}: {fd.how}"
            )
    if plan.front_ends:
        origins = ", ".join(o for f in plan.front_ends for o in f.origins)
        lines.append(
            f"  allowed_origins  {origins} (commented: only for pages that call the broker "
            "from the browser)"
        )
    lines += ["", "Check by hand:"]
    lines += [f"  - {one_line(line, 400)}" for line in plan.checks] or ["  nothing"]
    lines += [
        "",
        f"Next: read {out}, then `mgpumanager check-config {out}` after any edit, and",
        "`mgpumanager serve --config FILE` (or `make deploy`).",
    ]
    return "\n".join(lines) + "\n"


# -- the command ----------------------------------------------------------------------------


def refuse_overwrite(path: Path, force: bool) -> bool:
    """Whether `path` exists; InitError (exit status 2) when it does and `force` is not set."""
    exists = path.exists() or path.is_symlink()
    if exists and not force:
        raise InitError(f"{path} exists: pass --force to replace it (it is kept as {path}.bak)", 2)
    return exists


def write_registry(path: Path, text: str, *, force: bool) -> Path | None:
    """Write `text` to `path` atomically; an existing file is kept as `path.bak` (and only
    with `force`). Returns the backup's path, if one was made."""
    exists = refuse_overwrite(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.init-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    backup = None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if exists:
            st = path.stat()
            try:  # keep who may read it (the registry under /etc is root:mgpumanager 0640)
                os.chown(tmp, st.st_uid, st.st_gid)
                os.chmod(tmp, st.st_mode & 0o777)
            except OSError:
                pass
            backup = path.with_name(path.name + ".bak")
            os.replace(path, backup)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return backup


async def run_init(
    *,
    scan: Sequence[Target] = (),
    out: Path,
    force: bool = False,
    gpu_sim: str | None = None,
    total_mib: int | None = None,
    usual_ports: Sequence[int] = USUAL_PORTS,
    front_end_ports: Sequence[int] | None = None,  # None: FRONT_END_PORTS, or () without usual
    system: LocalSystem | None = None,
    written_at: dt.datetime | None = None,
    nvml: NvmlApi | None = None,
    proc_root: Path = Path("/proc"),
    docker: DockerClient | None = None,
) -> tuple[Plan, str]:
    """Everything `mgpumanager init` does but printing: returns the plan and the summary."""
    await asyncio.to_thread(refuse_overwrite, out, force)  # before any probing
    gpu = await read_gpu(gpu_sim, nvml=nvml, proc_root=proc_root, total_mib=total_mib)
    system = system if system is not None else ProcSystem(proc_root)
    containers = await find_containers(docker, proc_root)
    targets = targets_to_probe(scan, usual_ports)
    found = await scan_targets(targets + container_targets(containers, targets), system=system)
    doors = await leave_out_doors(found)  # a broker's front doors are no services
    found.services = [place(s, containers, proc_root) for s in found.services]
    if front_end_ports is None:
        front_end_ports = FRONT_END_PORTS if usual_ports else ()
    fronts = await find_front_ends(
        [Target("127.0.0.1", port) for port in front_end_ports]
        + [u.target for u in found.unidentified]
    )
    # A front end is identified now: not reported as an unknown service.
    seen = {(f.target.host, f.target.port) for f in fronts}
    found.unidentified = [
        u for u in found.unidentified if (u.target.host, u.target.port) not in seen
    ]
    plan = make_plan(found, gpu, system)
    plan.front_ends = fronts
    plan.checks.extend(
        f"{d.target.address}: the front door of the mgpumanager broker at {d.broker.address} "
        f"(its consumer {d.consumer}): left out"
        for d in doors
    )
    plan.containers = containers
    if not plan.consumers:
        probed = ", ".join(t.address for t in targets_to_probe(scan, usual_ports))
        extra = "".join(f"\n  {line}" for line in plan.checks)
        raise InitError(
            f"found no GPU service on {probed}: nothing written. Name the ports they use with "
            f"--scan HOST:PORT{extra}"
        )
    text = registry_text(plan, written_at)
    backup = await asyncio.to_thread(write_registry, out, text, force=force)
    report = summary(plan, out)
    if backup is not None:
        report += f"The previous {out} is kept as {backup}.\n"
    return plan, report


def main_init(args: Any) -> int:
    """The CLI's `init`: argparse's namespace in, an exit status out."""
    try:
        _, report = asyncio.run(
            run_init(
                scan=args.scan,
                out=args.out,
                force=args.force,
                gpu_sim=args.gpu_sim,
                total_mib=args.total_mib,
                # and the broker's own default port: a broker there says where its doors are
                usual_ports=() if args.no_usual_ports else (*USUAL_PORTS, BROKER_PORT),
            )
        )
    except InitError as exc:
        print(f"mgpumanager init: {exc}", file=sys.stderr)
        return exc.status
    print(report, end="")
    return 0


__all__ = [
    "InitError",
    "flow",
    "main_init",
    "quoted",
    "registry_text",
    "render",
    "run_init",
    "summary",
    "write_registry",
]
