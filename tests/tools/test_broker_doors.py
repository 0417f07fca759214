"""`mgpumanager init` beside a running broker: its `listen` address and each of its front doors
(which answer as the service behind them) are the broker, never a service to propose; the
doors are read from the broker's own /v1/status."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from test_proposal import FakeSystem

from conftest import running_broker
from mgpumanager.registry import Config
from mgpumanager.sim.single import serve_one
from mgpumanager.tools.discover import Target
from mgpumanager.tools.init import run_init


def target(url_or_address: str) -> Target:
    host, port = url_or_address.removeprefix("http://").rsplit(":", 1)
    return Target(host, int(port), scanned=True)


async def test_a_front_door_is_not_proposed_as_a_second_service(tmp_path: Path) -> None:
    comfy = await serve_one(
        argparse.Namespace(
            service="comfyui", port=0, host="127.0.0.1", total_mib=24576, gpu=None, model=[],
            instant=True,
        )
    )  # fmt: skip
    config = Config.model_validate(
        {
            "listen": "127.0.0.1:0",
            "gpu": {"backend": "static", "total_mib": 24576},
            "routing": {"image": "comfyui"},
            "consumers": {
                "comfyui": {
                    "type": "comfyui",
                    "url": comfy.url,
                    "vram_resident_mib": 12300,
                    "front_door": "127.0.0.1:0",
                }
            },
        }
    )
    out = tmp_path / "consumers.yaml"
    try:
        async with running_broker(config) as server:
            door = server.front_doors["comfyui"].address
            plan, report = await run_init(
                scan=[target(server.url), target(door), target(comfy.url)],
                out=out,
                total_mib=24576,
                usual_ports=(),
                system=FakeSystem({}, {}),
            )
    finally:
        await comfy.aclose()
    # the real ComfyUI, once; neither the broker nor its door
    assert [c.service.target.address for c in plan.consumers] == [target(comfy.url).address]
    data = yaml.safe_load(out.read_text())
    assert [c["url"] for c in data["consumers"].values()] == [comfy.url]
    assert data["routing"] == {"image": next(iter(data["consumers"]))}
    assert f"{door}: the front door of the mgpumanager broker at" in report
    assert "(its consumer comfyui): left out" in report
    assert "an mgpumanager broker already answers there (left out)" in report
