"""What `mgpumanager init` sees of Docker: the running containers (image, ports, GPU), the
addresses to probe for them, which found service runs in which container, and the registry
keys that follow (`container: NAME`; `type: docker` for a service with no type of its own).

A service is placed in a container by the container id in the cgroup of the process listening
on its port (a host-network container, or any whose process init can see), else by the host
port the container publishes (a bridge network: the listener is docker-proxy, on the host).
Without Docker (no socket, no permission) init works as before and says so.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgpumanager.tools.discover import Service, ServiceKind, Target
from mgpumanager.upstreams.containers import (
    Container,
    DockerClient,
    DockerError,
    container_id_of,
    container_tag,
)
from mgpumanager.upstreams.gpu import GpuReading

log = logging.getLogger(__name__)


@dataclass
class Containers:
    """The running containers init found, or why it found none."""

    found: list[Container] = dataclasses.field(default_factory=list)
    listening: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # by id
    unavailable: str | None = None  # Docker could not be asked: why

    def by_id(self, container_id: str) -> Container | None:
        return next((c for c in self.found if c.id == container_id), None)

    def by_port(self, port: int) -> Container | None:
        return next((c for c in self.found if port in c.ports), None)

    def ports(self, c: Container) -> tuple[int, ...]:
        """Where it answers: the ports it publishes, or (host network) its processes listen on."""
        return c.ports or self.listening.get(c.id, ())


async def find_containers(
    client: DockerClient | None = None, proc_root: Path = Path("/proc")
) -> Containers:
    client = client or DockerClient()
    try:
        found = await client.running()
    except DockerError as exc:
        return Containers(unavailable=str(exc))
    listening = listening_ports_by_container(proc_root, {c.id for c in found})
    return Containers(sorted(found, key=lambda c: c.name), listening)


def listening_ports_by_container(proc_root: Path, ids: set[str]) -> dict[str, tuple[int, ...]]:
    """TCP ports the processes of each container listen on, as this network namespace sees them
    (a host-network container's are the host's)."""
    inodes: dict[str, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_root / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 10 and fields[3] == "0A":  # LISTEN
                inodes[f"socket:[{fields[9]}]"] = int(fields[1].rpartition(":")[2], 16)
    ports: dict[str, set[int]] = {}
    try:
        pids = [p for p in proc_root.iterdir() if p.name.isdigit()]
    except OSError:
        return {}
    for proc in pids:
        cid = container_id_of(int(proc.name), proc_root)
        if cid is None or cid not in ids:
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                port = inodes.get(str(fd.readlink()))
            except OSError:
                continue
            if port is not None:
                ports.setdefault(cid, set()).add(port)
    return {cid: tuple(sorted(p)) for cid, p in ports.items()}


def container_targets(containers: Containers, already: Sequence[Target]) -> list[Target]:
    """The addresses of running containers not probed already (probed like --scan ones)."""
    seen = {(t.host, t.port) for t in already}
    out = []
    for c in containers.found:
        for port in containers.ports(c):
            if ("127.0.0.1", port) not in seen:
                seen.add(("127.0.0.1", port))
                out.append(Target("127.0.0.1", port))
    return out


def place(service: Service, containers: Containers, proc_root: Path = Path("/proc")) -> Service:
    """`service` with the container it runs in, where it runs in one."""
    if not service.target.local:
        return service
    found = None
    if service.pid is not None:
        cid = container_id_of(service.pid, proc_root)
        found = containers.by_id(cid) if cid is not None else None
    found = found or containers.by_port(service.target.port)
    if found is None:
        return service
    note = (
        f"runs in container {found.name} ({found.image}): `container: {found.name}` stops it "
        "to unload and starts it to load; without that line it is unloaded through its own API"
    )
    return dataclasses.replace(service, container=found.name, notes=(*service.notes, note))


def with_container(kind: ServiceKind, container: str | None, data: dict[str, Any]) -> None:
    """Registry keys for a service in a container: `container: NAME` after its url; a
    whisper.cpp server, which has no unload of its own, is `type: docker`; a written unload
    or load gives way to the container's stop and start."""
    if container is None:
        return
    if kind is ServiceKind.WHISPER:
        data["type"] = "docker"
    data.pop("unload", None)
    data.pop("load", None)
    tag = container_tag(container)
    items = list(data.items())
    data.clear()
    for key, value in items:
        if key == "gpu_processes":
            value = [p for p in value if p != tag] or None  # implied by `container:`
            if value is None:
                continue
        data[key] = value
        if key == "url":
            data["container"] = container


def summary_lines(containers: Containers, reading: GpuReading) -> list[str]:
    """The containers init saw: image, ports (published, or host network), GPU."""
    if containers.unavailable is not None:
        return ["", f"Containers: not listed ({containers.unavailable})"]
    if not containers.found:
        return ["", "Containers: none running"]
    lines = ["", "Containers:"]
    for c in containers.found:
        ports = ", ".join(str(p) for p in containers.ports(c)) or "none seen"
        where = f"host network, listening on {ports}" if c.host_network else f"ports {ports}"
        held = [p.used_mib or 0 for p in reading.processes if container_tag(c.name) in p.name]
        gpu = (
            f"GPU: {sum(held)} MiB now"
            if held
            else ("GPU: requested, nothing held now" if c.gpu else "no GPU")
        )
        lines.append(f"  {c.name:<16} {c.image:<28} {where}; {gpu}")
    return lines


__all__ = [
    "Containers",
    "container_targets",
    "find_containers",
    "listening_ports_by_container",
    "place",
    "summary_lines",
    "with_container",
]
