"""A quick upstream for the request fuzz, as a process of its own (so neither the fuzzer's
thread nor the daemon can starve it): it answers the routes the fuzzed requests reach with
small JSON at once, serves /health, and prints `PORT <n>` once it listens on loopback port 0.

    python tests/reliability/echo_upstream.py
"""

from __future__ import annotations

import asyncio

from aiohttp import web

ECHO = [
    ("POST", "/api/generate"),
    ("POST", "/api/chat"),
    ("POST", "/api/embed"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/api/synthesize"),
    ("POST", "/api/transcribe"),
    ("GET", "/api/version"),
    ("GET", "/api/tags"),
    ("GET", "/v1/models"),
    ("POST", "/api/show"),
]


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"bytes": len(body), "response": "ok", "done": True})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def prompt(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"prompt_id": "p", "number": 1, "node_errors": {}})


async def history(request: web.Request) -> web.Response:
    return web.json_response({request.match_info["id"]: {"status": {"completed": True}}})


async def main() -> None:
    app = web.Application()
    for method, path in ECHO:
        app.router.add_route(method, path, echo)
    app.router.add_get("/health", health)
    app.router.add_post("/prompt", prompt)
    app.router.add_get("/history/{id}", history)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main())
