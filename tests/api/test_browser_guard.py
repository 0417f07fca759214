"""Nothing on the web drives the box: on every listener (`listen` and the front doors of Ollama
and ComfyUI), a foreign Host (DNS rebinding) or a foreign Origin (a cross-site "simple"
request) is answered 403 `forbidden` in the surface's dialect, and nothing reaches an upstream
or the lease; the listener's own origin, loopback names and requests without Origin are served;
an origin in `auth.allowed_origins` gets CORS headers and its preflight answered.

A real broker on loopback port 0 in front of the simulated Ollama, ComfyUI and mVoice. Every
probing request carries a marker header: an upstream that received it would have it in its
record, and the control requests show that it does arrive when a request is let through.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import aiohttp
import pytest

from conftest import running_broker, wait_for
from mgpumanager.daemon import Server
from mgpumanager.registry import Config
from mgpumanager.sim._base import FakeService
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings

MODEL = "llama3.1:8b"
PULLABLE = "tiny:1b"
MARK = "X-Probe-Id"
FOREIGN_HOST = "attacker.example"
FOREIGN_ORIGIN = "http://attacker.example"
FRONT_END = "http://localhost:3000"  # another page on this machine: foreign unless listed
GRAPH: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev"}},
    "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 42}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
}
_marks = itertools.count()


@dataclasses.dataclass
class Box:
    cluster: SimCluster
    server: Server
    http: aiohttp.ClientSession

    def url(self, listener: str) -> str:
        return self.server.url if listener == "listen" else self.server.front_doors[listener].url

    def port(self, listener: str) -> int:
        return int(self.url(listener).rsplit(":", 1)[1])

    def reached(self, mark: str) -> list[str]:
        """'fake METHOD path' of every request an upstream received carrying `mark`."""
        return [
            f"{name} {r.method} {r.path}"
            for name, fake in self.cluster.fakes.items()
            for r in list(cast(FakeService, fake).received)
            if r.headers.get(MARK) == mark
        ]

    @property
    def jobs(self) -> int:
        return self.server.broker.lease.core.stats().total_jobs


def registry(cluster: SimCluster, **auth: Any) -> Config:
    health = {"interval_s": 0.05}
    return Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "sim", "sim_url": cluster.gpu_url, "poll_interval_s": 0.02},
            "routing": {"tts": "mvoice", "llm": "ollama"},
            "auth": auth,
            "consumers": {
                "ollama": {
                    "type": "ollama",
                    "url": cluster.urls["ollama"],
                    "health": {"path": "/api/version", **health},
                    "vram_resident_mib": 6200,
                    "unload": {"path": "/api/generate"},
                    "front_door": "127.0.0.1:0",
                },
                "comfyui": {
                    "type": "comfyui",
                    "url": cluster.urls["comfyui"],
                    "health": {"path": "/system_stats", **health},
                    "vram_resident_mib": 8300,
                    "front_door": "127.0.0.1:0",
                },
                "mvoice": {
                    "url": cluster.urls["mvoice"],
                    "health": health,
                    "vram_resident_mib": 3000,
                    "unload": {"path": "/api/admin/unload"},
                },
            },
        }
    )


def spec() -> FakeSpec:
    return FakeSpec(
        ollama=OllamaSettings(models={MODEL: 6200}, chunks=2, library={PULLABLE: 800}, pull_s=0),
        whisper=None,
        comfyui=ComfyUISettings(model_mib=8000, ctx_mib=300),
        mvoice=MVoiceSettings(vram_mib=3000),
    ).with_timing(load_s=0, run_s=0, free_delay_s=0)


@asynccontextmanager
async def started(**auth: Any) -> AsyncIterator[Box]:
    async with await start_cluster(spec=spec()) as cluster:
        async with running_broker(registry(cluster, **auth)) as server:
            async with aiohttp.ClientSession() as http:
                broker = server.broker
                await wait_for(
                    lambda: all(s.ok for s in broker.health.states.values()), what="all healthy"
                )
                yield Box(cluster, server, http)


@pytest.fixture
async def box() -> AsyncIterator[Box]:
    async with started() as b:
        yield b


def code_of(body: dict[str, Any], listener: str, path: str) -> str:
    """The error code of a refusal, checking that it is in the dialect of where it was sent."""
    if listener == "comfyui" or path.startswith("/upstream/comfyui/"):
        assert body["node_errors"] == {}
        return str(body["error"]["type"])
    if listener == "ollama" or path == "/" or path.startswith("/api/"):
        assert isinstance(body["error"], str) and body["consumer"] is None
        return str(body["code"])
    if path.startswith("/v1/chat/"):
        return str(body["error"]["code"])
    assert isinstance(body["retryable"], bool) and isinstance(body["message"], str)
    return str(body["error"])


async def expect_refused(
    box: Box,
    listener: str,
    method: str,
    path: str,
    *,
    headers: dict[str, str],
    data: bytes | None = None,
    says: str,
) -> None:
    mark = f"probe-{next(_marks)}"
    jobs = box.jobs
    async with box.http.request(
        method, box.url(listener) + path, headers={MARK: mark, **headers}, data=data
    ) as resp:
        body = await resp.json()
        assert resp.status == 403, (listener, path, body)
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert code_of(body, listener, path) == "forbidden", body
    message = json.dumps(body)
    assert says in message, message
    assert box.reached(mark) == []
    assert box.jobs == jobs


# What each listener serves: its status, its page, an Ollama route, a job route.
SURFACES: dict[str, list[tuple[str, str, bytes | None]]] = {
    "listen": [
        ("GET", "/v1/status", None),
        ("GET", "/", None),  # the dashboard, for a browser
        ("GET", "/ui/", None),
        ("GET", "/api/tags", None),
        ("POST", "/api/generate", json.dumps({"model": MODEL, "prompt": "hi"}).encode()),
        ("POST", "/v1/tts", b'{"text": "hi"}'),
        ("POST", "/v1/chat/completions", json.dumps({"model": MODEL}).encode()),
        ("GET", "/v1/events", None),
        ("GET", "/upstream/comfyui/queue", None),
    ],
    "ollama": [
        ("GET", "/api/ps", None),
        ("GET", "/", None),
        ("GET", "/api/tags", None),
        ("POST", "/api/generate", json.dumps({"model": MODEL, "prompt": "hi"}).encode()),
    ],
    "comfyui": [
        ("GET", "/system_stats", None),
        ("GET", "/", None),  # ComfyUI's own page
        ("GET", "/queue", None),
        ("POST", "/prompt", json.dumps({"prompt": GRAPH}).encode()),
    ],
}


@pytest.mark.parametrize("listener", list(SURFACES))
async def test_a_foreign_host_is_refused_on_every_listener(box: Box, listener: str) -> None:
    port = box.port(listener)
    for host in (f"{FOREIGN_HOST}:{port}", FOREIGN_HOST, "localhost.attacker.example", "[::2]"):
        for method, path, data in SURFACES[listener]:
            headers = {"Host": host, "Accept": "text/html", "Content-Type": "text/plain"}
            await expect_refused(
                box, listener, method, path, headers=headers, data=data, says="allowed_hosts"
            )


@pytest.mark.parametrize("listener", list(SURFACES))
async def test_a_foreign_origin_is_refused_on_every_listener(box: Box, listener: str) -> None:
    origins = (FOREIGN_ORIGIN, FRONT_END, "null", f"http://{FOREIGN_HOST}:{box.port(listener)}")
    for origin in origins:
        for method, path, data in SURFACES[listener]:
            headers = {"Origin": origin, "Content-Type": "text/plain"}
            await expect_refused(
                box, listener, method, path, headers=headers, data=data, says="allowed_origins"
            )


async def test_cross_site_simple_posts_run_nothing(box: Box) -> None:
    """A form or `fetch` with text/plain (no preflight) to admin, a job and model management."""
    http, base, door = box.http, box.url("listen"), box.url("ollama")
    own = {"Origin": base, "Content-Type": "text/plain"}
    body = json.dumps({"model": MODEL, "prompt": "hi", "stream": False})
    async with http.post(f"{base}/api/generate", data=body, headers=own) as resp:
        assert resp.status == 200, await resp.text()  # the model is resident now
    ollama = cast(FakeService, box.cluster.fakes["ollama"])
    unloads = ollama.unload_count
    foreign = {"Origin": FOREIGN_ORIGIN, "Content-Type": "text/plain"}
    for name in ("ollama", "mvoice"):
        await expect_refused(
            box,
            "listen",
            "POST",
            f"/v1/admin/consumers/{name}/unload",
            headers=foreign,
            data=b"{}",
            says="allowed_origins",
        )
    pull = json.dumps({"model": PULLABLE}).encode()
    delete = json.dumps({"model": MODEL}).encode()
    for listener in ("listen", "ollama"):
        for method, path, data in (
            ("POST", "/api/generate", body.encode()),
            ("POST", "/api/chat", json.dumps({"model": MODEL, "messages": []}).encode()),
            ("POST", "/api/pull", pull),
            ("DELETE", "/api/delete", delete),
            ("POST", "/api/create", json.dumps({"model": "x", "from": MODEL}).encode()),
        ):
            await expect_refused(
                box, listener, method, path, headers=foreign, data=data, says="allowed_origins"
            )
    for path, data in (
        ("/prompt", json.dumps({"prompt": GRAPH}).encode()),
        ("/free", b"{}"),
        ("/upload/image", b"an image, as a form would send it"),
    ):
        await expect_refused(
            box, "comfyui", "POST", path, headers=foreign, data=data, says="allowed_origins"
        )
    assert ollama.unload_count == unloads
    async with http.get(f"{door}/api/tags") as resp:
        listed = {m["name"] for m in (await resp.json())["models"]}
    assert MODEL in listed and PULLABLE not in listed  # neither deleted nor pulled
    # The control: the same unload from the dashboard's own origin runs.
    async with http.post(f"{base}/v1/admin/consumers/ollama/unload", headers=own) as resp:
        assert resp.status == 200, await resp.text()
    assert ollama.unload_count > unloads


@pytest.mark.parametrize(
    ("listener", "path"), [("listen", "/upstream/comfyui/ws"), ("comfyui", "/ws")]
)
async def test_a_websocket_upgrade_from_a_foreign_origin_is_refused(
    box: Box, listener: str, path: str
) -> None:
    comfyui = cast(FakeService, box.cluster.fakes["comfyui"])
    url = f"{box.url(listener)}{path}?clientId=c1"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await box.http.ws_connect(url, origin=FOREIGN_ORIGIN)
    assert refused.value.status == 403
    assert not [r for r in list(comfyui.received) if r.path == "/ws"]
    # The page ComfyUI's door serves (its own origin) follows its websocket as before.
    async with box.http.ws_connect(url, origin=box.url(listener)) as ws:
        hello = await ws.receive_json(timeout=5)
        assert hello["data"]["sid"] == "c1"


@pytest.mark.parametrize("listener", list(SURFACES))
async def test_own_origin_loopback_names_and_no_origin_are_served(box: Box, listener: str) -> None:
    port = box.port(listener)
    served = [
        {"Origin": box.url(listener)},  # a page the listener served, as it was opened
        {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
        {"Host": f"[::1]:{port}", "Origin": f"http://[::1]:{port}"},
        {"Host": f"LOCALHOST.:{port}"},
        {"Host": "127.0.0.1"},  # any port: an SSH tunnel, a local proxy
        {},  # curl, SDKs, servers such as Open WebUI
    ]
    method, path, _ = SURFACES[listener][0]
    for headers in served:
        mark = f"served-{next(_marks)}"
        async with box.http.request(
            method, box.url(listener) + path, headers={MARK: mark, **headers}
        ) as resp:
            assert resp.status == 200, (headers, await resp.text())
            assert "Access-Control-Allow-Origin" not in resp.headers  # same-origin: no CORS
        if listener != "listen":  # /v1/status is the broker's own; a door's reaches upstream
            assert box.reached(mark) == [f"{listener} {method} {path}"]


async def test_a_job_from_the_own_origin_runs(box: Box) -> None:
    base = box.url("listen")
    mark = "own-job"
    body = json.dumps({"model": MODEL, "prompt": "hi", "stream": False})
    headers = {"Origin": base, "Content-Type": "text/plain", MARK: mark}
    async with box.http.post(f"{base}/api/generate", data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    assert box.reached(mark) == ["ollama POST /api/generate"]
    assert box.jobs == 1


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
async def test_a_listener_on_ipv6_loopback_serves_its_own_origin() -> None:
    async with await start_cluster(spec=spec()) as cluster:
        config = registry(cluster).model_copy(update={"listen": "[::1]:0"})
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            base = server.url
            assert base.startswith("http://[::1]:")
            async with http.get(f"{base}/v1/status", headers={"Origin": base}) as resp:
                assert resp.status == 200
            async with http.post(
                f"{base}/v1/tts", json={"text": "hi"}, headers={"Origin": base}
            ) as resp:
                assert resp.status == 200, await resp.text()
            foreign = {"Origin": FOREIGN_ORIGIN}
            async with http.post(f"{base}/v1/tts", json={}, headers=foreign) as resp:
                assert resp.status == 403
            async with http.get(f"{base}/v1/status", headers={"Host": FOREIGN_HOST}) as resp:
                assert resp.status == 403


async def test_an_allowed_origin_gets_cors_headers_and_its_preflight_answered() -> None:
    async with started(allowed_origins=[FRONT_END + "/"]) as box:
        http, base = box.http, box.url("listen")
        origin = {"Origin": FRONT_END}
        preflight = {
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        }
        for listener, path in (
            ("listen", "/api/chat"),
            ("ollama", "/api/chat"),
            ("comfyui", "/prompt"),
        ):
            mark = f"preflight-{listener}"
            async with http.options(
                box.url(listener) + path, headers={MARK: mark, **preflight}
            ) as resp:
                assert resp.status == 204
                assert resp.headers["Access-Control-Allow-Origin"] == FRONT_END
                assert "POST" in resp.headers["Access-Control-Allow-Methods"]
                assert resp.headers["Access-Control-Allow-Headers"] == "content-type, authorization"
                assert "Origin" in resp.headers["Vary"]
                assert "Access-Control-Allow-Private-Network" not in resp.headers
            assert box.reached(mark) == []  # answered by the broker, never forwarded
        # A page on a public address asks Chromium's Private Network Access question too.
        private = {**preflight, "Access-Control-Request-Private-Network": "true"}
        async with http.options(f"{base}/api/chat", headers=private) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Private-Network"] == "true"
        # A preflight from a page not listed: refused, with no CORS headers.
        foreign = {**preflight, "Origin": FOREIGN_ORIGIN}
        async with http.options(f"{base}/api/chat", headers=foreign) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
        # A streamed job, the events stream and a plain answer all carry the headers.
        body = {"model": MODEL, "prompt": "hi", "stream": True}
        async with http.post(f"{base}/api/generate", json=body, headers=origin) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == FRONT_END
            lines = [json.loads(line) async for line in resp.content if line.strip()]
        assert lines[-1]["done"] is True
        async with http.get(f"{base}/v1/events", headers=origin) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == FRONT_END
        async with http.get(f"{box.url('comfyui')}/queue", headers=origin) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == FRONT_END
            assert resp.headers["Vary"].count("Origin") == 1
        # The own origin and Origin-less clients get no CORS headers.
        for headers in ({"Origin": base}, {}):
            async with http.get(f"{base}/v1/status", headers=headers) as resp:
                assert resp.status == 200
                assert "Access-Control-Allow-Origin" not in resp.headers
        # Listed by origin, not by host: the same page on another port is another origin.
        async with http.get(
            f"{base}/v1/status", headers={"Origin": "http://localhost:3001"}
        ) as resp:
            assert resp.status == 403


async def test_allowed_hosts_lets_a_name_in() -> None:
    async with started(allowed_hosts=["GpuBox.lan"]) as box:
        base, port = box.url("listen"), box.port("listen")
        for host in (f"gpubox.lan:{port}", "gpubox.lan"):
            headers = {"Host": host, "Origin": f"http://{host}"}
            async with box.http.get(f"{base}/v1/status", headers=headers) as resp:
                assert resp.status == 200, host
        async with box.http.get(f"{base}/v1/status", headers={"Host": "other.lan"}) as resp:
            assert resp.status == 403
    async with started(allowed_hosts=["*"]) as box:
        headers = {"Host": FOREIGN_HOST}
        async with box.http.get(f"{box.url('comfyui')}/queue", headers=headers) as resp:
            assert resp.status == 200
        # "*" opens the names (DNS rebinding is then the operator's to stop, at a proxy
        # that checks Host), not the origins: a page of another site is still refused.
        headers = {"Host": FOREIGN_HOST, "Origin": "http://elsewhere.example"}
        async with box.http.get(f"{box.url('comfyui')}/queue", headers=headers) as resp:
            assert resp.status == 403


def lan_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))
            address: str = sock.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


async def test_a_listener_beyond_loopback_serves_its_address_and_only_listed_names() -> None:
    address = lan_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to listen on")
    async with await start_cluster(spec=spec()) as cluster:
        config = registry(cluster, token="s3cret", allowed_hosts=["gpubox.lan"])
        config = config.model_copy(update={"listen": "0.0.0.0:0"})
        token = {"Authorization": "Bearer s3cret"}
        async with running_broker(config) as server, aiohttp.ClientSession() as http:
            port = int(server.url.rsplit(":", 1)[1])
            base = f"http://{address}:{port}"
            for host, status in (
                (f"{address}:{port}", 200),  # the address the connection arrived on
                (f"gpubox.lan:{port}", 200),  # listed
                (f"gpubox:{port}", 403),  # a name it may be reached by, but not listed
                ("192.0.2.55", 403),  # another machine's address
            ):
                headers = {"Host": host, **token}
                async with http.get(f"{base}/v1/status", headers=headers) as resp:
                    assert resp.status == status, host
