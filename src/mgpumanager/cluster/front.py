"""The cluster's front: one per host, an aiohttp server that takes every client surface of a
broker (Ollama at the root, OpenAI `/v1`, the facade, `/upstream/<consumer>/` with websockets)
and forwards each request to the host `scoring.rank_hosts` puts first, streaming both ways.

Each front reads its own broker's `/v1/status` over loopback every `period_s`, publishes it to
a `Directory` (on Ray: a named actor; in one process: `MemoryDirectory`) and reads every
host's back. A request for its own host goes to its broker over loopback; one for another host
goes to that host's front under `/hosts/<name>/...`, which hands it to its broker over loopback:
no broker needs to listen beyond its own box.

Failures (docs/cluster.md): a request whose connection to a host could not even be opened was
never forwarded, and is tried once more on the next host (that host is marked down until its
status is read again); a request once forwarded is never sent again (a broken answer is a
502); an answer 503 or 507 with `Retry-After` (the broker's queue is full, or the card cannot
make room now) moves the request to the next host, and the last host's answer is the client's.

Requests under `/upstream/<consumer>/` from one client stay on one host while they keep
coming: ComfyUI's websocket, its `/prompt`, `/history` and `/view` belong together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from mgpumanager.cluster.scoring import (
    HostSummary,
    Reservations,
    Tier,
    Want,
    need_mib,
    rank_hosts,
    summarize,
)
from mgpumanager.relay.proxy import filter_headers, is_websocket, upstream_url

log = logging.getLogger(__name__)

PERIOD_S = 1.0  # how often each front reads its broker and the directory
BODY_READ_WHOLE = 1 << 20  # bodies up to this size are read whole (their model found)
STICKY_S = 600.0  # how long one client's /upstream/<consumer>/ traffic stays on one host
MOVE_ON = frozenset({503, 507})  # with Retry-After: the next host may take it


@dataclass(frozen=True)
class Published:
    """One host's entry in the directory: its front, its broker's status, how old."""

    name: str
    url: str
    status: Mapping[str, Any] | None
    age_s: float


class Directory(Protocol):
    """Where the fronts meet: each publishes its broker's status, each reads them all."""

    async def publish(self, name: str, url: str, status: Mapping[str, Any] | None) -> None: ...

    async def read(self) -> list[Published]: ...


