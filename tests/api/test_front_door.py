"""Front doors: a consumer's own API at the root of a listener of its own, on the port its
clients already use. Real clients pointed at a door's root (the `ollama` client, a ComfyUI
flow with its websocket, a page that uses absolute paths) are scheduled exactly as through
/upstream/<name>/; auth applies there and errors take the consumer's dialect; a reload opens
and closes doors (a door that cannot bind refuses the reload); a taken port is one line naming
the key; check-config refuses two listeners on one address."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import ollama
import pytest
from aiohttp import web

from conftest import Upstream, running_broker, wait_done, wait_for
from mgpumanager.daemon import Server
from mgpumanager.registry import Config, ConfigError, parse_config
from mgpumanager.scheduling.core import SchedulerCore
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings, FakeComfyUI
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings

MODEL = "llama3.1:8b"
OTHER = "qwen2.5:14b"
PULLABLE = "tiny:1b"
CHUNKS = 4
GRAPH: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev"}},
    "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 42}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "door"}},
}


@dataclasses.dataclass
class Box:
    cluster: SimCluster
    server: Server
    http: aiohttp.ClientSession

    def door(self, name: str) -> str:
        return self.server.front_doors[name].url

    @property
    def lease(self) -> SchedulerCore:
        return self.server.broker.lease.core

    def ran_after(self, first: str, then: str) -> None:
        """Every piece of work of `then` started after every piece of `first` had ended."""
        intervals = self.cluster.activity.intervals()
        firsts = [i for i in intervals if i.consumer == first]
        thens = [i for i in intervals if i.consumer == then]
        assert firsts and thens, intervals
        assert min(t.start for t in thens) >= max(f.end for f in firsts)
        assert self.cluster.activity.overlapping_pairs() == []


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    spec = FakeSpec(
        ollama=OllamaSettings(
            models={MODEL: 6200, OTHER: 10400},
            run_s=0.6,
            chunks=CHUNKS,
            library={PULLABLE: 800},
            pull_s=0,
            pull_steps=3,
        ),
        whisper=None,
        comfyui=ComfyUISettings(model_mib=8000, ctx_mib=300, run_s=0.8),
        mvoice=MVoiceSettings(vram_mib=3000, run_s=0),
    ).with_timing(load_s=0, free_delay_s=0)
    async with await start_cluster(spec=spec) as cluster:
        health = {"interval_s": 0.05}
        config = Config.model_validate(
            {
                "listen": "127.0.0.1:0",
                "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
                "routing": {"tts": "mvoice"},
                "consumers": {
                    "ollama": {
                        "type": "ollama",
                        "url": cluster.urls["ollama"],
                        "health": {"path": "/api/version", **health},
                        "vram_resident_mib": 10400,
                        "gpu_processes": ["ollama"],
                        "front_door": "127.0.0.1:0",
                    },
                    "comfyui": {
                        "type": "comfyui",
                        "url": cluster.urls["comfyui"],
                        "health": {"path": "/system_stats", **health},
                        "vram_resident_mib": 8300,
                        "gpu_processes": ["comfyui"],
                        "front_door": "127.0.0.1:0",
                    },
                    "mvoice": {
                        "url": cluster.urls["mvoice"],
                        "health": health,
                        "paths": {"tts": {"path": "/api/synthesize"}},
                        "vram_resident_mib": 3000,
                        "gpu_processes": ["mvoice"],
                    },
                },
            }
        )
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            yield Box(cluster, server, http)


def queue_tts(box: Box) -> asyncio.Future[aiohttp.ClientResponse]:
    """A job for another consumer, sent through the broker's own listener."""
    return asyncio.ensure_future(box.http.post(f"{box.server.url}/v1/tts", json={"text": "hi"}))


