"""The fake ComfyUI against the real one: the same requests replayed against both, and what
came back compared — status codes, the shapes of the answers (keys and value types; the
real server may say more than the fake, never less or otherwise), and the websocket's
message types for a fresh prompt, an unchanged one (cached), one without a client_id, and
an interrupted one. The fake's replay always runs; the comparison needs the real ComfyUI
that `make real-comfyui` builds (tests/real_comfyui.py) and skips without it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from mgpumanager.sim import ComfyUISettings, FakeComfyUI, LocalLedger, SimGPU, serving
from real_comfyui import RealComfyUI, graph, needs_real_comfyui, running, slow_graph

Record = dict[str, Any]


def shape(value: Any) -> Any:
    """Keys and value types, recursively; a list by its first item."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def differences(fake: Any, real: Any, path: str = "") -> list[str]:
    """Where the fake's shape is not within the real one's."""
    if isinstance(fake, dict) and isinstance(real, dict):
        out = []
        for key, value in fake.items():
            if key not in real:
                out.append(f"{path}.{key}: only the fake has it")
            else:
                out += differences(value, real[key], f"{path}.{key}")
        return out
    if isinstance(fake, list) and isinstance(real, list):
        if fake and real:
            return differences(fake[0], real[0], f"{path}[0]")
        return []
    # A value that may be null on one side (an optional id) is not a difference in kind.
    if fake != real and "NoneType" not in (fake, real):
        return [f"{path}: fake {fake!r}, real {real!r}"]
    return []


