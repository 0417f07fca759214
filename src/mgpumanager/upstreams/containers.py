"""Docker containers: the Engine API on its unix socket, and which container a process runs in.

Three users:
- the `container:` driver (adapters/docker.py) stops and starts a consumer's container;
- the GPU reader names a GPU process by its container (`[container:NAME]` after its command
  line), read from `/proc/PID/cgroup`: NVML reports host PIDs, and a broker on the host (or in
  a container run with `--pid host`) sees their cgroups;
- `init` lists the running containers (image, ports, GPU) and `check-config` refuses a
  `container:` that does not exist.

The client is aiohttp's `UnixConnector` rather than aiodocker or docker-py: the broker needs five
calls (ping, inspect, list, start, stop), aiohttp is already its HTTP stack (one set of
timeouts and exception translations, no new dependency), and docker-py is synchronous. The GPU
reader runs in a thread and check-config outside any event loop, so they use a plain blocking
`http.client` call over the same socket (the reader's cached per container).

The socket is `DOCKER_HOST` when it names one (`unix:///run/user/1000/docker.sock`: rootless),
else /var/run/docker.sock. The API is used unversioned: the daemon answers with its own version,
and only fields present since API 1.25 are read.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from mgpumanager.registry import CONTAINER_TAG, Config

DEFAULT_SOCKET = "/var/run/docker.sock"
API_TIMEOUT_S = 10.0

# A container id in a cgroup path: cgroupfs (`/docker/<id>`), systemd's driver
# (`/system.slice/docker-<id>.scope`), containerd / CRI-O (`cri-containerd-<id>.scope`,
# `crio-<id>`), podman (`libpod-<id>.scope`).
_CGROUP_ID = re.compile(
    r"(?:^|/)(?:docker-|cri-containerd-|crio-|libpod-)?([0-9a-f]{64})(?:\.scope)?(?:/|$)"
)


def container_tag(name: str) -> str:
    """How a GPU process in container `name` is named after its command line, and so what a
    consumer with `container: name` is measured by."""
    return CONTAINER_TAG.format(name)


def docker_socket(env: Mapping[str, str] | None = None) -> str:
    """The Engine API's unix socket: DOCKER_HOST's when it is a unix:// one."""
    host = (env if env is not None else os.environ).get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host.removeprefix("unix://")
    return DEFAULT_SOCKET


class DockerError(Exception):
    """The Engine API cannot be reached, or answered an error; the message says which."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NoSuchContainer(DockerError):
    pass


@dataclass(frozen=True)
class Container:
    """What the broker reads of one container (`GET /containers/NAME/json`)."""

    id: str
    name: str
    image: str
    status: str  # created, running, paused, restarting, removing, exited, dead
    exit_code: int | None = None
    host_network: bool = False
    ports: tuple[int, ...] = ()  # host ports published (TCP)
    gpu: bool = False  # asks for GPUs (--gpus, the nvidia runtime, NVIDIA_VISIBLE_DEVICES)

    @property
    def running(self) -> bool:
        return self.status in ("running", "restarting")

    @classmethod
    def from_inspect(cls, data: Mapping[str, Any]) -> Container:
        state = data.get("State") or {}
        host_config = data.get("HostConfig") or {}
        config = data.get("Config") or {}
        ports: set[int] = set()
        published = (data.get("NetworkSettings") or {}).get("Ports") or {}
        for spec, bindings in published.items():
            if str(spec).endswith("/tcp"):
                for b in bindings or []:
                    if str(b.get("HostPort", "")).isdigit():
                        ports.add(int(b["HostPort"]))
        requests = host_config.get("DeviceRequests") or []
        visible = [str(e) for e in config.get("Env") or [] if "NVIDIA_VISIBLE_DEVICES=" in str(e)]
        gpu = (
            any("gpu" in _flat(r.get("Capabilities")) for r in requests)
            or host_config.get("Runtime") == "nvidia"
            or any(v.split("=", 1)[1] not in ("", "void", "none") for v in visible)
        )
        return cls(
            id=str(data.get("Id", "")),
            name=str(data.get("Name", "")).lstrip("/"),
            image=str(config.get("Image") or data.get("Image") or ""),
            status=str(state.get("Status", "unknown")),
            exit_code=state.get("ExitCode"),
            host_network=host_config.get("NetworkMode") == "host",
            ports=tuple(sorted(ports)),
            gpu=gpu,
        )


def _flat(value: Any) -> list[str]:
    """DeviceRequests' Capabilities: a list of lists of words (`[["gpu"]]`)."""
    out: list[str] = []
    for item in value or []:
        if isinstance(item, list):
            out.extend(str(v) for v in item)
        else:
            out.append(str(item))
    return out