async def test_the_ollama_client_at_a_front_door_is_scheduled(box: Box) -> None:
    assert set(box.server.front_doors) == {"ollama", "comfyui"}
    async with ollama.AsyncClient(host=box.door("ollama"), trust_env=False) as client:
        assert {m.model for m in (await client.list()).models} == {MODEL, OTHER}
        pulled = [p async for p in await client.pull(PULLABLE, stream=True)]
        assert len([p for p in pulled if p.completed is not None]) == 3  # progress, line by line
        assert pulled[-1].status == "success"
        assert PULLABLE in {m.model for m in (await client.list()).models}
        assert box.lease.stats().total_jobs == 0  # listing and pulling are no GPU work

        messages = [{"role": "user", "content": "Why is the sky blue?"}]
        parts: list[ollama.ChatResponse] = []
        tts = None
        async for part in await client.chat(model=MODEL, messages=messages, stream=True):
            if tts is None:
                # The chat is still generating and holds the lease: a TTS job sent now waits.
                assert box.lease.stats().holder == "ollama"
                tts = queue_tts(box)
                await wait_for(lambda: box.lease.stats().queue_depth == 1, what="TTS queued")
            parts.append(part)
    assert len(parts) == CHUNKS + 1 and parts[-1].done is True
    assert "".join(p.message.content or "" for p in parts).startswith("The sky")
    assert tts is not None
    async with await tts as resp:
        assert resp.status == 200
    box.ran_after("ollama", "mvoice")
    assert box.lease.stats().total_jobs == 2  # the chat and the TTS


async def test_a_comfyui_flow_at_a_front_door_holds_the_lease(box: Box) -> None:
    http, base, client_id = box.http, box.door("comfyui"), "door-client"
    async with http.ws_connect(f"{base}/ws?clientId={client_id}") as ws:
        hello = await ws.receive_json(timeout=5)
        assert hello["data"]["sid"] == client_id
        async with http.post(
            f"{base}/prompt", json={"prompt": GRAPH, "client_id": client_id}
        ) as resp:
            assert resp.status == 200
            prompt_id = (await resp.json())["prompt_id"]
        # Answered at once, the image still being made: the lease stays with ComfyUI.
        fake = cast(FakeComfyUI, box.cluster.fakes["comfyui"])
        assert box.lease.stats().holder == "comfyui" and fake.queue_remaining == 1
        tts = queue_tts(box)
        await wait_for(lambda: box.lease.stats().queue_depth == 1, what="the TTS job queued")
        events = await wait_done(ws, prompt_id)
    assert "execution_success" in events
    async with await tts as resp:
        assert resp.status == 200
    box.ran_after("comfyui", "mvoice")

    async with http.get(f"{base}/history/{prompt_id}") as resp:
        history = (await resp.json())[prompt_id]
    assert history["status"]["status_str"] == "success"
    [image] = history["outputs"]["9"]["images"]
    params = {"filename": image["filename"], "subfolder": image["subfolder"], "type": "output"}
    async with http.get(f"{base}/view", params=params) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        assert (await resp.read()).startswith(b"\x89PNG")
    assert box.lease.stats().total_jobs == 2  # the prompt and the TTS; the rest passed through

    async with http.get(f"{box.server.url}/v1/status") as resp:
        consumers = (await resp.json())["consumers"]
    assert consumers["comfyui"]["front_door"] == box.server.front_doors["comfyui"].address
    assert consumers["ollama"]["front_door"] == box.server.front_doors["ollama"].address
    assert consumers["mvoice"]["front_door"] is None
    assert not box.server.front_doors["comfyui"].address.endswith(":0")  # the bound port


# -- a registry of scriptable upstreams ----------------------------------------------------------


def registry(url: str, **extra: Any) -> dict[str, Any]:
    """One consumer `svc` on `url` (a generic one unless `extra` says otherwise)."""
    svc = {
        "url": url,
        "vram_resident_mib": 1000,
        "health": {"path": "/health", "interval_s": 0.05, "timeout_s": 1},
        **extra,
    }
    return {
        "listen": "127.0.0.1:0",
        "gpu": {"backend": "static", "total_mib": 24576},
        "consumers": {"svc": svc},
    }


