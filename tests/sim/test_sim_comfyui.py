"""Fake ComfyUI: /prompt answers before the work, ws events, history, /free, /interrupt, queue."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from mgpumanager.sim import ComfyUISettings, FakeComfyUI, LocalLedger, SimGPU, serving, wait_until

GRAPH: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 1}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
}


def make(gpu: SimGPU, **kw: Any) -> FakeComfyUI:
    base: dict[str, Any] = {
        "model_mib": 12000,
        "ctx_mib": 300,
        "load_s": 0,
        "run_s": 0,
        "free_delay_s": 0,
    }
    base.update(kw)
    return FakeComfyUI(ComfyUISettings(**base), ledger=LocalLedger(gpu))


async def until_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str) -> list[dict[str, Any]]:
    """Messages up to and including ``executing`` with ``node: null`` for ``prompt_id``."""
    seen: list[dict[str, Any]] = []
    while True:
        msg = await ws.receive_json(timeout=5)
        seen.append(msg)
        data = msg["data"]
        if msg["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
            return seen


async def post_prompt(http: aiohttp.ClientSession, **extra: Any) -> str:
    async with http.post("/prompt", json={"prompt": GRAPH, **extra}) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
    return str(body["prompt_id"])


async def test_prompt_answers_at_once_and_the_work_runs_afterwards() -> None:
    gpu = SimGPU(24576)
    fake = make(gpu, run_s=0.4)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.ws_connect("/ws?clientId=me") as ws:
            hello = await ws.receive_json(timeout=5)
            assert hello == {
                "type": "status",
                "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "me"},
            }
            pid = await post_prompt(http, client_id="me", prompt_id="my-id")
            assert pid == "my-id"
            async with http.get(f"/history/{pid}") as r:
                assert await r.json() == {}  # answered, but the image is still being made
            async with http.get("/queue") as r:
                queue = await r.json()
            assert [item[1] for item in queue["queue_running"] + queue["queue_pending"]] == [pid]
            events = await until_done(ws, pid)
        kinds = [e["type"] for e in events if e["type"] != "status"]
        assert kinds[:2] == ["execution_start", "execution_cached"]
        assert kinds[-2:] == ["execution_success", "executing"]
        executing = [e["data"]["node"] for e in events if e["type"] == "executing"]
        assert executing == ["4", "6", "3", "9", None]
        [executed] = [e["data"] for e in events if e["type"] == "executed"]
        image = executed["output"]["images"][0]
        async with http.get(f"/history/{pid}") as r:
            entry = (await r.json())[pid]
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert entry["outputs"]["9"]["images"] == [image] and image["type"] == "output"
        assert entry["prompt"][1] == pid
        async with http.get("/history") as r:
            assert list(await r.json()) == [pid]
        async with http.get(
            "/view", params={"filename": image["filename"], "subfolder": "", "type": "output"}
        ) as r:
            assert r.content_type == "image/png" and (await r.read()).startswith(b"\x89PNG")
        async with http.get("/view", params={"filename": "nope.png"}) as r:
            assert r.status == 404
    assert gpu.allocations() == {("comfyui", "cuda_context"): 300, ("comfyui", "weights"): 12000}
    assert fake.prompts_started == [pid]


async def test_free_only_sets_flags_and_the_context_stays() -> None:
    gpu = SimGPU(24576)
    fake = make(gpu, run_s=0.3, free_delay_s=0.3)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.ws_connect("/ws?clientId=c") as ws:
            pid = await post_prompt(http, client_id="c")
            await wait_until(lambda: fake.running is not None and fake.model_loaded, what="running")
            async with http.post("/free", json={"unload_models": True, "free_memory": True}) as r:
                assert r.status == 200
            assert gpu.held_by("comfyui") == 12300  # flags only: the running prompt goes on
            events = await until_done(ws, pid)
        assert "execution_success" in [e["type"] for e in events]
        await wait_until(lambda: gpu.held_by("comfyui") == 300, what="weights freed")
        assert not fake.model_loaded and fake.unload_count == 1
        # Idle: /free answers at once, the memory follows free_delay_s later.
        await post_prompt(http)
        await wait_until(
            lambda: gpu.held_by("comfyui") == 12300 and fake.running is None, what="done"
        )
        async with http.post("/free", json={"unload_models": True}) as r:
            assert r.status == 200
        assert gpu.held_by("comfyui") == 12300
        await wait_until(lambda: gpu.held_by("comfyui") == 300, what="weights freed when idle")


async def test_interrupt_stops_the_running_prompt_at_the_next_node() -> None:
    gpu = SimGPU(24576)
    fake = make(gpu, run_s=2)  # 0.5 s a node
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.ws_connect("/ws?clientId=c") as ws:
            pid = await post_prompt(http, client_id="c")
            await wait_until(lambda: fake.running is not None, what="running")
            async with http.post("/interrupt", json={"prompt_id": "someone-else"}) as r:
                assert r.status == 200
            assert fake.running is not None
            async with http.post("/interrupt") as r:
                assert r.status == 200
            events = await until_done(ws, pid)
        # The node that ran ("4") finished; the interrupt stopped the prompt before "6".
        [interrupted] = [e["data"] for e in events if e["type"] == "execution_interrupted"]
        assert interrupted["prompt_id"] == pid and interrupted["node_id"] == "6"
        assert interrupted["executed"] == ["4"]
        async with http.get(f"/history/{pid}") as r:
            status = (await r.json())[pid]["status"]
        assert (status["status_str"], status["completed"]) == ("error", False)


async def test_queue_delete_and_clear() -> None:
    fake = make(SimGPU(24576), run_s=30)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        first = await post_prompt(http)
        await wait_until(lambda: fake.running is not None, what="running")
        second, third = await post_prompt(http), await post_prompt(http)
        async with http.post("/queue", json={"delete": [third]}) as r:
            assert r.status == 200
        async with http.get("/queue") as r:
            queue = await r.json()
        assert [i[1] for i in queue["queue_running"]] == [first]
        assert [i[1] for i in queue["queue_pending"]] == [second]
        async with http.get("/prompt") as r:
            assert await r.json() == {"exec_info": {"queue_remaining": 2}}
        async with http.post("/queue", json={"clear": True}) as r:
            assert r.status == 200
        assert fake.queue == []


@pytest.mark.parametrize(
    "body",
    [{}, {"prompt": {}}, {"prompt": {"1": {"inputs": {}}}}, {"prompt": {"1": "x"}}, {"prompt": []}],
)
async def test_invalid_graphs_are_refused(body: dict[str, Any]) -> None:
    fake = make(SimGPU(24576))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/prompt", json=body) as r:
            assert r.status == 400
            answer = await r.json()
        assert set(answer) == {"error", "node_errors"} and "type" in answer["error"]
    assert fake.prompts_started == []


async def test_cuda_oom_is_an_execution_error() -> None:
    gpu = SimGPU(24576)
    gpu.allocate("ollama", 14000)
    fake = make(gpu)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.ws_connect("/ws?clientId=oom") as ws:
            pid = await post_prompt(http, client_id="oom")
            events = await until_done(ws, pid)
        [error] = [e["data"] for e in events if e["type"] == "execution_error"]
        assert "CUDA out of memory" in error["exception_message"]
        async with http.get(f"/history/{pid}") as r:
            assert (await r.json())[pid]["status"]["status_str"] == "error"
        async with http.get("/system_stats") as r:
            device = (await r.json())["devices"][0]
    assert not fake.model_loaded and gpu.oom_count == 1
    assert gpu.held_by("comfyui") == 300  # the context got in; the weights did not
    assert device["vram_total"] == 24576 * 1024 * 1024
    assert device["vram_free"] == (24576 - 14300) * 1024 * 1024
    assert device["torch_vram_total"] == 300 * 1024 * 1024


async def test_outputs_are_named_as_comfyui_names_them() -> None:
    fake = make(SimGPU(24576))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.ws_connect("/ws?clientId=n") as ws:
            first = await post_prompt(http, client_id="n")
            await until_done(ws, first)
            # Another seed: an unchanged graph would be all cached, its image the same file.
            graph = {**GRAPH, "3": {"class_type": "KSampler", "inputs": {"seed": 2}}}
            async with http.post("/prompt", json={"prompt": graph, "client_id": "n"}) as r:
                second = (await r.json())["prompt_id"]
            await until_done(ws, second)
        names = []
        for pid in (first, second):
            async with http.get(f"/history/{pid}") as r:
                names.append((await r.json())[pid]["outputs"]["9"]["images"][0]["filename"])
    assert names == ["x_00001_.png", "x_00002_.png"]  # GRAPH's filename_prefix is "x"


async def test_every_route_is_served_under_api_too() -> None:
    fake = make(SimGPU(24576))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.ws_connect("/api/ws?clientId=front") as ws:
            async with http.post("/api/prompt", json={"prompt": GRAPH, "client_id": "front"}) as r:
                pid = (await r.json())["prompt_id"]
            events = await until_done(ws, pid)
        assert any(e["type"] == "execution_success" for e in events)
        async with http.get(f"/api/history/{pid}") as r:
            image = (await r.json())[pid]["outputs"]["9"]["images"][0]
        async with http.get("/api/view", params=image) as r:
            assert (await r.read()).startswith(b"\x89PNG")
        async with http.get("/api/system_stats") as r:
            assert "devices" in await r.json()


def image_form(data: bytes, name: str = "cat.png", **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    return form


async def test_upload_image_view_it_and_object_info_lists_it() -> None:
    fake = make(SimGPU(24576))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/upload/image", data=image_form(b"one")) as r:
            assert await r.json() == {"name": "cat.png", "subfolder": "", "type": "input"}
        async with http.post("/upload/image", data=image_form(b"one")) as r:
            assert (await r.json())["name"] == "cat.png"  # the same bytes: the same file
        async with http.post("/upload/image", data=image_form(b"two")) as r:
            assert (await r.json())["name"] == "cat (1).png"
        async with http.post("/upload/image", data=image_form(b"3", overwrite="true")) as r:
            assert (await r.json())["name"] == "cat.png"
        async with http.get("/view", params={"filename": "cat.png", "type": "input"}) as r:
            assert await r.read() == b"3"
        async with http.get("/view", params={"filename": "cat.png", "type": "output"}) as r:
            assert r.status == 404
        async with http.post("/upload/image", data=b"not a form") as r:
            assert r.status == 400
        async with http.get("/object_info") as r:
            nodes = await r.json()
        assert {"KSampler", "SaveImage", "CheckpointLoaderSimple", "LoadImage"} <= set(nodes)
        assert nodes["SaveImage"]["output_node"] is True
        assert nodes["LoadImage"]["input"]["required"]["image"][0] == ["cat (1).png", "cat.png"]
        async with http.get("/object_info/KSampler") as r:
            assert list(await r.json()) == ["KSampler"]
        async with http.get("/object_info/Nope") as r:
            assert await r.json() == {}


async def test_an_unchanged_graph_is_cached_and_free_memory_clears_the_cache() -> None:
    gpu = SimGPU(24576)
    fake = make(gpu, run_s=0.4)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.ws_connect("/ws?clientId=c") as ws:
            first = await post_prompt(http, client_id="c")
            await until_done(ws, first)
            again = await post_prompt(http, client_id="c")
            events = await until_done(ws, again)
            [cached] = [e["data"]["nodes"] for e in events if e["type"] == "execution_cached"]
            assert cached == list(GRAPH)
            executing = [e["data"]["node"] for e in events if e["type"] == "executing"]
            assert executing == [None]  # nothing ran
            # The cached output node still reports its (same) image.
            [executed] = [e["data"] for e in events if e["type"] == "executed"]
            async with http.get(f"/history/{first}") as r:
                image = (await r.json())[first]["outputs"]["9"]["images"]
            assert executed["output"]["images"] == image
            # /free unloads (weights go) but only free_memory drops the cache.
            async with http.post("/free", json={"unload_models": True}) as r:
                assert r.status == 200
            await wait_until(lambda: not fake.model_loaded, what="unloaded")
            third = await post_prompt(http, client_id="c")
            events = await until_done(ws, third)
            assert not fake.model_loaded  # all cached: nothing loaded
            async with http.post("/free", json={"unload_models": True, "free_memory": True}) as r:
                assert r.status == 200
            await wait_until(lambda: fake.cache == {}, what="cache cleared")
            fourth = await post_prompt(http, client_id="c")
            events = await until_done(ws, fourth)
        [cached] = [e["data"]["nodes"] for e in events if e["type"] == "execution_cached"]
        assert cached == [] and fake.model_loaded and fake.load_count == 2


async def test_free_with_an_empty_body_is_a_server_error() -> None:
    fake = make(SimGPU(24576))
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/free") as r:
            assert r.status == 500
        assert fake.flags == {}


async def test_the_end_goes_only_to_the_prompts_client() -> None:
    fake = make(SimGPU(24576), run_s=0.2)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.ws_connect("/ws?clientId=other") as other:
            await other.receive_json(timeout=5)
            # No client_id: no per-node events and no `node: null` for anyone.
            pid = await post_prompt(http)
            await wait_until(lambda: pid in fake.history, what="done")
            # A prompt of another client: its events go to that client only.
            async with http.ws_connect("/ws?clientId=mine") as ws:
                mine = await post_prompt(http, client_id="mine")
                events = await until_done(ws, mine)
            assert [e["type"] for e in events if e["type"] == "progress_state"]
            seen = []
            while True:
                try:
                    seen.append(await other.receive_json(timeout=0.3))
                except TimeoutError:
                    break
        # The prompt without a client_id: its progress went to everyone, nothing else did.
        assert {e["type"] for e in seen} == {"status", "progress_state"}
        assert {e["data"]["prompt_id"] for e in seen if e["type"] == "progress_state"} == {pid}


async def test_progress_state_between_nodes() -> None:
    fake = make(SimGPU(24576), run_s=0.2)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.ws_connect("/ws?clientId=p") as ws:
            pid = await post_prompt(http, client_id="p")
            events = await until_done(ws, pid)
    kinds = [e["type"] for e in events if e["type"] not in ("status",)]
    assert kinds[:4] == ["execution_start", "execution_cached", "progress_state", "executing"]
    last = [e["data"] for e in events if e["type"] == "progress_state"][-1]
    assert last["prompt_id"] == pid
    assert {n: v["state"] for n, v in last["nodes"].items()} == dict.fromkeys(GRAPH, "finished")


async def test_unknown_node_classes_are_refused_at_prompt() -> None:
    fake = make(SimGPU(24576))
    graph = {**GRAPH, "5": {"class_type": "NoSuchNode", "inputs": {}}}
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.post("/prompt", json={"prompt": graph}) as r:
            assert r.status == 400
            answer = await r.json()
    assert answer["error"]["type"] == "invalid_prompt" and answer["node_errors"] == {}
    assert "NoSuchNode" in answer["error"]["message"]
    assert fake.prompts_started == []


async def test_a_cpu_comfyui_holds_no_card_memory() -> None:
    gpu = SimGPU(24576)
    fake = make(gpu, device="cpu", ram_mib=32000)
    async with serving(fake.app) as server, aiohttp.ClientSession(server.url) as http:
        async with http.ws_connect("/ws?clientId=cpu") as ws:
            pid = await post_prompt(http, client_id="cpu")
            await until_done(ws, pid)
        async with http.get("/system_stats") as r:
            [device] = (await r.json())["devices"]
    assert fake.model_loaded and gpu.held_by("comfyui") == 0
    assert (device["type"], device["index"]) == ("cpu", None)
    assert device["torch_vram_total"] == 32000 * 1024 * 1024  # the machine's RAM
