"""The cluster on Ray (the `ray` extra; the only module that imports Ray, and only when a
function here runs, so importing it needs no Ray).

Each GPU host joins a Ray cluster offering one `mgpu_host` resource
(`ray start --resources='{"mgpu_host": 1}'`). `mgpumanager cluster` places, on every such node,
one front (`HostFrontService`, an async actor holding `resources={"mgpu_host": 1}` and
`num_gpus=0`, so Ray never sets `CUDA_VISIBLE_DEVICES`) that listens beside that host's broker
and forwards to it over loopback, and one named actor (`DirectoryService`, `mgpu-directory`)
where the fronts publish their brokers' statuses and read everyone's. Ray places and restarts
actors and carries nothing of the requests: those go front to front over HTTP (front.py says
why the fronts are aiohttp and not Serve's proxy).

`local_cluster(n)` does the same on one machine: `ray.cluster_utils.Cluster` with `n` nodes,
each a simulated host (local.py) whose broker listens on a free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mgpumanager.cluster.front import PERIOD_S, Front, Published
from mgpumanager.cluster.local import SimHost, start_host

NAMESPACE = "mgpumanager"
DIRECTORY = "mgpu-directory"
HOST_RESOURCE = "mgpu_host"
INSTALL_HINT = "the cluster needs Ray: pip install 'mgpumanager[ray]'"


class RayMissing(RuntimeError):
    """The `ray` extra is not installed."""


def import_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise RayMissing(INSTALL_HINT) from exc


class DirectoryService:
    """The named actor where every front publishes its broker's status and reads them all.
    Soft state: an entry is as old as its last publish, and the fronts judge the age."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, Mapping[str, Any] | None, float]] = {}

    def publish(self, name: str, url: str, status: Mapping[str, Any] | None) -> None:
        self.entries[name] = (url, status, time.monotonic())

    def read(self) -> list[tuple[str, str, Mapping[str, Any] | None, float]]:
        now = time.monotonic()
        return [(n, u, s, now - t) for n, (u, s, t) in sorted(self.entries.items())]


class RayDirectory:
    """front.Directory over the named actor's handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def publish(self, name: str, url: str, status: Mapping[str, Any] | None) -> None:
        await self.handle.publish.remote(name, url, status)

    async def read(self) -> list[Published]:
        rows = await self.handle.read.remote()
        return [Published(*row) for row in rows]


@dataclass(frozen=True)
class HostPlan:
    """Where one host's front goes: its Ray node, its broker, where it listens, and the
    address the other fronts reach it at (None: the node's own address)."""

    name: str
    node_id: str
    broker_url: str
    listen_host: str = "0.0.0.0"
    listen_port: int = 8780
    advertise_host: str | None = None


class HostFrontService:
    """One host's front, as an async Ray actor on that host's node."""

    def __init__(self, plan: HostPlan, period_s: float, token: str | None) -> None:
        self.plan = plan
        self.period_s = period_s
        self.token = token
        self.front: Front | None = None

    async def start(self) -> str:
        ray = import_ray()
        directory = RayDirectory(ray.get_actor(DIRECTORY, namespace=NAMESPACE))
        plan = self.plan
        self.front = Front(
            plan.name, plan.broker_url, directory, period_s=self.period_s, token=self.token
        )
        url = await self.front.start(plan.listen_host, plan.listen_port)
        advertise = plan.advertise_host
        if advertise is None and plan.listen_host in ("0.0.0.0", "::"):
            advertise = ray.util.get_node_ip_address()
        if advertise is not None:
            port = url.rsplit(":", 1)[1]
            self.front.url = f"http://{advertise}:{port}"
        return self.front.url

    async def forwarded(self) -> dict[str, int]:
        return dict(self.front.forwarded) if self.front is not None else {}

    async def stop(self) -> None:
        if self.front is not None:
            await self.front.stop()


@dataclass
class Deployment:
    """The actors placed: the directory and each host's front (name -> handle, URL)."""

    directory: Any
    fronts: dict[str, Any] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)