async def test_a_page_at_the_root_works_unchanged_through_its_front_door(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """A web UI that loads its assets and posts to absolute paths, and refuses an Origin that
    does not name the host it is sent to (ComfyUI's guard), works at the door with no
    sub-path: the paths are the service's own, and the browser's Origin (the door) is made
    the upstream's."""

    async def index(request: web.Request) -> web.Response:
        page = '<script src="/assets/app.js"></script>'
        return web.Response(text=page, content_type="text/html")

    async def asset(request: web.Request) -> web.Response:
        return web.Response(text="start()", content_type="application/javascript")

    async def settings(request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            return web.Response(status=403, text="origin mismatch")
        return web.json_response({"saved": await request.json()})

    upstream.route("GET", "/", index)
    upstream.route("GET", "/assets/app.js", asset)
    upstream.route("POST", "/api/settings", settings)
    await upstream.start()
    config = Config.model_validate(registry(upstream.url, front_door="127.0.0.1:0"))
    async with running_broker(config) as server:
        door = server.front_doors["svc"].url
        async with client.get(f"{door}/", headers={"Accept": "text/html"}) as resp:
            assert await resp.text() == '<script src="/assets/app.js"></script>'
        async with client.get(f"{door}/assets/app.js") as resp:
            assert await resp.text() == "start()"
        async with client.post(
            f"{door}/api/settings", json={"theme": "dark"}, headers={"Origin": door}
        ) as resp:
            assert (resp.status, await resp.json()) == (200, {"saved": {"theme": "dark"}})
        # Another site's Origin is refused by the broker itself: the service never sees it.
        seen = len(upstream.requests)
        evil = {"Origin": "http://evil.example"}
        async with client.post(f"{door}/api/settings", json={}, headers=evil) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "forbidden"
        assert len(upstream.requests) == seen
        # The door is the consumer's API only: the broker's own routes are not there.
        async with client.get(f"{door}/v1/status") as resp:
            # The upstream's own 404 (aiohttp's text), passed through; not the broker's JSON.
            assert (resp.status, await resp.text()) == (404, "404: Not Found")


async def test_auth_and_limits_apply_on_a_front_door_in_the_consumers_dialect(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"authorization": request.headers.get("Authorization")})

    upstream.route("GET", "/queue", echo)
    upstream.route("GET", "/healthz", echo)
    await upstream.start()
    health = {"path": "/health", "interval_s": 0.05, "timeout_s": 1}
    config = Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "static", "total_mib": 24576},
            "auth": {"token": "s3cret"},
            "max_body_mib": 1,
            "consumers": {
                "comfyui": {
                    "type": "comfyui",
                    "url": upstream.url,
                    "health": health,
                    "vram_resident_mib": 1000,
                    "front_door": "127.0.0.1:0",
                },
                "ollama": {
                    "type": "ollama",
                    "url": "http://127.0.0.1:9",  # discard port: nothing listens
                    "health": health,
                    "vram_resident_mib": 1000,
                    "front_door": "127.0.0.1:0",
                },
            },
        }
    )
    token = {"Authorization": "Bearer s3cret"}
    async with running_broker(config) as server:
        comfy, llm = server.front_doors["comfyui"].url, server.front_doors["ollama"].url
        async with client.get(f"{comfy}/queue") as resp:
            assert resp.status == 401
            body = await resp.json()
        assert body["node_errors"] == {} and body["error"]["type"] == "unauthorized"
        # /healthz is the broker's own only on `listen`: on a door it is the consumer's path.
        async with client.get(f"{comfy}/healthz") as resp:
            assert resp.status == 401
        async with client.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(f"{comfy}/ws?clientId=x")
        assert refused.value.status == 401
        async with client.get(f"{comfy}/queue", headers=token) as resp:
            # Let in, and the broker's token is not the upstream's: not passed on.
            assert (resp.status, await resp.json()) == (200, {"authorization": None})
        # The same body limit as on `listen`.
        big = io.BytesIO(b"x" * (2 * 1024 * 1024))
        async with client.post(f"{comfy}/upload/image", data=big, headers=token) as resp:
            assert resp.status == 413
            body = await resp.json()
        assert body["node_errors"] == {} and body["error"]["type"] == "payload_too_large"

        async with client.post(f"{llm}/api/chat", json={"model": "m"}) as resp:
            assert resp.status == 401
            body = await resp.json()
        assert body["code"] == "unauthorized" and isinstance(body["error"], str)
        async with client.get(f"{llm}/api/tags", headers=token) as resp:
            assert resp.status == 502
            body = await resp.json()
        assert (body["code"], body["consumer"]) == ("consumer_unreachable", "ollama")
        assert isinstance(body["error"], str)  # Ollama's shape: the message under "error"


# -- reload ------------------------------------------------------------------------------------


