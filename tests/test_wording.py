"""What the broker says names what happened: no "None MiB" on a card it does not read, no
"busy" for a consumer whose unload is only unconfirmed, a service that answers 404 to its
health probe is not called unreachable, and an unknown consumer's name gets the list."""

from __future__ import annotations

import aiohttp
import pytest

from conftest import Upstream, consumer, make_config, running_broker, wait_for
from mgpumanager.residency.evict import _describe
from mgpumanager.residency.planner import CannotFit, Resident, plan_eviction
from mgpumanager.tools.remote import Remote, RemoteError, render
from mgpumanager.upstreams.gpu import GpuReading


def test_a_static_card_is_described_without_none() -> None:
    static = GpuReading.without_figures("static", "static (no readings)", 24576)
    said = _describe(static)
    assert "None" not in said and "24576 MiB" in said and "not read" in said


def test_an_unconfirmed_unload_is_not_called_busy() -> None:
    stuck = Resident(
        "comfyui", 12000, 0.0, busy=True, why_busy="its last unload is not confirmed yet"
    )
    decision = plan_eviction(
        target="ollama",
        target_cost_mib=14000,
        headroom_mib=10000,
        capacity_mib=24000,
        residents=[stuck],
    )
    assert isinstance(decision, CannotFit)
    assert "'comfyui' (12000 MiB, its last unload is not confirmed yet)" in decision.reason
    assert "busy" not in decision.reason
    running = plan_eviction(
        target="ollama",
        target_cost_mib=14000,
        headroom_mib=10000,
        capacity_mib=24000,
        residents=[Resident("comfyui", 12000, 0.0, busy=True)],
    )
    assert isinstance(running, CannotFit) and "(12000 MiB, busy)" in running.reason


async def test_a_404_health_answer_is_named_as_such_and_unknown_names_get_the_list(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    await upstream.start()
    wrong_path = {"path": "/no-such-health", "interval_s": 0.05, "timeout_s": 1}
    config = make_config(
        {
            "tts": consumer(upstream.url, health=wrong_path, paths={"tts": {"path": "/tts"}}),
            "other": consumer(upstream.url),
        },
        routing={"tts": "tts"},
    )
    async with running_broker(config) as server:
        base = server.url
        health = server.broker.health.states
        await wait_for(lambda: health["tts"].ok is False, what="the failed probe")
        async with client.post(base + "/v1/tts", json={"text": "hi"}) as resp:
            assert resp.status == 502
            body = await resp.json()
        assert body["error"] == "consumer_unreachable"
        assert "answers, but its health probe failed" in body["message"], body
        assert "answered 404" in body["message"] and "health.path" in body["message"]
        async with client.get(base + "/v1/status") as resp:
            doc = await resp.json()
        with pytest.raises(RemoteError, match="the consumers: tts, other"):
            await Remote(base, None).admin("nope", "unload")
    assert "None" not in render(doc, base, width=120)
