"""What `mgpumanager cluster` does before it touches Ray, without Ray: one front per live node
offering `mgpu_host`, named by its host; the banner; a clear word where the extra is missing."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from mgpumanager import cli
from mgpumanager.cluster.ray_app import HostPlan, banner, plans_from_nodes


def node(name: str, address: str, *, alive: bool = True, host: bool = True) -> dict[str, object]:
    return {
        "NodeID": f"id-{address}",
        "Alive": alive,
        "NodeManagerHostname": name,
        "NodeManagerAddress": address,
        "Resources": {"CPU": 8.0, **({"mgpu_host": 1.0} if host else {})},
    }


def test_one_plan_per_live_gpu_host_node() -> None:
    nodes = [
        node("box-a", "10.0.0.1"),
        node("head", "10.0.0.9", host=False),
        node("box-b", "10.0.0.2", alive=False),
        node("box-c", "10.0.0.3"),
    ]
    plans = plans_from_nodes(nodes, "http://127.0.0.1:8770", "0.0.0.0", 8780)
    assert plans == [
        HostPlan("box-a", "id-10.0.0.1", "http://127.0.0.1:8770", "0.0.0.0", 8780),
        HostPlan("box-c", "id-10.0.0.3", "http://127.0.0.1:8770", "0.0.0.0", 8780),
    ]


def test_hosts_sharing_a_name_are_named_by_address() -> None:
    plans = plans_from_nodes([node("box", "a1"), node("box", "a2")], "u", "0.0.0.0", 1)
    assert [p.name for p in plans] == ["a1", "a2"]


def test_the_banner_says_where_clients_point() -> None:
    text = banner({"box-a": "http://10.0.0.1:8780"})
    assert "OLLAMA_HOST=http://10.0.0.1:8780" in text
    assert "http://10.0.0.1:8780/cluster/" in text


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="the ray extra is here")
def test_without_the_extra_the_command_says_how_to_get_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["cluster", "--local", "2"]) == 2
    assert "pip install 'mgpumanager[ray]'" in capsys.readouterr().err
    assert "ray" not in sys.modules
