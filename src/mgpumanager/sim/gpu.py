"""The simulated GPU: a ledger of VRAM allocations that fails like CUDA when it is full.

Mimics what a real card shows the broker: a total, what is used and free, the processes that
hold memory (``nvidia-smi``'s process list), and the one failure that matters, torch's
``CUDA out of memory. Tried to allocate ...`` when an allocation does not fit. Every OOM is
counted: the end-to-end test reads ``oom_count`` to prove the broker prevents them.

Driver lag (memory still shown as used 0.5-1.5 s after a process freed it) is NOT modelled
here: each fake delays its own ``release`` call by its ``free_delay_s`` instead.

Fakes reach the ledger through the :class:`GpuLedger` protocol, in process
(:class:`LocalLedger`) or over HTTP from another process (:class:`HttpLedger` against
:func:`gpu_app`). ``gpu_app`` optionally also carries an :class:`ActivityLog`, so that a fake in
another process can record its GPU work in the same log (``/v1/activity/*``).
"""

from __future__ import annotations

import enum
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import aiohttp
from aiohttp import web

from mgpumanager.sim.activity import ActivityLog

MIB = 1024 * 1024
_EVENT_LOG_MAX = 10_000


def _fmt_mib(mib: float) -> str:
    """Size the way torch prints it: ``14.00 GiB``, ``300.00 MiB``."""
    if mib >= 1024:
        return f"{mib / 1024:.2f} GiB"
    return f"{mib:.2f} MiB"


class CudaOutOfMemory(Exception):
    """An allocation that does not fit; the message reads like torch's ``OutOfMemoryError``."""

    def __init__(
        self, requested_mib: int, free_mib: int, total_mib: int, owner: str = "", device: int = 0
    ) -> None:
        self.requested_mib = requested_mib
        self.free_mib = free_mib
        self.total_mib = total_mib
        self.owner = owner
        self.device = device
        super().__init__(
            f"CUDA out of memory. Tried to allocate {_fmt_mib(requested_mib)} "
            f"(GPU {device}; {_fmt_mib(total_mib)} total capacity; {_fmt_mib(free_mib)} free)"
        )


class LedgerError(Exception):
    """The ledger could not be reached or answered something unexpected (not an OOM)."""


class GpuEventKind(enum.StrEnum):
    ALLOC = "alloc"
    RELEASE = "release"
    OOM = "oom"
    RESET_STATS = "reset_stats"


class GpuEvent(NamedTuple):
    """One line of the ledger's event log; unpacks as ``(t_monotonic, event, owner, mib)``."""

    t_monotonic: float
    event: GpuEventKind
    owner: str
    mib: int