def _place(
    plans: Sequence[HostPlan], period_s: float, token: str | None
) -> tuple[Any, dict[str, Any]]:
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    directory = (
        ray.remote(DirectoryService)
        .options(name=DIRECTORY, namespace=NAMESPACE, num_cpus=0, get_if_exists=True)
        .remote()
    )
    front_actor = ray.remote(HostFrontService)
    fronts = {}
    for plan in plans:
        fronts[plan.name] = front_actor.options(
            name=f"mgpu-front-{plan.name}",
            namespace=NAMESPACE,
            num_cpus=0,
            num_gpus=0,  # Ray never touches CUDA_VISIBLE_DEVICES
            resources={HOST_RESOURCE: 1},
            scheduling_strategy=NodeAffinitySchedulingStrategy(plan.node_id, soft=False),
            max_concurrency=1000,
        ).remote(plan, period_s, token)
    return directory, fronts


async def deploy_async(
    plans: Sequence[HostPlan], period_s: float = PERIOD_S, token: str | None = None
) -> Deployment:
    directory, fronts = _place(plans, period_s, token)
    urls = await asyncio.gather(*(handle.start.remote() for handle in fronts.values()))
    return Deployment(directory, fronts, dict(zip(fronts, urls, strict=True)))


def deploy(
    plans: Sequence[HostPlan], period_s: float = PERIOD_S, token: str | None = None
) -> Deployment:
    ray = import_ray()
    directory, fronts = _place(plans, period_s, token)
    urls = ray.get([handle.start.remote() for handle in fronts.values()])
    return Deployment(directory, fronts, dict(zip(fronts, urls, strict=True)))


def plans_from_nodes(
    nodes: Sequence[Mapping[str, Any]], broker_url: str, listen_host: str, listen_port: int
) -> list[HostPlan]:
    """One plan per live node offering `mgpu_host`, named by its host name (its address
    where two share one)."""
    hosts = [n for n in nodes if n.get("Alive") and n.get("Resources", {}).get(HOST_RESOURCE)]
    names = [str(n.get("NodeManagerHostname") or n["NodeManagerAddress"]) for n in hosts]
    plans = []
    for node, name in zip(hosts, names, strict=True):
        if names.count(name) > 1:
            name = str(node["NodeManagerAddress"])
        plans.append(HostPlan(name, node["NodeID"], broker_url, listen_host, listen_port))
    return plans


def banner(urls: Mapping[str, str]) -> str:
    first = next(iter(urls.values()), "http://HOST:8780")
    lines = ["", "mgpumanager cluster — one front per host, each before its own broker", ""]
    lines += [f"  {name:<16} {url}" for name, url in urls.items()]
    lines += [
        "",
        "Point clients at any host's front (all are the same cluster):",
        f"  Ollama clients   OLLAMA_HOST={first}",
        f"  OpenAI SDKs      base_url={first}/v1",
        f"  ComfyUI clients  {first}/upstream/comfyui",
        f"  every host       curl -s {first}/v1/status ; hosts' dashboards: {first}/cluster/",
        "",
        "Ctrl-C stops the fronts; every broker keeps serving its own port.",
        "",
    ]
    return "\n".join(lines)


def run_cluster(
    address: str, broker_url: str, listen: str, period_s: float, token: str | None
) -> int:
    """`mgpumanager cluster`: the fronts on a running Ray cluster, until Ctrl-C."""
    ray = import_ray()
    host, _, port = listen.rpartition(":")
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    try:
        plans = plans_from_nodes(ray.nodes(), broker_url, host.strip("[]") or "0.0.0.0", int(port))
        if not plans:
            print(
                "mgpumanager cluster: no node offers the mgpu_host resource; on each GPU box: "
                "ray start --address=HEAD:6379 --resources='{\"mgpu_host\": 1}' --num-gpus=0"
            )
            return 2
        deployment = deploy(plans, period_s, token)
        print(banner(deployment.urls), flush=True)
        _wait_for_signal()
        for handle in deployment.fronts.values():
            with contextlib.suppress(Exception):
                ray.get(handle.stop.remote(), timeout=10)
        return 0
    finally:
        ray.shutdown()


