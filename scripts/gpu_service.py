#!/usr/bin/env python3
"""A tiny stand-in for a GPU inference server, for `scripts/gpu_e2e.py`.

    python scripts/gpu_service.py --name realsvc-a (--port N | --fd FD) --mib M
                                  [--free-delay-s 0.3] [--never-free] [--fake-cuda] [--index 0]

`--fd` serves on a listening socket inherited from the parent (scripts/gpu_e2e.py binds port 0
and keeps it, so the port is known before this process starts and nobody can take it);
`--port 0` binds any free port and prints it.

Its command line holds `--name`, so a broker with `gpu_processes: ["realsvc-a"]` attributes
its memory through NVML (the reader matches `/proc/<pid>/cmdline`).

- At start: a CUDA context (the device's primary context, through the driver API over ctypes
  on libcuda.so.1); nothing is allocated.
- `POST /load`: allocates M MiB (`cuMemAlloc`) and touches every byte (`cuMemsetD8`) so it is
  really backed → 200 `{"ok": true, "loaded": true}`; 500 `{"error": "CUDA out of memory ..."}`
  when the driver answers CUDA_ERROR_OUT_OF_MEMORY (counted as `oom_count`).
- `POST /unload`: answers 200 AT ONCE and frees the memory only after `--free-delay-s` (as
  Ollama answers before freeing), keeping its CUDA context (as ComfyUI does). With
  `--never-free` it answers the same and never frees (a stuck upstream).
- `POST /work`: `{"ok": true, "loaded": bool}`; loads lazily first when not loaded (as Ollama);
  `loaded` says whether it was loaded when the request came in.
- `GET /health`: 200 `{"ok": true}`. `GET /stats`: its counters.

`--fake-cuda` skips libcuda entirely (a fake allocator that fails above `--fake-limit-mib`), so
the HTTP layer can be tested on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Protocol

from aiohttp import web

try:
    import mgpumanager  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mgpumanager.sim.server import serve_app

MIB = 1024 * 1024
CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2


class CudaError(Exception):
    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} failed with CUDA error {code}")
        self.code = code


class Allocator(Protocol):
    def alloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...


class DriverAllocator:
    """The CUDA driver API through ctypes: one primary context, made current in this thread
    (every call below runs on the event loop's thread)."""

    def __init__(self, index: int) -> None:
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self.dev = ctypes.c_int()
        self.ctx = ctypes.c_void_p()
        self._ok(self.cuda.cuInit(0), "cuInit")
        self._ok(self.cuda.cuDeviceGet(ctypes.byref(self.dev), index), "cuDeviceGet")
        self._ok(
            self.cuda.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), self.dev),
            "cuDevicePrimaryCtxRetain",
        )
        self._ok(self.cuda.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        # A context is created lazily by some drivers: force it into existence now.
        self._ok(self.cuda.cuCtxSynchronize(), "cuCtxSynchronize")
        name = ctypes.create_string_buffer(256)
        self.cuda.cuDeviceGetName(name, 256, self.dev)
        self.device = name.value.decode(errors="replace")

    @staticmethod
    def _ok(rc: int, call: str) -> None:
        if rc != CUDA_SUCCESS:
            raise CudaError(call, rc)

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._ok(self.cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cuMemAlloc")
        try:
            self._ok(
                self.cuda.cuMemsetD8_v2(ptr, ctypes.c_ubyte(0xA5), ctypes.c_size_t(nbytes)),
                "cuMemsetD8",
            )
            self._ok(self.cuda.cuCtxSynchronize(), "cuCtxSynchronize")
        except CudaError:
            self.cuda.cuMemFree_v2(ptr)
            raise
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self._ok(self.cuda.cuMemFree_v2(ctypes.c_uint64(ptr)), "cuMemFree")
        self._ok(self.cuda.cuCtxSynchronize(), "cuCtxSynchronize")


class FakeAllocator:
    """No GPU: bookkeeping only; fails like the driver above `limit_mib`."""

    device = "fake (no CUDA)"

    def __init__(self, limit_mib: int | None) -> None:
        self.limit = None if limit_mib is None else limit_mib * MIB
        self.held: dict[int, int] = {}
        self._next = 1

    def alloc(self, nbytes: int) -> int:
        if self.limit is not None and sum(self.held.values()) + nbytes > self.limit:
            raise CudaError("cuMemAlloc", CUDA_ERROR_OUT_OF_MEMORY)
        ptr, self._next = self._next, self._next + 1
        self.held[ptr] = nbytes
        return ptr

    def free(self, ptr: int) -> None:
        del self.held[ptr]


class Service:
    def __init__(self, args: argparse.Namespace, allocator: Allocator) -> None:
        self.name: str = args.name
        self.nbytes: int = args.mib * MIB
        self.mib: int = args.mib
        self.free_delay_s: float = args.free_delay_s
        self.never_free: bool = args.never_free
        self.allocator = allocator
        self.ptr: int | None = None  # memory held (also while a free is pending)
        self.loaded = False  # what it claims: False from the moment /unload answers
        self.pending_free: asyncio.TimerHandle | None = None
        self.oom_count = 0
        self.errors: list[str] = []
        self.loads = 0
        self.lazy_loads = 0
        self.unloads = 0
        self.frees = 0
        self.works = 0
        self.reloads_while_freeing = 0  # a load that came before a pending free happened
        self.load_s: list[float] = []
        self.events: list[tuple[float, str]] = []  # (wall time, what), for the e2e's timeline

    def _event(self, what: str) -> None:
        self.events.append((time.time(), what))
        del self.events[:-200]

    def _load(self) -> web.Response | None:
        """Allocate if not loaded; None on success, else the error answer."""
        if self.loaded:
            return None
        if self.ptr is not None:  # unloaded but not freed yet: keep the memory, cancel the free
            self.reloads_while_freeing += 1
            if self.pending_free is not None:
                self.pending_free.cancel()
                self.pending_free = None
            self.loaded = True
            self._event("reload-while-freeing")
            return None
        started = time.monotonic()
        try:
            self.ptr = self.allocator.alloc(self.nbytes)
        except CudaError as exc:
            if exc.code == CUDA_ERROR_OUT_OF_MEMORY:
                self.oom_count += 1
                self._event("oom")
                return web.json_response(
                    {"error": f"CUDA out of memory: {self.mib} MiB ({exc})"}, status=500
                )
            self.errors.append(str(exc))
            self._event(f"error {exc}")
            return web.json_response({"error": str(exc)}, status=500)
        self.load_s.append(round(time.monotonic() - started, 4))
        self.loaded = True
        self.loads += 1
        self._event("alloc")
        return None

    def _free_now(self) -> None:
        self.pending_free = None
        if self.ptr is None or self.loaded:
            return
        try:
            self.allocator.free(self.ptr)
        except CudaError as exc:
            self.errors.append(str(exc))
            self._event(f"error {exc}")
            return
        self.ptr = None
        self.frees += 1
        self._event("free")

    async def load(self, request: web.Request) -> web.Response:
        failed = self._load()
        return failed or web.json_response({"ok": True, "loaded": True})

    async def unload(self, request: web.Request) -> web.Response:
        self.unloads += 1
        was_loaded = self.loaded
        self.loaded = False
        self._event("unload")
        if self.ptr is not None and self.pending_free is None and not self.never_free:
            loop = asyncio.get_running_loop()
            self.pending_free = loop.call_later(self.free_delay_s, self._free_now)
        return web.json_response({"ok": True, "was_loaded": was_loaded})

    async def work(self, request: web.Request) -> web.Response:
        await request.read()
        was_loaded = self.loaded
        if not was_loaded:
            self.lazy_loads += 1
            failed = self._load()
            if failed is not None:
                return failed
        self.works += 1
        self._event("work")
        return web.json_response({"ok": True, "loaded": was_loaded, "name": self.name})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": self.name,
                "pid": os.getpid(),
                "device": getattr(self.allocator, "device", "?"),
                "loaded": self.loaded,
                "holds_mib": self.mib if self.ptr is not None else 0,
                "free_pending": self.pending_free is not None,
                "never_free": self.never_free,
                "oom_count": self.oom_count,
                "errors": self.errors,
                "loads": self.loads,
                "lazy_loads": self.lazy_loads,
                "unloads": self.unloads,
                "frees": self.frees,
                "works": self.works,
                "reloads_while_freeing": self.reloads_while_freeing,
                "load_s": self.load_s,
                "events": self.events,
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/load", self.load)
        app.router.add_post("/unload", self.unload)
        app.router.add_post("/work", self.work)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        return app


async def serve(service: Service, args: argparse.Namespace) -> None:
    """Serve until SIGTERM (or Ctrl-C, which asyncio.run turns into a cancellation)."""
    sock = None if args.fd is None else socket.socket(fileno=args.fd)
    server = await serve_app(service.app(), host=args.host, port=args.port or 0, sock=sock)
    print(
        f"{args.name}: pid {os.getpid()}, device {getattr(service.allocator, 'device', '?')}, "
        f"listening on {server.url}",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await server.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="port to bind on --host (0: any free one)")
    where.add_argument("--fd", type=int, help="an inherited listening socket to serve on")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--mib", type=int, required=True, help="MiB allocated by /load")
    parser.add_argument("--free-delay-s", type=float, default=0.3)
    parser.add_argument("--never-free", action="store_true", help="/unload never frees")
    parser.add_argument("--index", type=int, default=0, help="CUDA device ordinal")
    parser.add_argument("--fake-cuda", action="store_true", help="no libcuda (tests)")
    parser.add_argument("--fake-limit-mib", type=int, default=None)
    args = parser.parse_args()
    # CUDA numbers devices fastest first; NVML by PCI bus. Make them agree.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    allocator: Allocator
    if args.fake_cuda:
        allocator = FakeAllocator(args.fake_limit_mib)
    else:
        try:
            allocator = DriverAllocator(args.index)
        except (OSError, CudaError) as exc:
            print(f"{args.name}: no CUDA context: {exc}", file=sys.stderr, flush=True)
            return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(Service(args, allocator), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