async def test_reload_opens_and_closes_front_doors(
    upstream: Upstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"slow": True})

    async def fast(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    upstream.route("GET", "/slow", slow)
    upstream.route("GET", "/fast", fast)
    await upstream.start()
    path = tmp_path / "consumers.yaml"

    def write(data: dict[str, Any]) -> None:
        path.write_text(json.dumps(data))  # JSON is YAML

    caplog.set_level(logging.INFO)
    async with running_broker(Config.model_validate(registry(upstream.url))) as server:
        assert server.front_doors == {}
        adapter = server.broker.adapters["svc"]
        # Added: it answers with the consumer's API at its root. To the broker the consumer is
        # the same one (its adapter, health and residency go on).
        write(registry(upstream.url, front_door="127.0.0.1:0"))
        await server.reload(path)
        door = server.front_doors["svc"]
        async with client.get(f"{door.url}/fast") as resp:
            assert await resp.json() == {"path": "/fast"}
        [reloaded] = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()]
        assert reloaded == f"SIGHUP: registry reloaded (front door of svc on {door.address})"
        assert server.broker.adapters["svc"] is adapter
        async with client.get(f"{server.url}/v1/status") as resp:
            assert (await resp.json())["consumers"]["svc"]["front_door"] == door.address

        # Kept as it is when the registry changes something else.
        write(registry(upstream.url, front_door="127.0.0.1:0", priority=4))
        await server.reload(path)
        assert server.front_doors["svc"] is door

        # Refused whole when the broker refuses the registry: no door is left open for it.
        moved = registry(upstream.url, front_door="127.0.0.1:0")
        moved["consumers"]["other"] = {**moved["consumers"]["svc"]}
        moved["gpu"]["backend"] = "nvml"  # a new reader: a restart
        write(moved)
        await server.reload(path)
        assert set(server.front_doors) == {"svc"} and "other" not in server.broker.config.consumers

        # Removed while a request is in flight on it: it stops accepting at once, and the
        # request in flight finishes.
        running = asyncio.ensure_future(client.get(f"{door.url}/slow"))
        await asyncio.wait_for(entered.wait(), 10)
        write(registry(upstream.url))
        await server.reload(path)
        assert server.front_doors == {}
        with pytest.raises(aiohttp.ClientConnectorError):
            await client.get(f"{door.url}/fast")
        release.set()
        async with await running as resp:
            assert (resp.status, await resp.json()) == (200, {"slow": True})
        async with client.get(f"{server.url}/v1/status") as resp:
            assert (await resp.json())["consumers"]["svc"]["front_door"] is None


