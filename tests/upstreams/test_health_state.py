"""Health says `stopped`, not failing, for an on-demand service (one the broker starts when a
job needs it) whose process is not running: in /v1/status (`health_state`), in `status`, and in
the logs (one INFO line, no FAILED). A service that should be up and is not stays `failing`."""

from __future__ import annotations

import logging
import socket

import aiohttp
import pytest

from conftest import consumer, make_config, running_broker
from mgpumanager.tools.remote import render


def closed_port_url() -> str:
    """A loopback URL nothing listens on (bound to port 0, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_an_on_demand_service_not_running_is_stopped_not_failing(
    client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    start = {"command": ["true"], "timeout_s": 5}
    config = make_config(
        {
            "whisper": consumer(closed_port_url(), type="command", load=start, unload=start),
            "plain": consumer(closed_port_url()),  # should be up: its refusal is a failure
        }
    )
    caplog.set_level(logging.INFO, logger="mgpumanager")
    async with running_broker(config) as server:
        base = server.url
        async with client.get(base + "/v1/status") as resp:
            doc = await resp.json()
    whisper, plain = doc["consumers"]["whisper"], doc["consumers"]["plain"]
    assert (whisper["health_state"], whisper["healthy"]) == ("stopped", False)
    assert (plain["health_state"], plain["healthy"]) == ("failing", False)
    said = [r for r in caplog.records if r.getMessage().startswith("whisper:")]
    health = [r for r in said if r.name == "mgpumanager.upstreams.health"]
    assert [(r.levelno, "not running" in r.getMessage()) for r in health] == [(logging.INFO, True)]
    assert not any("FAILED" in r.getMessage() for r in said)
    assert any("plain: health FAILED" in r.getMessage() for r in caplog.records)
    picture = render(doc, base, width=120)
    [row] = [line for line in picture.splitlines() if line.lstrip().startswith("whisper")]
    assert "stopped" in row and "FAILING" not in row
