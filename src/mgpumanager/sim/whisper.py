"""A fake whisper.cpp ``whisper-server`` (docs/upstreams.md, "whisper.cpp").

- Loads its model at start-up (``load_s``, then ``model_mib`` in the ledger as ``owner``,
  default ``whisper-server``); ``GET /health`` answers 503 ``{"status": "loading model"}`` until
  then, 200 ``{"status": "ok"}`` after.
- ``POST /inference`` (multipart, field ``file``) is serialised by one lock, like the server's
  mutex, and answers ``{"text": ...}`` (``response_format=text`` gives plain text).
- ``POST /load`` (multipart ``model=<path>``) swaps the model under the same lock; the real server
  exits when that fails, so a failed load (CUDA OOM) sets :attr:`FakeWhisper.fatal`, and the
  standalone process exits with status 1.
- No unload endpoint: the only way to free its memory is to stop the process. Run standalone::

      python -m mgpumanager.sim.whisper --host 127.0.0.1 --port N --ledger http://127.0.0.1:P \\
          --model-mib 3000 --load-s 0.2 [--owner whisper-server] [--port-file F] [--activity]

  On SIGTERM/SIGINT it stops serving, waits ``--free-delay-s``, releases all its memory in the
  ledger and exits 0 (a real process exit frees its memory). ``--port 0`` binds any free port;
  ``--port-file`` receives the port actually bound. ``--activity`` records its work in the
  ledger's activity log (``gpu_app(..., activity=...)``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from mgpumanager.sim._base import FakeService, read_upload, sim_sleep
from mgpumanager.sim.activity import ActivitySink, recording
from mgpumanager.sim.gpu import CudaOutOfMemory, GpuLedger, HttpLedger, LedgerError
from mgpumanager.sim.server import serve_app
from mgpumanager.sim.states import ModelState


@dataclass(frozen=True)
class WhisperSettings:
    name: str = "whisper"
    owner: str = "whisper-server"
    model_mib: int = 3000
    model_path: str = "models/ggml-large-v3-turbo.bin"
    model_sizes_mib: Mapping[str, int] = field(default_factory=dict)  # per path; else model_mib
    load_s: float = 1.0
    run_s: float = 0.5  # one transcription
    free_delay_s: float = 0.0  # standalone: wait this long after SIGTERM before releasing
    transcript: str = " And so my fellow Americans, ask not what your country can do for you."


class FakeWhisper(FakeService):
    def __init__(
        self,
        settings: WhisperSettings | None = None,
        *,
        ledger: GpuLedger,
        activity: ActivitySink | None = None,
    ) -> None:
        self.settings = settings or WhisperSettings()
        self.state = ModelState.LOADING
        self.model_path = self.settings.model_path
        self.fatal = asyncio.Event()  # the real server would have exited
        self.inference_count = 0
        self.bytes_received = 0
        self._mutex = asyncio.Lock()
        super().__init__(
            name=self.settings.name, owner=self.settings.owner, ledger=ledger, activity=activity
        )

    def _routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/health", self._health)
        router.add_post("/inference", self._inference)
        router.add_post("/load", self._load)

    async def _on_startup(self) -> None:
        self.spawn(self._initial_load(), name=f"{self.name}-load")

    def _size_mib(self, path: str) -> int:
        return self.settings.model_sizes_mib.get(path, self.settings.model_mib)

    async def _load_locked(self, path: str) -> None:
        self.state = ModelState.LOADING
        try:
            await sim_sleep(self.settings.load_s)
            await self.ledger.allocate(self.owner, self._size_mib(path), "weights")
        except CudaOutOfMemory:
            self.oom_count += 1
            self.state = ModelState.FAILED
            self.fatal.set()
            raise
        self.model_path = path
        self.state = ModelState.LOADED
        self.load_count += 1

    async def _initial_load(self) -> None:
        async with self._mutex:
            with contextlib.suppress(CudaOutOfMemory):
                await self._load_locked(self.settings.model_path)

    async def release_all(self) -> int:
        """What a process exit does to its memory."""
        self.state = ModelState.UNLOADED
        return await self.ledger.release(self.owner)

    async def _health(self, _request: web.Request) -> web.Response:
        if self.state is ModelState.LOADED:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "loading model"}, status=503)

    def _count(self, n: int) -> None:
        self.bytes_received += n

    async def _inference(self, request: web.Request) -> web.Response:
        upload = await read_upload(request, self._count)
        if upload.file_bytes == 0 and upload.filename is None:
            return web.json_response({"error": "no 'file' field in the request"}, status=400)
        async with self._mutex:
            if self.state is not ModelState.LOADED:
                return web.json_response({"error": "model not loaded"}, status=500)
            async with recording(self.activity, self.name):
                await sim_sleep(self.settings.run_s)
            self.inference_count += 1
        if upload.fields.get("response_format") == "text":
            return web.Response(text=self.settings.transcript + "\n")
        return web.json_response({"text": self.settings.transcript})

    async def _load(self, request: web.Request) -> web.Response:
        upload = await read_upload(request, file_field="__none__")
        path = upload.fields.get("model")
        if not path:
            return web.Response(status=400, text="no 'model' field in the request")
        async with self._mutex:
            if self.state is ModelState.LOADED:
                await self.ledger.release(self.owner, "weights")
            try:
                await self._load_locked(path)
            except CudaOutOfMemory as exc:
                return web.json_response({"error": f"failed to load model: {exc}"}, status=500)
        return web.Response(text="Load was successful!")


# -- standalone process ---------------------------------------------------------------------


def _write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)


async def _serve(ns: argparse.Namespace) -> int:
    settings = WhisperSettings(
        owner=ns.owner,
        model_mib=ns.model_mib,
        model_path=ns.model,
        load_s=ns.load_s,
        run_s=ns.run_s,
        free_delay_s=ns.free_delay_s,
    )
    ledger = HttpLedger(ns.ledger)
    fake = FakeWhisper(settings, ledger=ledger, activity=ledger if ns.activity else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        server = await serve_app(fake.app, host=ns.host, port=ns.port)
        if ns.port_file is not None:
            _write_port_file(ns.port_file, server.port)
        print(f"whisper-server (sim) listening on {server.url}", flush=True)
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(fake.fatal.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        await server.aclose()
        await sim_sleep(settings.free_delay_s)
        with contextlib.suppress(LedgerError):
            await fake.release_all()
        return 1 if fake.fatal.is_set() else 0
    finally:
        await ledger.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mgpumanager.sim.whisper", description="fake whisper-server"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--ledger", required=True, help="base URL of the simulated GPU (gpu_app)")
    parser.add_argument("--owner", default=WhisperSettings.owner)
    parser.add_argument("--model", default=WhisperSettings.model_path)
    parser.add_argument("--model-mib", type=int, default=WhisperSettings.model_mib)
    parser.add_argument("--load-s", type=float, default=WhisperSettings.load_s)
    parser.add_argument("--run-s", type=float, default=WhisperSettings.run_s)
    parser.add_argument("--free-delay-s", type=float, default=WhisperSettings.free_delay_s)
    parser.add_argument("--port-file", type=Path, default=None)
    parser.add_argument(
        "--activity", action="store_true", help="record work in the ledger's activity log"
    )
    ns = parser.parse_args(argv)
    return asyncio.run(_serve(ns))


if __name__ == "__main__":
    sys.exit(main())
