"""Each surface builds a request's JobSpec once, as it understood the request: the consumer,
the call sent upstream, the model, the facade kind, whether the client asked for a stream, the
label the queue shows. The broker is handed the spec and reads it as it is."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import SIM_MODEL, running_broker, sim_registry, sim_spec
from mgpumanager.relay.job import JobSpec
from mgpumanager.sim import start_cluster


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/api/chat", {"model": SIM_MODEL, "messages": []}, ("POST", "/api/chat", None, True)),
        (
            "/api/chat",
            {"model": SIM_MODEL, "messages": [], "stream": False},
            ("POST", "/api/chat", None, False),
        ),
        ("/api/embed", {"model": SIM_MODEL, "input": "x"}, ("POST", "/api/embed", None, False)),
        (
            "/v1/chat/completions",
            {"model": SIM_MODEL, "messages": [], "stream": True},
            ("POST", "/v1/chat/completions", None, True),
        ),
        (
            "/v1/chat/completions",
            {"model": SIM_MODEL, "messages": []},
            ("POST", "/v1/chat/completions", None, False),
        ),
        ("/v1/llm", {"model": SIM_MODEL, "prompt": "x"}, ("POST", "/api/generate", "llm", False)),
        (
            # Ollama's own API under /upstream/ streams as it does at the root (a waiting
            # client gets its frames there too).
            "/upstream/ollama/api/generate",
            {"model": SIM_MODEL, "prompt": "x"},
            ("POST", "/api/generate", None, True),
        ),
        (
            "/upstream/ollama/api/generate",
            {"model": SIM_MODEL, "prompt": "x", "stream": False},
            ("POST", "/api/generate", None, False),
        ),
    ],
)
async def test_each_surface_builds_the_job_once_as_it_understood_it(
    client: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    expected: tuple[str, str, str | None, bool],
) -> None:
    async with await start_cluster(spec=sim_spec()) as cluster:
        async with running_broker(sim_registry(cluster)) as server:
            specs: list[JobSpec] = []

            async def run_job(request: web.Request, spec: JobSpec) -> web.StreamResponse:
                specs.append(spec)
                return web.json_response({"seen": True})

            server.broker.run_job = run_job  # type: ignore[method-assign]
            async with client.post(server.url + path, json=body) as resp:
                assert resp.status == 200, await resp.text()
    [spec] = specs
    assert (spec.call.method, spec.call.path, spec.kind, spec.streams) == expected
    assert spec.consumer == "ollama"
    # The facade routes by kind and reads no model from the body (the consumer's cost
    # applies); every other surface names the model it routed by.
    model = None if spec.kind is not None else SIM_MODEL
    assert spec.model == model
    assert spec.label == (path if model is None else f"{path} {model}")
    assert spec.priority is None