class MemoryDirectory:
    """The directory in one process (tests, one box): a dict and a clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.entries: dict[str, tuple[str, Mapping[str, Any] | None, float]] = {}

    async def publish(self, name: str, url: str, status: Mapping[str, Any] | None) -> None:
        self.entries[name] = (url, status, self.clock())

    async def read(self) -> list[Published]:
        now = self.clock()
        return [Published(n, u, s, now - t) for n, (u, s, t) in sorted(self.entries.items())]


class NoHost(Exception):
    """No host can take the request now."""


def _model_of(body: bytes | None) -> str | None:
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


def consumer_of(path: str) -> str | None:
    """The consumer a path names, for `/upstream/<consumer>/...`."""
    parts = path.split("/")
    return parts[2] if len(parts) > 2 and parts[1] == "upstream" and parts[2] else None


# The paths whose answer starts GPU work on a consumer of that type, when no model names it.
_GPU_PATHS = {"/v1/image": "comfyui", "/v1/tts": "mvoice", "/v1/stt": "whisper"}


class Front:
    """One host's front. `name`: this host; `broker_url`: its broker over loopback."""

    def __init__(
        self,
        name: str,
        broker_url: str,
        directory: Directory,
        *,
        period_s: float = PERIOD_S,
        token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.broker_url = broker_url.rstrip("/")
        self.directory = directory
        self.period_s = period_s
        self.token = token
        self.clock = clock
        self.url = ""  # where this front listens, once started
        self.hosts: dict[str, HostSummary] = {}
        self.statuses: dict[str, Published] = {}
        self.down: dict[str, float] = {}  # host -> when a connection to it failed
        self.reservations = Reservations()
        self.sticky: dict[tuple[str, str], tuple[str, float]] = {}
        self.forwarded: dict[str, int] = {}  # host -> requests sent there (tests, status)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.refreshed = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0, handler_args={"max_field_size": 65536})
        app.router.add_get("/v1/status", self.cluster_status)
        app.router.add_get("/cluster/", self.host_selector)
        app.router.add_route("*", "/hosts/{host}/{tail:.*}", self.pinned)
        app.router.add_route("*", "/{tail:.*}", self.route)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
            auto_decompress=False,
        )
        self._runner = web.AppRunner(self.app(), handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{bound[1]}"
        self._refresher = asyncio.create_task(self._refresh_forever())
        return self.url

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- soft state ----------------------------------------------------------------------

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a directory gone (the Ray head) must not end the front
                log.warning("cluster: refreshing the hosts failed", exc_info=True)
                await self._own_only()
            self.refreshed.set()
            await asyncio.sleep(self.period_s)

    async def read_own_status(self) -> Mapping[str, Any] | None:
        if self._session is None:
            return None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            async with self._session.get(
                self.broker_url + "/v1/status",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=max(2.0, self.period_s * 2)),
            ) as resp:
                if resp.status != 200:
                    return None
                data: Mapping[str, Any] = await resp.json()
                return data
        except (aiohttp.ClientError, OSError, ValueError):
            return None

    async def refresh(self) -> None:
        """Read the own broker, publish it, read every host back."""
        status = await self.read_own_status()
        if status is not None:
            await self.directory.publish(self.name, self.url, status)
        self.take(await self.directory.read())

    async def _own_only(self) -> None:
        """No directory: serve the own host alone, from the own status."""
        status = await self.read_own_status()
        entries = [Published(self.name, self.url, status, 0.0)] if status is not None else []
        self.take(entries)

    def take(self, entries: list[Published]) -> None:
        now = self.clock()
        hosts = {}
        for e in entries:
            self.statuses[e.name] = e
            if e.status is not None:
                hosts[e.name] = summarize(e.name, e.url, e.status, now - e.age_s)
        self.hosts = hosts
        for name, at in list(self.down.items()):
            if name in hosts and hosts[name].read_at > at:
                del self.down[name]  # it answered again since: back in
        self.reservations.settle(hosts.values())

    def usable(self) -> list[HostSummary]:
        return [h for h in self.hosts.values() if h.name not in self.down]

    # -- choosing ------------------------------------------------------------------------

    def want(self, path: str, model: str | None) -> Want:
        hosts = list(self.hosts.values())
        consumer = consumer_of(path) or _GPU_PATHS.get(path)
        if model is None:
            if consumer is None:
                return Want()
            return Want(None, consumer, need_mib(hosts, "", consumer))
        if consumer is None and (path.startswith("/api/") or path.startswith("/v1/")):
            consumer = next(
                (c.name for h in hosts for c in h.consumers.values() if c.type == "ollama"), None
            )
        return Want(model, consumer, need_mib(hosts, model, consumer))

    def order(self, want: Want, sticky_key: tuple[str, str] | None = None) -> list[str]:
        now = self.clock()
        ranked = rank_hosts(
            self.usable(), want, now=now, period_s=self.period_s, reservations=self.reservations
        )
        names = [c.host for c in ranked]
        if sticky_key is not None:
            held = self.sticky.get(sticky_key)
            if held is not None and held[1] > now and held[0] in names:
                names.remove(held[0])
                names.insert(0, held[0])
        if want.model is not None and ranked and ranked[0].tier != Tier.RESIDENT:
            self.reservations.reserve(want.model, names[0], now)
        return names

    def target(self, host: str, path: str, query: str) -> str:
        if host == self.name:
            return str(upstream_url(self.broker_url, path, query))
        return str(upstream_url(self.hosts[host].url, f"/hosts/{host}{path}", query))

    # -- routes --------------------------------------------------------------------------

    async def route(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.method == "GET" and path in ("/", "/ui", "/ui/"):
            # A browser's dashboard shows one host's broker: `?host=` names it, else the
            # host selector lets the user pick one.
            host = request.query.get("host")
            if host is not None and (host == self.name or host in self.hosts):
                return await self.send(request, [host], None)
            if "text/html" in request.headers.get("Accept", "") or path != "/":
                raise web.HTTPFound("/cluster/")
        body: bytes | None = None
        length = request.content_length
        if request.body_exists and length is not None and length <= BODY_READ_WHOLE:
            body = await request.read()
        want = self.want(path, _model_of(body))
        consumer = consumer_of(path)
        key = (request.remote or "", consumer) if consumer is not None else None
        names = self.order(want, key)
        if not names:
            return _error(503, "no_host", "no host of the cluster can take this request now")
        if key is not None:
            self.sticky[key] = (names[0], self.clock() + STICKY_S)
        return await self.send(request, names, body)

    async def pinned(self, request: web.Request) -> web.StreamResponse:
        """`/hosts/<name>/...`: that host only (another front's hop, the host selector)."""
        host = request.match_info["host"]
        path = "/" + request.match_info["tail"]
        if host != self.name and host not in self.hosts:
            return _error(404, "no_host", f"no host {host!r} in the cluster")
        length = request.content_length
        body = None
        if request.body_exists and length is not None and length <= BODY_READ_WHOLE:
            body = await request.read()
        return await self.send(request, [host], body, path=path)

    async def send(
        self,
        request: web.Request,
        names: list[str],
        body: bytes | None,
        path: str | None = None,
    ) -> web.StreamResponse:
        path = request.path if path is None else path
        query = request.rel_url.raw_query_string
        headers = filter_headers(request.headers)
        connect_retry = True
        last: web.StreamResponse | None = None
        for i, host in enumerate(names):
            url = self.target(host, path, query)
            try:
                if is_websocket(request):
                    return await self._websocket(request, url, headers)
                return await self._forward(request, url, headers, body, last=i == len(names) - 1)
            except _NotForwarded:
                self.down[host] = self.clock()
                log.warning("cluster: host %s did not answer; trying the next one", host)
                if not connect_retry:
                    break
                connect_retry = False
            except _MoveOn as move:
                last = move.response
                if body is None and request.body_exists:
                    break  # a streamed body was sent: it cannot be sent twice
        if last is not None:
            return last
        return _error(503, "no_host", "no host of the cluster answered")

    async def _forward(
        self,
        request: web.Request,
        url: str,
        headers: Any,
        body: bytes | None,
        *,
        last: bool,
    ) -> web.StreamResponse:
        if self._session is None:
            raise RuntimeError("front not started")
        data: Any = body
        if body is None and request.body_exists:
            data = request.content.iter_any()
        try:
            upstream = await self._session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            )
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
            raise _NotForwarded() from exc
        except (aiohttp.ClientError, OSError) as exc:
            return _error(502, "host_failed", f"the host broke off: {exc}")
        async with upstream:
            if upstream.status in MOVE_ON and "Retry-After" in upstream.headers and not last:
                response = web.Response(
                    status=upstream.status,
                    body=await upstream.read(),
                    headers=filter_headers(upstream.headers, drop=["Content-Length"]),
                )
                raise _MoveOn(response)
            self._count(url)
            out = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=filter_headers(upstream.headers, drop=["Content-Length"]),
            )
            if upstream.content_length is not None:
                out.content_length = upstream.content_length
            await out.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await out.write(chunk)
            except (aiohttp.ClientError, OSError) as exc:
                # Forwarded: never sent again. The client sees the answer cut.
                log.warning("cluster: an answer broke off: %s", exc)
                if request.transport is not None:
                    request.transport.close()
                return out
            await out.write_eof()
            return out

    def _count(self, url: str) -> None:
        for name in self.hosts:
            if (name == self.name and url.startswith(self.broker_url)) or f"/hosts/{name}/" in url:
                self.forwarded[name] = self.forwarded.get(name, 0) + 1
                return

    async def _websocket(self, request: web.Request, url: str, headers: Any) -> web.StreamResponse:
        if self._session is None:
            raise RuntimeError("front not started")
        for name in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions"):
            headers.popall(name, None)
        try:
            upstream = await self._session.ws_connect(url, headers=headers, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            return web.Response(status=exc.status, text=exc.message or "")
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
            raise _NotForwarded() from exc
        try:
            client = web.WebSocketResponse(max_msg_size=0)
            await client.prepare(request)
            pumps = [
                asyncio.ensure_future(_pump(client, upstream)),
                asyncio.ensure_future(_pump(upstream, client)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await client.close()
            return client
        finally:
            await upstream.close()

    async def cluster_status(self, request: web.Request) -> web.Response:
        """Every host with its broker's status, and whether the front would send it work."""
        now = self.clock()
        hosts = []
        for name, e in sorted(self.statuses.items()):
            summary = self.hosts.get(name)
            fresh = summary is not None and now - summary.read_at <= 3 * self.period_s
            hosts.append(
                {
                    "name": name,
                    "url": e.url,
                    "up": fresh and name not in self.down and summary is not None,
                    "status_age_s": None if summary is None else round(now - summary.read_at, 3),
                    "forwarded": self.forwarded.get(name, 0),
                    "summary": e.status,
                }
            )
        return web.json_response(
            {"cluster": {"front": self.name, "period_s": self.period_s}, "hosts": hosts}
        )

    async def host_selector(self, request: web.Request) -> web.Response:
        """The hosts, each a link to its broker's dashboard through the front."""
        rows = "".join(
            f'<li><a href="/ui/?host={n}">{n}</a> {"up" if n in self.usable_names() else "down"}'
            "</li>"
            for n in sorted(self.statuses)
        )
        page = (
            "<!doctype html><meta charset=utf-8><title>mgpumanager cluster</title>"
            f"<h1>Hosts</h1><ul>{rows}</ul>"
        )
        return web.Response(text=page, content_type="text/html")

    def usable_names(self) -> set[str]:
        now = self.clock()
        return {
            h.name for h in self.usable() if now - h.read_at <= 3 * self.period_s and h.accepting
        }


class _NotForwarded(Exception):
    """The connection to the host could not be opened: nothing of the request left."""


class _MoveOn(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__("moved on")
        self.response = response


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for msg in source:
        if msg.type is aiohttp.WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        else:
            return


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": code, "message": message, "consumer": None, "retryable": True},
        status=status,
        headers={"Retry-After": "1"} if status == 503 else None,
    )


@contextlib.asynccontextmanager
async def running_front(
    name: str, broker_url: str, directory: Directory, **kw: Any
) -> AsyncIterator[Front]:
    front = Front(name, broker_url, directory, **kw)
    try:
        await front.start()
        yield front
    finally:
        await front.stop()


async def wait_for_hosts(front: Front, count: int, timeout_s: float = 20.0) -> None:
    """Until `front` sees `count` usable hosts (a start-up helper for tests and the CLI)."""
    deadline = time.monotonic() + timeout_s
    while len(front.usable_names()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"front {front.name} sees {sorted(front.usable_names())}")
        front.refreshed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(front.refreshed.wait(), timeout=front.period_s * 2)


__all__ = [
    "PERIOD_S",
    "Directory",
    "Front",
    "MemoryDirectory",
    "Published",
    "consumer_of",
    "running_front",
    "wait_for_hosts",
]
