"""deploy/compose.yaml, its registry and the Dockerfile agree with each other and keep the
hardening they promise (the image itself is built and run by `make test-docker`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mgpumanager.registry import CONTAINER_TAG, parse_config, split_listen

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    return data


def test_the_compose_registry_checks_and_matches_the_compose_file() -> None:
    config = parse_config((ROOT / "deploy" / "compose.consumers.yaml").read_text())
    services = compose()["services"]
    broker = services["mgpumanager"]
    published = {}
    for spec in broker["ports"]:
        host, host_port, inner = spec.rsplit(":", 2)
        assert host == "127.0.0.1", spec  # loopback only
        published[int(inner)] = int(host_port)
    # Each front door is published on the service's usual port.
    for name, usual in {"ollama": 11434, "comfyui": 8188}.items():
        c = config.consumers[name]
        assert c.front_door is not None
        assert published[split_listen(c.front_door)[1]] == usual
        assert c.url == f"http://{name}:{usual}"
        assert "ports" not in services[name]  # reached only through the broker
    assert published[split_listen(config.listen)[1]] == 8770
    # The container the broker stops is the one compose names, and Docker leaves it stopped.
    comfyui = config.consumers["comfyui"]
    assert services["comfyui"]["container_name"] == comfyui.container
    assert services["comfyui"]["restart"] == "no"
    assert CONTAINER_TAG.format("ollama") in config.consumers["ollama"].gpu_processes
    assert services["ollama"]["container_name"] == "ollama"
    # Open WebUI talks to the broker's Ollama front door, by a Host the broker accepts.
    url = services["open-webui"]["environment"]["OLLAMA_BASE_URL"]
    door = config.consumers["ollama"].front_door
    assert door is not None and url == f"http://mgpumanager:{split_listen(door)[1]}"
    assert "mgpumanager" in config.auth.allowed_hosts


def test_the_broker_container_is_hardened_and_sees_the_card() -> None:
    broker = compose()["services"]["mgpumanager"]
    assert broker["read_only"] is True
    assert broker["cap_drop"] == ["ALL"]
    assert broker["security_opt"] == ["no-new-privileges:true"]
    assert broker["pid"] == "host"  # NVML's host PIDs -> their cgroups -> containers
    [device] = broker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "utility" in device["capabilities"]
    assert "/healthz" in " ".join(broker["healthcheck"]["test"])


def test_the_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user is not None and not user.group(1).startswith(("0", "root"))
    assert re.search(r"^HEALTHCHECK .*MGPU_HEALTH_URL", text, re.M | re.S)
    assert "MGPU_HEALTH_URL=http://127.0.0.1:8770/healthz" in text
    assert "--no-index" in text  # the build needs no network
