"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by playwright), against
the stack of `make demo` on free ports: the simulated GPU, the fake Ollama, ComfyUI, mVoice and
a whisper process, and a broker with a token in front of them.

The page asks for the token before it shows any data, lists every consumer, shows an eviction
that a job sent with aiohttp forces (the evictions table and the memory bar change) without a
reload, unloads a consumer with its Unload button, comes back by itself when the broker
restarts, and makes no request anywhere but the broker. It saves a screenshot: with
MGPUMANAGER_SCREENSHOT=path it is also written there (docs/dashboard.png is one). The browser is
`chromium` on PATH, or MGPUMANAGER_CHROMIUM; playwright never downloads one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import async_playwright, expect

from mgpumanager.broker import Broker
from mgpumanager.daemon import Server, start_server
from mgpumanager.registry import Config, load_config, split_listen
from mgpumanager.registry.paths import demo_registry as demo_registry_file
from mgpumanager.sim.cluster import start_cluster
from mgpumanager.tools.demo import DEMO_MODEL, ephemeral_registry, ephemeral_spec

ROOT = Path(__file__).resolve().parents[2]
DEMO = demo_registry_file()
TOKEN = "dashboard-test-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PAGE_LIMIT_BYTES = 100_000
WITHIN_MS = 5000  # "within a few seconds": what the page gets to show a change


def chromium() -> str:
    path = os.environ.get("MGPUMANAGER_CHROMIUM") or shutil.which("chromium")
    if path is None:
        pytest.fail("the browser test needs Debian's chromium (apt-get install chromium)")
    return path


@pytest.fixture
async def demo_registry() -> AsyncIterator[Config]:
    spec = ephemeral_spec(load_config(DEMO)).with_timing(load_s=0.2, run_s=0.2, free_delay_s=0.2)
    async with await start_cluster(spec=spec) as cluster:
        # Memory no consumer accounts for (a training run, say): the bar shows it apart.
        cluster.gpu.allocate("training-run", 700)
        yield ephemeral_registry(DEMO, cluster, auth={"token": TOKEN})


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with session.post(url, json=body, headers=BEARER) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_the_dashboard_in_chromium(demo_registry: Config, tmp_path: Path) -> None:
    config = demo_registry
    server: Server | None = await start_server(Broker(config), port=0)
    assert server is not None
    url = server.url
    requests: list[str] = []
    own_files: list[Any] = []
    try:
        async with async_playwright() as p, aiohttp.ClientSession() as s:
            browser = await p.chromium.launch(executable_path=chromium())
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.on("response", lambda r: own_files.append(r) if "/ui/" in r.url else None)

            # 1. The page loads without the token; its data does not.
            await page.goto(url + "/ui/")
            await expect(page.locator("#auth")).to_be_visible()
            await expect(page.locator("#data")).to_be_hidden()
            assert await page.locator("#consumers tbody tr").count() == 0
            async with s.get(url + "/v1/status") as resp:
                assert resp.status == 401

            # 2. Given the token once, it lists every consumer.
            await page.fill("#token", TOKEN)
            await page.click("#token-form button")
            for name in config.consumers:
                row = page.locator(f'#consumers tr[data-consumer="{name}"]')
                await expect(row).to_be_visible(timeout=WITHIN_MS)
            await expect(page.locator("#conn")).to_have_text("live")
            await page.evaluate("window.notReloaded = true")

            # 3. A job makes Ollama resident; then an image needs its room: an eviction.
            await post(s, url + "/v1/llm", {"model": DEMO_MODEL, "prompt": "hi"})
            bar = page.locator("#bar")
            await expect(bar.locator('[data-consumer="ollama"]')).to_be_visible(timeout=WITHIN_MS)
            await expect(bar.locator('[data-consumer="comfyui"]')).to_have_count(0)
            await expect(page.locator("#evictions tbody tr")).to_have_text(["no eviction yet"])
            graph = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}
            await post(s, url + "/v1/image", {"prompt": graph})
            eviction = page.locator("#evictions tbody tr").first
            await expect(eviction).to_contain_text("comfyui", timeout=WITHIN_MS)
            await expect(eviction.locator(".victims")).to_contain_text("ollama")
            await expect(bar.locator('[data-consumer="comfyui"]')).to_be_visible(timeout=WITHIN_MS)
            await expect(bar.locator('[data-consumer="ollama"]')).to_have_count(0)
            await expect(bar.locator(".seg.outside")).to_be_visible()
            await post(s, url + "/v1/tts", {"text": "hello"})
            await expect(page.locator("#jobs tbody tr")).to_have_count(3, timeout=WITHIN_MS)
            await expect(page.locator("#jobs tbody tr").first).to_contain_text("/v1/tts")
            await expect(eviction).to_contain_text("confirmed")
            assert await page.evaluate("window.notReloaded") is True
            await page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
            if shot := os.environ.get("MGPUMANAGER_SCREENSHOT"):
                await page.screenshot(path=shot, full_page=True)

            # 4. The Unload button unloads ComfyUI; the broker's status says so.
            row = page.locator('#consumers tr[data-consumer="comfyui"]')
            await row.locator('button[data-action="unload"]').click()
            await expect(row.locator(".outcome")).to_have_text(
                "unload: unloaded", timeout=WITHIN_MS
            )
            async with s.get(url + "/v1/status", headers=BEARER) as resp:
                status = await resp.json()
            assert status["consumers"]["comfyui"]["residency"] == "unloaded"
            await expect(bar.locator('[data-consumer="comfyui"]')).to_have_count(0)

            # 5. The broker restarts on the same port: the page reconnects by itself.
            host, port = split_listen(server.listener.address)
            await server.stop()
            server = None
            await expect(page.locator("#conn")).not_to_have_text("live", timeout=WITHIN_MS)
            server = await start_server(Broker(config), host=host, port=port)
            await expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
            await expect(page.locator("#jobs tbody tr")).to_have_text(["no job yet"])
            assert await page.evaluate("window.notReloaded") is True

            # 6. Nothing but the broker was asked for anything, and the page is small.
            assert requests and all(r.startswith(url + "/") for r in requests), requests
            weight = 0
            for response in own_files:
                weight += len(await response.body())
            assert 0 < weight < PAGE_LIMIT_BYTES
            await browser.close()
    finally:
        if server is not None:
            await server.stop()