class SimGPU:
    """One simulated card. Not thread-safe: use it from one event loop (``gpu_app`` does)."""

    def __init__(
        self,
        total_mib: int,
        name: str = "Simulated GPU",
        *,
        busy: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total_mib <= 0:
            raise ValueError(f"total_mib must be positive, got {total_mib}")
        self.name = name
        self._total_mib = total_mib
        self._busy = busy
        self._clock = clock
        self._allocs: dict[tuple[str, str], int] = {}
        self._pids: dict[str, int] = {}
        self._peak_mib = 0
        self._oom_count = 0
        self._events: deque[GpuEvent] = deque(maxlen=_EVENT_LOG_MAX)

    # -- readings -------------------------------------------------------------------------

    @property
    def total_mib(self) -> int:
        return self._total_mib

    @property
    def used_mib(self) -> int:
        return sum(self._allocs.values())

    @property
    def free_mib(self) -> int:
        return self._total_mib - self.used_mib

    @property
    def peak_used_mib(self) -> int:
        return self._peak_mib

    @property
    def oom_count(self) -> int:
        return self._oom_count

    @property
    def utilization_pct(self) -> int:
        """100 while the ``busy`` callback says some fake is doing GPU work, else 0."""
        return 100 if self._busy is not None and self._busy() else 0

    @property
    def events(self) -> list[GpuEvent]:
        return list(self._events)

    def held_by(self, owner: str) -> int:
        return sum(mib for (o, _), mib in self._allocs.items() if o == owner)

    def allocations(self) -> dict[tuple[str, str], int]:
        """``{(owner, tag): mib}``."""
        return dict(self._allocs)

    def snapshot(self) -> dict[str, Any]:
        owners: dict[str, int] = {}
        for (owner, _), mib in self._allocs.items():
            owners[owner] = owners.get(owner, 0) + mib
        return {
            "name": self.name,
            "total_mib": self._total_mib,
            "used_mib": self.used_mib,
            "free_mib": self.free_mib,
            "utilization_pct": self.utilization_pct,
            "peak_used_mib": self._peak_mib,
            "oom_count": self._oom_count,
            "processes": [
                {"pid": self._pids.get(owner), "name": owner, "used_mib": mib}
                for owner, mib in sorted(owners.items())
                if mib > 0
            ],
        }

    # -- mutations ------------------------------------------------------------------------

    def allocate(
        self, owner: str, mib: int, tag: str = "weights", *, pid: int | None = None
    ) -> None:
        """Add ``mib`` to ``owner``'s allocation under ``tag``; raise CudaOutOfMemory if full."""
        if mib < 0:
            raise ValueError(f"cannot allocate a negative amount ({mib} MiB)")
        free = self.free_mib
        if mib > free:
            self._oom_count += 1
            self._log(GpuEventKind.OOM, owner, mib)
            raise CudaOutOfMemory(mib, free, self._total_mib, owner)
        key = (owner, tag)
        self._allocs[key] = self._allocs.get(key, 0) + mib
        if pid is not None:
            self._pids[owner] = pid
        self._peak_mib = max(self._peak_mib, self.used_mib)
        self._log(GpuEventKind.ALLOC, owner, mib)

    def release(self, owner: str, tag: str | None = None) -> int:
        """Free ``owner``'s allocations (only ``tag`` if given); return the MiB freed."""
        keys = [k for k in self._allocs if k[0] == owner and (tag is None or k[1] == tag)]
        freed = sum(self._allocs.pop(k) for k in keys)
        if self.held_by(owner) == 0:
            self._pids.pop(owner, None)
        if keys:
            self._log(GpuEventKind.RELEASE, owner, freed)
        return freed

    def reset_stats(self) -> None:
        self._oom_count = 0
        self._peak_mib = self.used_mib
        self._log(GpuEventKind.RESET_STATS, "", 0)

    def _log(self, kind: GpuEventKind, owner: str, mib: int) -> None:
        self._events.append(GpuEvent(self._clock(), kind, owner, mib))


# -- HTTP face ------------------------------------------------------------------------------

GPU_KEY: web.AppKey[SimGPU] = web.AppKey("sim_gpu", SimGPU)
ACTIVITY_KEY: web.AppKey[ActivityLog] = web.AppKey("sim_activity", ActivityLog)
# A box with several cards (sim/box.py) answers /v1/gpu with the snapshot of every card.
SNAPSHOT_KEY: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("sim_box_snapshot")


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def _json_object(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(
            text=f'{{"error": "invalid JSON: {exc}"}}', content_type="application/json"
        ) from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text='{"error": "body must be a JSON object"}', content_type="application/json"
        )
    return body


async def _get_gpu(request: web.Request) -> web.Response:
    box = request.app.get(SNAPSHOT_KEY)
    return web.json_response(box() if box is not None else request.app[GPU_KEY].snapshot())


async def _post_alloc(request: web.Request) -> web.Response:
    body = await _json_object(request)
    owner, mib, tag, pid = (
        body.get("owner"),
        body.get("mib"),
        body.get("tag", "weights"),
        body.get("pid"),
    )
    if not isinstance(owner, str) or not owner:
        return _bad_request("owner must be a non-empty string")
    if not isinstance(mib, int) or isinstance(mib, bool) or mib < 0:
        return _bad_request("mib must be a non-negative integer")
    if not isinstance(tag, str):
        return _bad_request("tag must be a string")
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
        return _bad_request("pid must be an integer or null")
    try:
        request.app[GPU_KEY].allocate(owner, mib, tag, pid=pid)
    except CudaOutOfMemory as exc:
        return web.json_response(
            {
                "error": str(exc),
                "requested_mib": exc.requested_mib,
                "free_mib": exc.free_mib,
                "total_mib": exc.total_mib,
            },
            status=507,
        )
    return web.json_response({"ok": True})


async def _post_release(request: web.Request) -> web.Response:
    body = await _json_object(request)
    owner, tag = body.get("owner"), body.get("tag")
    if not isinstance(owner, str) or not owner:
        return _bad_request("owner must be a non-empty string")
    if tag is not None and not isinstance(tag, str):
        return _bad_request("tag must be a string or null")
    return web.json_response({"freed_mib": request.app[GPU_KEY].release(owner, tag)})


async def _post_reset_stats(request: web.Request) -> web.Response:
    request.app[GPU_KEY].reset_stats()
    return web.json_response({"ok": True})


async def _post_activity_begin(request: web.Request) -> web.Response:
    body = await _json_object(request)
    consumer = body.get("consumer")
    if not isinstance(consumer, str) or not consumer:
        return _bad_request("consumer must be a non-empty string")
    return web.json_response({"token": request.app[ACTIVITY_KEY].begin(consumer)})


async def _post_activity_end(request: web.Request) -> web.Response:
    body = await _json_object(request)
    token = body.get("token")
    if not isinstance(token, int) or isinstance(token, bool):
        return _bad_request("token must be an integer")
    request.app[ACTIVITY_KEY].end(token)
    return web.json_response({"ok": True})


def gpu_app(
    gpu: SimGPU,
    activity: ActivityLog | None = None,
    *,
    snapshot: Callable[[], dict[str, Any]] | None = None,
) -> web.Application:
    """``GET /v1/gpu``, ``POST /v1/alloc`` (507 on OOM), ``/v1/release``, ``/v1/reset_stats``;
    with ``activity``, also ``POST /v1/activity/begin`` and ``/v1/activity/end``. With
    ``snapshot`` (a box of several cards), ``/v1/gpu`` answers what it gives; the ledger
    calls go to ``gpu``, the first card (fakes in this process use their own card's)."""
    app = web.Application()
    app[GPU_KEY] = gpu
    if snapshot is not None:
        app[SNAPSHOT_KEY] = snapshot
    app.router.add_get("/v1/gpu", _get_gpu)
    app.router.add_post("/v1/alloc", _post_alloc)
    app.router.add_post("/v1/release", _post_release)
    app.router.add_post("/v1/reset_stats", _post_reset_stats)
    if activity is not None:
        app[ACTIVITY_KEY] = activity
        app.router.add_post("/v1/activity/begin", _post_activity_begin)
        app.router.add_post("/v1/activity/end", _post_activity_end)
    return app


# -- what the fakes use ---------------------------------------------------------------------


class GpuLedger(Protocol):
    """The seam between a fake and the simulated GPU (in process or over HTTP)."""

    async def allocate(self, owner: str, mib: int, tag: str = "weights") -> None:
        """Raise CudaOutOfMemory when it does not fit."""
        ...

    async def release(self, owner: str, tag: str | None = None) -> int: ...


@dataclass(frozen=True)
class GpuMemory:
    total_mib: int
    free_mib: int


@runtime_checkable
class GpuMemoryView(Protocol):
    """Optional: a ledger that can also read the card (ComfyUI's ``/system_stats`` uses it)."""

    async def memory(self) -> GpuMemory: ...


class LocalLedger:
    """GpuLedger over a SimGPU in this process."""

    def __init__(self, gpu: SimGPU, pid: int | None = None) -> None:
        self.gpu = gpu
        self._pid = pid

    async def allocate(self, owner: str, mib: int, tag: str = "weights") -> None:
        self.gpu.allocate(owner, mib, tag, pid=self._pid)

    async def release(self, owner: str, tag: str | None = None) -> int:
        return self.gpu.release(owner, tag)

    async def memory(self) -> GpuMemory:
        return GpuMemory(self.gpu.total_mib, self.gpu.free_mib)


class HttpLedger:
    """GpuLedger over :func:`gpu_app`, for a fake in another process. Call :meth:`aclose`.

    Sends this process's pid with each allocation (unless ``send_pid=False``), so that
    ``/v1/gpu`` shows it in ``processes`` like NVML would.
    """

    def __init__(self, base_url: str, *, send_pid: bool = True, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._pid = os.getpid() if send_pid else None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            async with self._client().post(self.base_url + path, json=body) as resp:
                data = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LedgerError(f"ledger {self.base_url}{path}: {exc!r}") from exc
        if not isinstance(data, dict):
            raise LedgerError(f"ledger {self.base_url}{path}: answer is not a JSON object")
        return status, data

    async def allocate(self, owner: str, mib: int, tag: str = "weights") -> None:
        status, data = await self._post(
            "/v1/alloc", {"owner": owner, "mib": mib, "tag": tag, "pid": self._pid}
        )
        if status == 507:
            raise CudaOutOfMemory(
                int(data.get("requested_mib", mib)),
                int(data.get("free_mib", 0)),
                int(data.get("total_mib", 0)),
                owner,
            )
        if status != 200:
            raise LedgerError(f"alloc answered {status}: {data}")

    async def release(self, owner: str, tag: str | None = None) -> int:
        status, data = await self._post("/v1/release", {"owner": owner, "tag": tag})
        if status != 200:
            raise LedgerError(f"release answered {status}: {data}")
        return int(data["freed_mib"])

    async def memory(self) -> GpuMemory:
        try:
            async with self._client().get(self.base_url + "/v1/gpu") as resp:
                data = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LedgerError(f"ledger {self.base_url}/v1/gpu: {exc!r}") from exc
        return GpuMemory(int(data["total_mib"]), int(data["free_mib"]))

    async def work_begin(self, consumer: str) -> int:
        """ActivitySink over HTTP (needs ``gpu_app(..., activity=...)``)."""
        status, data = await self._post("/v1/activity/begin", {"consumer": consumer})
        if status != 200:
            raise LedgerError(f"activity/begin answered {status}: {data}")
        return int(data["token"])

    async def work_end(self, token: int) -> None:
        status, data = await self._post("/v1/activity/end", {"token": token})
        if status != 200:
            raise LedgerError(f"activity/end answered {status}: {data}")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
