"""A reload applies `gpu` changes where it can and names precisely what needs a restart; the
broker binds its address before it probes an upstream, and a port held by another broker is
said to be one."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from conftest import Upstream, consumer, make_config, running_broker
from mgpumanager.broker import Broker
from mgpumanager.cli import port_taken
from mgpumanager.daemon import ListenError, StartupError, serve, start_server


async def test_gpu_changes_apply_where_they_can(upstream: Upstream) -> None:
    await upstream.start()
    config = make_config({"mvoice": consumer(upstream.url)})
    async with running_broker(config) as server:
        bigger_margin = make_config(
            {"mvoice": consumer(upstream.url)},
            gpu={"total_mib": 16384, "safety_margin_mib": 1024, "poll_interval_s": 0.2},
        )
        changes = await server.broker.reload(bigger_margin)
        assert "gpu.total_mib 24576 -> 16384" in changes
        assert "gpu.safety_margin_mib 512 -> 1024" in changes
        assert "gpu.poll_interval_s 0.1 -> 0.2" in changes
        status = server.broker.status()
        assert (status.gpu.total_mib, status.gpu.safety_margin_mib) == (16384, 1024)
        assert server.broker.residency.view.capacity_mib == 16384 - 1024  # what the planner uses
        # a new reader is a restart: named, with both values, and nothing applied
        moved = make_config(
            {"mvoice": consumer(upstream.url)},
            listen="127.0.0.1:1",
            gpu={"backend": "sim", "sim_url": "http://127.0.0.1:1", "total_mib": 8192},
        )
        with pytest.raises(ValueError) as refused:
            await server.broker.reload(moved)
        message = str(refused.value)
        assert "listen 127.0.0.1:0 -> 127.0.0.1:1" in message
        assert "gpu.backend static -> sim" in message
        assert "restart the service to apply it" in message
        assert server.broker.config == bigger_margin


async def test_the_address_is_bound_before_any_upstream_is_probed(upstream: Upstream) -> None:
    await upstream.start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config({"mvoice": consumer(upstream.url)}, listen=f"127.0.0.1:{port}")
        with pytest.raises(ListenError):
            await start_server(Broker(config))
    assert upstream.requests == [] and upstream.max_active == 0  # nobody was probed


async def test_a_port_held_by_another_broker_says_so(upstream: Upstream, tmp_path: Path) -> None:
    await upstream.start()
    async with running_broker(make_config({"mvoice": consumer(upstream.url)})) as first:
        registry = tmp_path / "consumers.yaml"
        registry.write_text(
            yaml.safe_dump(
                {
                    "listen": first.listener.address,
                    "gpu": {"backend": "static", "total_mib": 24576},
                    "consumers": {"mvoice": {"url": upstream.url, "vram_resident_mib": 10}},
                }
            )
        )
        with pytest.raises(StartupError) as caught:
            await serve(registry)
        assert "another mgpumanager runs there; stop it" in await port_taken(caught.value)
