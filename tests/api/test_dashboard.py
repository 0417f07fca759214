"""The dashboard's files as the broker serves them, the `/` dispatch between the page and
Ollama's root, and what a token guards (the data, not the page). The page itself, in a real
browser, is tests/test_dashboard_browser.py."""

from __future__ import annotations

import re

import aiohttp
from aiohttp import web

from conftest import Upstream, consumer, make_config, running_broker
from mgpumanager.api import dashboard

PAGE_LIMIT_BYTES = 100_000


def test_the_page_is_small_and_names_only_its_own_files() -> None:
    assert set(dashboard.FILES) == {"index.html", "dashboard.css", "dashboard.js"}
    assert sum(len(body) for body in dashboard.FILES.values()) < PAGE_LIMIT_BYTES
    html = dashboard.FILES["index.html"].decode()
    # Everything it loads comes from the broker, by path: no scheme, no other host.
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sorted(refs) == ["/ui/dashboard.css", "/ui/dashboard.js", "data:,"]
    script = dashboard.FILES["dashboard.js"].decode()
    assert "http://" not in script and "https://" not in script


async def test_the_files_are_served_with_their_types_and_a_strict_policy(
    upstream: Upstream,
) -> None:
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)})
    async with running_broker(config) as server, aiohttp.ClientSession() as s:
        types = {
            "/ui/": "text/html",
            "/ui/dashboard.js": "text/javascript",
            "/ui/dashboard.css": "text/css",
        }
        for path, content_type in types.items():
            async with s.get(server.url + path) as resp:
                assert resp.status == 200
                assert resp.content_type == content_type
                assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
        async with s.get(server.url + "/ui", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/ui/"
        for missing in ("/ui/nope.js", "/ui/..%2fapp.py", "/ui/py.typed"):
            async with s.get(server.url + missing) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"] == "not_found"


async def test_root_is_the_page_for_browsers_and_ollamas_root_for_everyone_else(
    upstream: Upstream,
) -> None:
    async def ollama_root(request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    upstream.route("GET", "/", ollama_root)
    await upstream.start()
    config = make_config({"ollama": consumer(upstream.url, type="ollama")})
    async with running_broker(config) as server, aiohttp.ClientSession() as s:
        browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        async with s.get(server.url + "/", headers={"Accept": browser}) as resp:
            assert resp.content_type == "text/html"
            assert "<title>mgpumanager</title>" in await resp.text()
        for accept in ("*/*", "application/json", ""):
            async with s.get(server.url + "/", headers={"Accept": accept}) as resp:
                assert await resp.text() == "Ollama is running", accept


async def test_with_a_token_the_page_loads_but_its_data_does_not(upstream: Upstream) -> None:
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)}, auth={"token": "s3cret"})
    async with running_broker(config) as server, aiohttp.ClientSession() as s:
        for path in ("/ui/", "/ui/dashboard.js", "/healthz"):
            async with s.get(server.url + path) as resp:
                assert resp.status == 200, path
        for path in ("/v1/status", "/v1/events"):
            async with s.get(server.url + path) as resp:
                assert resp.status == 401, path
        # The root is open only as the page (a browser's Accept): Ollama's root stays guarded.
        async with s.get(server.url + "/", headers={"Accept": "*/*"}) as resp:
            assert resp.status == 401
        bearer = {"Authorization": "Bearer s3cret"}
        async with s.get(server.url + "/v1/status", headers=bearer) as resp:
            assert resp.status == 200