async def _until_end(ws: aiohttp.ClientWebSocketResponse, prompt_id: str) -> list[Record]:
    """Text messages until `executing {node: null}` for the prompt."""
    seen: list[Record] = []
    while True:
        msg = await ws.receive(timeout=60)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                raise AssertionError(f"socket closed; saw {[m['type'] for m in seen]}")
            continue
        event = msg.json()
        seen.append(event)
        data = event["data"]
        if event["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
            return seen


async def _json_or_text(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    if resp.content_type == "image/png":
        return "png" if raw.startswith(b"\x89PNG") else "not a png"
    text = raw.decode(errors="replace")
    try:
        return await resp.json(content_type=None) if text.strip() else ""
    except ValueError:
        return text


def unwrap(rec: Record, step: str, answer: dict[str, Any], prompt_id: str) -> Any:
    """/history/{id} answers {id: entry}: the entry's shape is what compares."""
    entry = answer[prompt_id]
    rec[step]["shape"] = shape(entry)
    return entry


async def replay(url: str) -> Record:
    """The requests, in order; what each answered."""
    rec: Record = {}
    async with aiohttp.ClientSession(url) as http:

        async def call(step: str, method: str, path: str, **kw: Any) -> Any:
            async with http.request(method, path, **kw) as resp:
                body = await _json_or_text(resp)
                rec[step] = {"status": resp.status, "shape": shape(body)}
                return body

        stats = await call("system_stats", "GET", "/system_stats")
        rec["device"] = {k: stats["devices"][0][k] for k in ("type", "index")}
        await call("queue", "GET", "/queue")
        await call("prompt_get", "GET", "/prompt")
        await call("object_info_save", "GET", "/object_info/SaveImage")
        refused = await call(
            "prompt_unknown_class",
            "POST",
            "/prompt",
            json={"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}},
        )
        rec["refused"] = (refused["error"]["type"], refused["node_errors"])
        await call("free_empty_body", "POST", "/free")
        await call("interrupt_idle", "POST", "/interrupt", json={})

        async with http.ws_connect("/ws?clientId=contract") as ws:
            hello = await ws.receive_json(timeout=10)
            rec["hello"] = shape(hello)
            fresh = graph("contract")
            body = {"prompt": fresh, "client_id": "contract"}
            answer = await call("prompt", "POST", "/prompt", json=body)
            events = await _until_end(ws, answer["prompt_id"])
            rec["ws_fresh"] = [e["type"] for e in events]
            rec["ws_shapes"] = {e["type"]: shape(e["data"]) for e in events}
            entry = await call("history_one", "GET", f"/history/{answer['prompt_id']}")
            entry = unwrap(rec, "history_one", entry, answer["prompt_id"])
            [image] = entry["outputs"]["4"]["images"]
            await call("view", "GET", "/view", params=image)

            answer = await call("prompt_again", "POST", "/prompt", json=body)
            events = await _until_end(ws, answer["prompt_id"])
            rec["ws_cached"] = [e["type"] for e in events]
            [cached] = [e["data"]["nodes"] for e in events if e["type"] == "execution_cached"]
            rec["cached_again"] = sorted(cached)

            free = {"unload_models": True, "free_memory": True}
            await call("free", "POST", "/free", json=free)
            # ComfyUI's worker applies the flags when it next comes round: at once when it
            # waits, after the next prompt when it is still tidying up after the last one.
            await asyncio.sleep(1.0)
            answer = await call("prompt_after_free", "POST", "/prompt", json=body)
            events = await _until_end(ws, answer["prompt_id"])
            [cached] = [e["data"]["nodes"] for e in events if e["type"] == "execution_cached"]
            rec["cached_after_free"] = sorted(cached)

            # Without a client_id only `status` and `progress_state` (sent to everyone) reach
            # this socket: in particular no `executing {node: null}`.
            answer = await call("prompt_no_client", "POST", "/prompt", json={"prompt": graph()})
            seen: list[str] = []
            while True:
                async with http.get(f"/history/{answer['prompt_id']}") as resp:
                    if answer["prompt_id"] in await resp.json():
                        break
                await asyncio.sleep(0.05)
            while True:
                try:
                    seen.append((await ws.receive_json(timeout=0.5))["type"])
                except TimeoutError:
                    break
            rec["ws_no_client"] = sorted(set(seen))

            body = {"prompt": slow_graph("contract-slow"), "client_id": "contract"}
            answer = await call("prompt_slow", "POST", "/prompt", json=body)
            while True:
                event = await ws.receive_json(timeout=60)
                if event["type"] == "executing" and event["data"]["node"] == "2":
                    break
            await call("interrupt", "POST", "/interrupt", json={"prompt_id": answer["prompt_id"]})
            events = await _until_end(ws, answer["prompt_id"])
            rec["ws_interrupted_tail"] = [e["type"] for e in events][-3:]
            [stopped] = [e["data"] for e in events if e["type"] == "execution_interrupted"]
            # `executed` is a set in ComfyUI (list(set)): its order is not part of the answer.
            node, executed = stopped["node_id"], sorted(stopped["executed"])
            rec["interrupted_node"] = (node, executed)  # the fake's own, exactly (below)
            # Where the real one stops depends on timing: inside the running node where it
            # checks the flag, else at the next boundary. What holds either way: it stopped
            # before the end, and exactly the nodes before the one it stopped at had run.
            rec["interrupted_at"] = {
                "before_the_end": node != "4",
                "ran_the_nodes_before_it": executed == [n for n in "123" if n < node],
            }
            entry = await call("history_interrupted", "GET", f"/history/{answer['prompt_id']}")
            status = unwrap(rec, "history_interrupted", entry, answer["prompt_id"])["status"]
            rec["interrupted_status"] = (status["status_str"], status["completed"])

        form = aiohttp.FormData()
        form.add_field("image", b"\x89PNG contract", filename="c.png", content_type="image/png")
        await call("upload", "POST", "/upload/image", data=form)
    return rec


@asynccontextmanager
async def fake_comfyui() -> AsyncIterator[str]:
    # As the real one runs in these tests: on the CPU, no model to load, a second a prompt.
    settings = ComfyUISettings(device="cpu", load_s=0, run_s=1.0, free_delay_s=0)
    fake = FakeComfyUI(settings, ledger=LocalLedger(SimGPU(24576)))
    async with serving(fake.app) as server:
        yield server.url


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealComfyUI]:
    with running(tmp_path_factory.mktemp("comfyui-contract")) as comfy:
        yield comfy


@pytest.mark.timeout(60)
async def test_the_replay_against_the_fake() -> None:
    async with fake_comfyui() as url:
        rec = await replay(url)
    assert rec["refused"] == ("invalid_prompt", {})
    assert rec["free_empty_body"]["status"] == 500 and rec["free"]["status"] == 200
    assert rec["cached_again"] == ["1", "2", "3", "4"] and rec["cached_after_free"] == []
    assert rec["ws_no_client"] == ["progress_state", "status"]
    assert rec["interrupted_node"] == ("3", ["1", "2"])


@needs_real_comfyui
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_the_fake_answers_as_the_real_comfyui_does(real: RealComfyUI) -> None:
    async with fake_comfyui() as url:
        fake = await replay(url)
    actual = await replay(real.url)
    problems = []
    for step, got in actual.items():
        if step == "interrupted_node":  # timing (see replay); interrupted_at compares it
            continue
        mine = fake[step]
        if isinstance(got, dict) and "status" in got and "shape" in got:
            if mine["status"] != got["status"]:
                problems.append(f"{step}: status fake {mine['status']}, real {got['status']}")
            problems += [f"{step}{d}" for d in differences(mine["shape"], got["shape"])]
        elif step == "ws_shapes":
            for kind, data in got.items():
                if kind not in mine:
                    problems.append(f"ws {kind}: the fake never sends it")
                else:
                    problems += [f"ws {kind}{d}" for d in differences(mine[kind], data)]
        elif mine != got:
            problems.append(f"{step}: fake {mine!r}, real {got!r}")
    assert problems == [], "\n".join(problems)