def _wait_for_signal() -> None:
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    while not stop:
        time.sleep(0.2)


@dataclass
class LocalCluster:
    """A Ray cluster of simulated hosts on one machine: `nodes[name]` is that host's Ray node
    (the first one the head), `hosts[name]` its card, fakes and broker."""

    ray_cluster: Any
    nodes: dict[str, Any]
    hosts: dict[str, SimHost]
    deployment: Deployment

    @property
    def urls(self) -> dict[str, str]:
        return self.deployment.urls

    async def kill_host(self, name: str) -> None:
        """The box goes away: its Ray node (and the front on it), then its broker."""
        node = self.nodes.pop(name)
        await asyncio.to_thread(self.ray_cluster.remove_node, node, False)
        await self.hosts.pop(name).aclose()

    async def kill_head(self) -> None:
        """The Ray head goes away, with the directory, the head host's front and this driver
        (connected to it, as `mgpumanager cluster` would be)."""
        import_ray().shutdown()
        head = self.ray_cluster.head_node
        for name, node in list(self.nodes.items()):
            if node is head:
                del self.nodes[name]
        await asyncio.to_thread(self.ray_cluster.remove_node, head, False)


NODE_ARGS: dict[str, Any] = {
    "num_cpus": 1,
    "resources": {HOST_RESOURCE: 1},
    "object_store_memory": 80 * 1024 * 1024,
}


@contextlib.asynccontextmanager
async def local_cluster(
    n: int, *, instant: bool = True, period_s: float = 0.5
) -> AsyncIterator[LocalCluster]:
    """`n` simulated hosts, each a Ray node with its front; everything stopped on the way out."""
    ray = import_ray()
    from ray.cluster_utils import Cluster

    hosts: dict[str, SimHost] = {}
    cluster: Any = None
    try:
        for i in range(n):
            name = f"h{i + 1}"
            hosts[name] = await start_host(name, instant=instant)
        # Ray starts its nodes and connects from the main thread only (it sets signal
        # handlers): the brokers' loop waits meanwhile, a few seconds.
        cluster = Cluster(True, False, {**NODE_ARGS, "include_dashboard": False})
        nodes = {"h1": cluster.head_node}
        for name in list(hosts)[1:]:
            nodes[name] = cluster.add_node(**NODE_ARGS)
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        plans = [
            HostPlan(name, nodes[name].node_id, hosts[name].url, "127.0.0.1", 0, "127.0.0.1")
            for name in hosts
        ]
        deployment = await deploy_async(plans, period_s)
        yield LocalCluster(cluster, nodes, hosts, deployment)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if cluster is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(cluster.shutdown)
        for host in hosts.values():
            await host.aclose()


async def run_local(n: int, period_s: float = PERIOD_S) -> int:
    """`mgpumanager cluster --local N`: N simulated hosts on this machine, until Ctrl-C."""
    async with local_cluster(n, instant=False, period_s=period_s) as lc:
        print(banner(lc.urls), flush=True)
        for name, host in lc.hosts.items():
            print(f"  {name} broker    {host.url}   (its own port, Ray or not)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    return 0


__all__ = [
    "DIRECTORY",
    "HOST_RESOURCE",
    "NAMESPACE",
    "Deployment",
    "DirectoryService",
    "HostFrontService",
    "HostPlan",
    "LocalCluster",
    "RayMissing",
    "deploy",
    "import_ray",
    "local_cluster",
    "plans_from_nodes",
    "run_cluster",
    "run_local",
]
