"""Web front ends `mgpumanager init` finds on a box (Open WebUI, SillyTavern), told by their
answers to side-effect-free GETs, and the origins their pages have: a page of another origin
may use the broker only when `auth.allowed_origins` lists it, so init proposes them (commented:
a front end whose server talks to the broker, as Open WebUI's does by default, sends no Origin
and needs nothing)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from mgpumanager.relay.proxy import UPSTREAM_FAILURES
from mgpumanager.tools.discover import Target

# Open WebUI: 8080 when run natively, 3000 in its documented `docker run -p 3000:8080`.
FRONT_END_PORTS: tuple[int, ...] = (8080, 3000)
PROBE_TIMEOUT_S = 3.0
MAX_ANSWER_BYTES = 256 * 1024
_TITLES = {"open webui": "Open WebUI", "sillytavern": "SillyTavern"}
_TITLE = re.compile(r"<title>\s*([^<]{1,80}?)\s*</title>", re.I)


@dataclass(frozen=True)
class FrontEnd:
    name: str
    target: Target

    @property
    def origins(self) -> list[str]:
        """The origins its pages have as a browser on this box opens them."""
        if self.target.local:
            port = self.target.port
            return [f"http://localhost:{port}", f"http://127.0.0.1:{port}"]
        return [f"http://{self.target.address}"]


def recognise(config: object, page: str | None) -> str | None:
    """Which front end answered: Open WebUI's /api/config names it; else the page's title."""
    name = config.get("name") if isinstance(config, dict) else None
    if isinstance(name, str) and "open webui" in name.lower():
        return "Open WebUI"
    if page is not None:
        m = _TITLE.search(page)
        if m is not None:
            return _TITLES.get(m.group(1).strip().lower())
    return None


async def _get(session: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[int, str]:
    async with asyncio.timeout(timeout_s):
        async with session.get(url, allow_redirects=False) as resp:
            body = await resp.content.read(MAX_ANSWER_BYTES)
            return resp.status, body.decode(errors="replace")


async def identify_front_end(
    session: aiohttp.ClientSession, target: Target, timeout_s: float = PROBE_TIMEOUT_S
) -> FrontEnd | None:
    config: object = None
    page = None
    try:
        status, text = await _get(session, target.url + "/api/config", timeout_s)
        if status == 200:
            try:
                config = json.loads(text)
            except ValueError:
                config = None
        status, text = await _get(session, target.url + "/", timeout_s)
        page = text if status == 200 else None
    except UPSTREAM_FAILURES:
        return None
    name = recognise(config, page)
    return None if name is None else FrontEnd(name, target)


async def find_front_ends(
    targets: Sequence[Target], timeout_s: float = PROBE_TIMEOUT_S
) -> list[FrontEnd]:
    """The front ends among `targets` (each address once)."""
    unique = list({(t.host, t.port): t for t in targets}.values())
    async with aiohttp.ClientSession() as session:
        found = await asyncio.gather(*(identify_front_end(session, t, timeout_s) for t in unique))
    return [f for f in found if f is not None]