async def test_stopping_cuts_what_still_runs_on_a_removed_front_door(
    upstream: Upstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A removed door's requests may take scheduler.drain_timeout_s to finish, but a shutdown
    does not wait that long for them: after the broker's drain they are cut."""
    entered = asyncio.Event()

    async def forever(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    upstream.route("GET", "/forever", forever)
    await upstream.start()
    path = tmp_path / "consumers.yaml"
    # Longer than the test's own timeout: a shutdown that waited for the grace would fail it.
    with_door = registry(upstream.url, front_door="127.0.0.1:0")
    with_door["scheduler"] = {"drain_timeout_s": 600}
    async with running_broker(Config.model_validate(with_door)) as server:
        door = server.front_doors["svc"].url
        stuck = asyncio.ensure_future(client.get(f"{door}/forever"))
        await asyncio.wait_for(entered.wait(), 10)
        path.write_text(json.dumps({**registry(upstream.url), "scheduler": with_door["scheduler"]}))
        await server.reload(path)
        assert server.front_doors == {}
    with pytest.raises(aiohttp.ClientError):  # cut (aiohttp retries a GET once: refused)
        await stuck
    await wait_for(lambda: upstream.aborted == 1, what="the upstream request aborted")


async def test_a_front_door_that_cannot_bind_refuses_the_reload(
    upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await upstream.start()
    path = tmp_path / "consumers.yaml"
    old = Config.model_validate(registry(upstream.url))
    async with running_broker(old) as server:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            path.write_text(json.dumps(registry(upstream.url, front_door=f"127.0.0.1:{port}")))
            await server.reload(path)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [
            "SIGHUP: new registry refused, keeping the old one: cannot listen on "
            f"127.0.0.1:{port} (front door of svc): Address already in use"
        ]
        assert server.broker.config == old and server.front_doors == {}


async def test_a_taken_front_door_port_is_one_line_naming_the_key(
    upstream: Upstream, tmp_path: Path
) -> None:
    await upstream.start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "consumers.yaml"
        config.write_text(json.dumps(registry(upstream.url, front_door=f"127.0.0.1:{port}")))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mgpumanager.cli", "serve", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = err.decode().splitlines()
    assert proc.returncode == 1, lines
    assert lines[-1] == (
        f"mgpumanager: broker: cannot listen on 127.0.0.1:{port} (front door of svc): "
        f"Address already in use; change `consumers.svc.front_door` in {config}"
    )
    assert not any("Traceback" in line for line in lines)


# -- check-config ------------------------------------------------------------------------------


def problems(doors: dict[str, Any], **top: Any) -> list[tuple[str, str]]:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:8770",
        "gpu": {"backend": "static", "total_mib": 24576},
        "consumers": {
            name: {"url": "http://127.0.0.1:1", "vram_resident_mib": 1, "front_door": door}
            for name, door in doors.items()
        },
        **top,
    }
    try:
        parse_config(json.dumps(data))
    except ConfigError as exc:
        return [(p.path, p.message) for p in exc.problems]
    return []


def test_check_config_refuses_two_listeners_on_one_address() -> None:
    assert problems({"a": "127.0.0.1:11434", "b": "127.0.0.1:8188", "c": None}) == []
    assert problems({"a": "127.0.0.1:0", "b": "127.0.0.1:0"}) == []  # any free port: no clash
    assert problems({"a": "127.0.0.1:8770"}) == [
        (
            "consumers.a.front_door",
            "127.0.0.1:8770 is taken by `listen`: each front door needs an address of its own",
        )
    ]
    assert problems({"a": "127.0.0.1:11434", "b": "127.0.0.1:11434"}) == [
        (
            "consumers.b.front_door",
            "127.0.0.1:11434 is taken by `consumers.a.front_door`: each front door needs an "
            "address of its own",
        )
    ]
    # Every interface includes loopback's.
    [(where, message)] = problems(
        {"a": "0.0.0.0:11434", "b": "127.0.0.1:11434"}, auth={"token": "t"}
    )
    assert where == "consumers.b.front_door" and "consumers.a.front_door" in message
    assert problems({"a": ":8770"}, auth={"token": "t"})[0][0] == "consumers.a.front_door"
    assert problems({"a": "localhost:11434", "b": "127.0.0.1:11434"})[0][0] == (
        "consumers.b.front_door"
    )


def test_check_config_refuses_a_consumer_url_on_the_brokers_own_listener() -> None:
    """The service was not moved: relayed, its requests would come back to the broker."""
    data: dict[str, Any] = {
        "gpu": {"backend": "static", "total_mib": 24576},
        "consumers": {
            "ollama": {
                "type": "ollama",
                "url": "http://localhost:11434",
                "vram_resident_mib": 1,
                "front_door": "127.0.0.1:11434",
            },
            "tts": {"url": "http://127.0.0.1:8770/", "vram_resident_mib": 1},  # `listen`'s
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(json.dumps(data))
    assert [(p.path, p.message) for p in caught.value.problems] == [
        (
            f"consumers.{name}.url",
            f"points at `{key}`, where the broker itself listens: its requests would come back "
            "to the broker (move the service to another port first)",
        )
        for name, key in (("ollama", "consumers.ollama.front_door"), ("tts", "listen"))
    ]
    data["consumers"]["ollama"]["url"] = "http://127.0.0.1:11435"
    data["consumers"]["tts"]["url"] = "http://127.0.0.1:8765"
    assert parse_config(json.dumps(data)).consumers["ollama"].front_door == "127.0.0.1:11434"


def test_check_config_refuses_a_bad_or_exposed_front_door() -> None:
    assert problems({"a": 11434}) == [
        ("consumers.a.front_door", "front_door must be HOST:PORT, e.g. 127.0.0.1:11434 (got 11434)")
    ]
    [(where, message)] = problems({"a": "0.0.0.0:11434"})
    assert where == "consumers.a.front_door"
    assert message.startswith("front_door '0.0.0.0:11434' is reachable beyond this machine")
    assert problems({"a": "0.0.0.0:11434"}, auth={"token": "t"}) == []
    assert problems({"a": "0.0.0.0:11434"}, auth={"allow_unauthenticated": True}) == []
