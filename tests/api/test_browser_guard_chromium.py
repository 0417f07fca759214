"""The Host and Origin checks in a real headless Chromium (Debian's `chromium`, driven by
playwright): the dashboard opened as http://localhost:PORT unloads a consumer with its button;
a page of another origin on the same machine fires cross-site "simple" requests (no-cors
`fetch` with text/plain to admin, a job and a model pull) and a websocket at the broker, and
nothing runs; a name that resolves to 127.0.0.1 (DNS rebinding, mapped with Chromium's
host-resolver rules) gets 403."""

from __future__ import annotations

import json
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import async_playwright, expect
from test_browser_guard import MODEL, PULLABLE, registry, spec
from test_dashboard_browser import chromium

from conftest import running_broker
from mgpumanager.sim._base import FakeService
from mgpumanager.sim.cluster import start_cluster
from mgpumanager.sim.server import serving

WITHIN_MS = 5000


def attacker_page(broker: str) -> web.Application:
    """A page that tries what any web page may try against a loopback broker, then sets its
    title to "done" once every attempt has settled."""
    ws = broker.replace("http://", "ws://")
    generate = json.dumps({"model": MODEL, "prompt": "hi", "stream": False})
    pull = json.dumps({"model": PULLABLE})
    script = f"""
const simple = (path, body) => fetch({json.dumps(broker)} + path, {{
  method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}});
const socket = new Promise((resolve) => {{
  const s = new WebSocket({json.dumps(ws + "/upstream/comfyui/ws?clientId=evil")});
  s.onopen = () => {{ window.opened = true; s.close(); resolve(); }};
  s.onerror = s.onclose = () => resolve();
}});
Promise.allSettled([
  simple("/v1/admin/consumers/ollama/unload", "{{}}"),
  simple("/api/generate", {json.dumps(generate)}),
  simple("/api/pull", {json.dumps(pull)}),
  simple("/v1/tts", "{{}}"),
  socket,
]).then(() => {{ document.title = "done"; }});
"""

    async def index(request: web.Request) -> web.Response:
        html = f"<!doctype html><title>attacking</title><script>{script}</script>"
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    return app


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_web_pages_cannot_drive_the_box_but_the_dashboard_can() -> None:
    async with (
        await start_cluster(spec=spec()) as cluster,
        running_broker(registry(cluster)) as server,
        aiohttp.ClientSession() as http,
        serving(attacker_page(server.url)) as attacker,
        async_playwright() as p,
    ):
        url, port = server.url, int(server.url.rsplit(":", 1)[1])
        ollama = cast(FakeService, cluster.fakes["ollama"])
        body = {"model": MODEL, "prompt": "hi", "stream": False}
        async with http.post(f"{url}/api/generate", json=body) as resp:  # no Origin: served
            assert resp.status == 200, await resp.text()
        jobs = server.broker.lease.core.stats().total_jobs
        unloads = ollama.unload_count
        browser = await p.chromium.launch(
            executable_path=chromium(),
            args=["--host-resolver-rules=MAP attacker.example 127.0.0.1"],
        )
        try:
            page = await browser.new_page()

            # 1. Another page on this machine fires simple requests and a websocket: refused.
            await page.goto(attacker.url + "/")
            await expect(page).to_have_title("done", timeout=WITHIN_MS)
            assert await page.evaluate("window.opened === undefined")
            assert server.broker.lease.core.stats().total_jobs == jobs
            assert ollama.unload_count == unloads
            async with http.get(f"{url}/api/tags") as resp:
                names = {m["name"] for m in (await resp.json())["models"]}
            assert PULLABLE not in names

            # 2. DNS rebinding: a foreign name that resolves to the broker gets 403.
            answer = await page.goto(f"http://attacker.example:{port}/v1/status")
            assert answer is not None and answer.status == 403
            assert "forbidden" in await page.content()

            # 3. The dashboard opened as localhost: its Unload button works.
            await page.goto(f"http://localhost:{port}/ui/")
            row = page.locator('#consumers tr[data-consumer="ollama"]')
            await expect(row).to_be_visible(timeout=WITHIN_MS)
            await row.locator('button[data-action="unload"]').click()
            await expect(row.locator(".outcome")).to_have_text(
                "unload: unloaded", timeout=WITHIN_MS
            )
            assert ollama.unload_count > unloads
        finally:
            await browser.close()