class DockerClient:
    """The few Engine API calls the broker makes. A session per call: they are rare (probes
    every few seconds, a stop or a start per swap) and nothing is left to close."""

    def __init__(self, socket_path: str | None = None, timeout_s: float = API_TIMEOUT_S) -> None:
        self.socket_path = socket_path or docker_socket()
        self.timeout_s = timeout_s

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        ok: Sequence[int] = (200,),
    ) -> tuple[int, Any]:
        limit = timeout_s if timeout_s is not None else self.timeout_s
        try:
            async with asyncio.timeout(limit):
                connector = aiohttp.UnixConnector(path=self.socket_path)
                # The host part is ignored on a unix socket; "docker" as the CLI sends.
                async with (
                    aiohttp.ClientSession(connector=connector) as session,
                    session.request(method, f"http://docker{path}", params=params) as resp,
                ):
                    text = await resp.text()
                    status = resp.status
        except TimeoutError:
            raise DockerError(f"Docker: {method} {path} took longer than {limit:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DockerError(f"Docker is not reachable at {self.socket_path}: {exc}") from None
        body: Any = None
        if text.strip():
            try:
                body = json.loads(text)
            except json.JSONDecodeError:
                body = {"message": text[:300]}
        if status not in ok:
            message = body.get("message", "") if isinstance(body, dict) else ""
            error = NoSuchContainer if status == 404 else DockerError
            raise error(f"Docker: {method} {path} answered {status}: {message}", status)
        return status, body

    async def ping(self) -> None:
        await self._call("GET", "/_ping", timeout_s=min(self.timeout_s, 2.0))

    async def inspect(self, name: str) -> Container:
        _, body = await self._call("GET", f"/containers/{quote(name, safe='')}/json")
        return Container.from_inspect(body)

    async def start(self, name: str) -> bool:
        """Start it; False when it was running already (304)."""
        status, _ = await self._call(
            "POST", f"/containers/{quote(name, safe='')}/start", ok=(204, 304)
        )
        return status == 204

    async def stop(self, name: str, grace_s: float) -> bool:
        """Its STOPSIGNAL (SIGTERM), SIGKILL after `grace_s`; answers once it exited. False
        when it was stopped already (304)."""
        status, _ = await self._call(
            "POST",
            f"/containers/{quote(name, safe='')}/stop",
            params={"t": str(max(0, round(grace_s)))},
            timeout_s=grace_s + self.timeout_s,
            ok=(204, 304),
        )
        return status == 204

    async def running(self) -> list[Container]:
        """Every running container, inspected (the list call has no GPU requests)."""
        _, listed = await self._call("GET", "/containers/json")
        found = await asyncio.gather(
            *(self.inspect(str(c.get("Id"))) for c in listed or []), return_exceptions=True
        )
        return [c for c in found if isinstance(c, Container) and c.running]


# -- blocking calls: the GPU reader's thread, check-config -----------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout_s: float) -> None:
        super().__init__("docker", timeout=timeout_s)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _get(socket_path: str, path: str, timeout_s: float) -> tuple[int, bytes]:
    """One blocking GET on the Engine API's socket."""
    conn = _UnixHTTPConnection(socket_path, timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- which container a process runs in -------------------------------------------------------


def container_id_of(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The full id of the container `pid` runs in, from its cgroup path; None for a process
    on the host (or one that is gone)."""
    try:
        lines = (proc_root / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        m = _CGROUP_ID.search(line.split(":", 2)[-1])
        if m:
            return m.group(1)
    return None


class ContainerNames:
    """Container id -> name, for the GPU reader. Blocking calls on the Docker socket, cached:
    a known id is never asked again, a failed lookup not for `retry_s`. Without Docker, a
    process's container goes by its short id."""

    def __init__(
        self, socket_path: str | None = None, *, timeout_s: float = 0.5, retry_s: float = 30.0
    ) -> None:
        self.socket_path = socket_path or docker_socket()
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._names: dict[str, str] = {}
        self._failed: dict[str, float] = {}

    def name_of(self, container_id: str) -> str:
        known = self._names.get(container_id)
        if known is not None:
            return known
        failed_at = self._failed.get(container_id)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_s:
            return container_id[:12]
        name = self._lookup(container_id)
        if name is None:
            self._failed[container_id] = time.monotonic()
            return container_id[:12]
        self._names[container_id] = name
        self._failed.pop(container_id, None)
        return name

    def _lookup(self, container_id: str) -> str | None:
        try:
            status, body = _get(
                self.socket_path, f"/containers/{container_id}/json", self.timeout_s
            )
            name = json.loads(body).get("Name") if status == 200 else None
        except (OSError, http.client.HTTPException, ValueError, AttributeError):
            return None
        return str(name).lstrip("/") if name else None


def tag_process(name: str, pid: int | None, names: ContainerNames | None, proc_root: Path) -> str:
    """`name` (a GPU process's command line) with its container's tag, where it runs in one."""
    if pid is None:
        return name
    container_id = container_id_of(pid, proc_root)
    if container_id is None:
        return name
    label = names.name_of(container_id) if names is not None else container_id[:12]
    return f"{name} {container_tag(label)}"


# -- check-config ----------------------------------------------------------------------------


def missing_containers(
    wanted: Mapping[str, str], socket_path: str | None = None, timeout_s: float = 2.0
) -> tuple[list[str], str | None]:
    """For `{consumer: container}`: the problems (one per container that does not exist), and
    a note when Docker could not be asked at all (then nothing is refused). Blocking: the CLI's
    check-config may run inside another program's event loop."""
    if not wanted:
        return [], None
    path = socket_path or docker_socket()
    try:
        _get(path, "/_ping", timeout_s)
    except (OSError, http.client.HTTPException) as exc:
        return [], f"containers not checked: Docker is not reachable at {path} ({exc})"
    problems = []
    for consumer, name in wanted.items():
        try:
            status, _ = _get(path, f"/containers/{quote(name, safe='')}/json", timeout_s)
        except (OSError, http.client.HTTPException) as exc:
            problems.append(f"consumers.{consumer}.container: Docker did not answer ({exc})")
            continue
        if status == 404:
            problems.append(
                f"consumers.{consumer}.container: no container named {name!r} "
                "(docker ps -a lists them)"
            )
    return problems, None


def check_containers(config: Config, source: object) -> bool:
    """check-config's part: False (after printing why) when a `container:` names none that
    exists; where Docker cannot be asked, a note, and True."""
    wanted = {n: c.container for n, c in config.consumers.items() if c.container is not None}
    problems, note = missing_containers(wanted)
    if note is not None:
        print(f"{source}: {note}", file=sys.stderr)
    for line in problems:
        print(f"{source}: {line}", file=sys.stderr)
    return not problems


__all__ = [
    "Container",
    "ContainerNames",
    "DockerClient",
    "DockerError",
    "NoSuchContainer",
    "check_containers",
    "container_id_of",
    "container_tag",
    "docker_socket",
    "missing_containers",
    "tag_process",
]
