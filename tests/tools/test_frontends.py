"""`mgpumanager init` finds the web front ends on a box (Open WebUI on its usual port,
SillyTavern where --scan names it) and proposes their origins for `auth.allowed_origins`,
commented out; a page it does not know stays "not identified"."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from mgpumanager.registry import load_config, parse_config
from mgpumanager.sim.cluster import FakeSpec, start_cluster
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.sim.server import serving
from mgpumanager.tools.discover import parse_target
from mgpumanager.tools.frontends import recognise
from mgpumanager.tools.init import run_init


def page(title: str, config: dict[str, object] | None = None) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=f"<html><title>{title}</title></html>", content_type="text/html")

    async def api_config(request: web.Request) -> web.Response:
        if config is None:
            raise web.HTTPNotFound()
        return web.json_response(config)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/config", api_config)
    return app


def test_recognise() -> None:
    assert recognise({"name": "Open WebUI", "version": "0.6.5"}, None) == "Open WebUI"
    assert recognise(None, "<title> SillyTavern </title>") == "SillyTavern"
    assert recognise({"name": 3}, "<title>Grafana</title>") is None


async def test_init_proposes_the_origins_of_the_front_ends_it_finds(tmp_path: Path) -> None:
    spec = FakeSpec(mvoice=None, comfyui=None, whisper=None, ollama=OllamaSettings())
    webui = page("Open WebUI", {"name": "Open WebUI", "version": "0.6.5"})
    async with (
        await start_cluster(spec=spec) as box,
        serving(webui) as owui,
        serving(page("SillyTavern")) as tavern,
        serving(page("Grafana")) as other,
    ):
        out = tmp_path / "consumers.yaml"
        scan = [parse_target(u.removeprefix("http://")) for u in (box.urls["ollama"],)]
        scan += [parse_target(s.url.removeprefix("http://")) for s in (tavern, other)]
        owui_port = int(owui.url.rsplit(":", 1)[1])
        plan, report = await run_init(
            scan=scan,
            out=out,
            gpu_sim=box.gpu_url,
            usual_ports=(),
            front_end_ports=(owui_port,),
        )
    tavern_address = tavern.url.removeprefix("http://")
    assert {(f.name, f.target.address) for f in plan.front_ends} == {
        ("Open WebUI", f"127.0.0.1:{owui_port}"),
        ("SillyTavern", tavern_address),
    }
    assert [u.target.url for u in plan.scan.unidentified] == [other.url]
    text = out.read_text()
    proposed = [
        f"#     - http://localhost:{owui_port}  # Open WebUI",
        f"#     - http://127.0.0.1:{owui_port}  # Open WebUI",
        f"#     - {tavern.url.replace('127.0.0.1', 'localhost')}  # SillyTavern",
    ]
    for line in ["# auth:", "#   allowed_origins:", *proposed]:
        assert line in text.splitlines(), text
    assert load_config(out).auth.allowed_origins == []  # proposed, not in force
    uncommented = "\n".join(
        line[2:]
        if line in ("# auth:", "#   allowed_origins:") or line.startswith("#     - ")
        else line
        for line in text.splitlines()
    )
    config = parse_config(uncommented, "uncommented")
    assert f"http://localhost:{owui_port}" in config.auth.allowed_origins
    assert tavern.url in config.auth.allowed_origins
    assert "Open WebUI" in report and "allowed_origins" in report


async def test_no_front_end_no_proposal(tmp_path: Path) -> None:
    spec = FakeSpec(mvoice=None, comfyui=None, whisper=None, ollama=OllamaSettings())
    async with await start_cluster(spec=spec) as box:
        out = tmp_path / "consumers.yaml"
        scan = [parse_target(box.urls["ollama"].removeprefix("http://"))]
        plan, _ = await run_init(scan=scan, out=out, gpu_sim=box.gpu_url, usual_ports=())
    assert plan.front_ends == []
    assert "allowed_origins" not in out.read_text()
