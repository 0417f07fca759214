"""`mgpumanager sim SERVICE --port N`: each fake alone on a port of the user's choice (here 0),
answering as the real service does (init's discovery names it), and fakes that share one
simulated card (`sim gpu`) allocate on it."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiohttp
import pytest

from mgpumanager.sim.single import FAKES, SERVICES, serve_one
from mgpumanager.tools.discover import Service, ServiceKind, Target, probe

KINDS = {
    "ollama": ServiceKind.OLLAMA,
    "comfyui": ServiceKind.COMFYUI,
    "speaches": ServiceKind.SPEACHES,
    "whisper": ServiceKind.WHISPER,
    "mvoice": ServiceKind.MVOICE,
    "vllm": ServiceKind.VLLM,
}


def args(service: str, **given: object) -> argparse.Namespace:
    defaults: dict[str, object] = {
        "port": 0,
        "host": "127.0.0.1",
        "total_mib": 24576,
        "gpu": None,
        "model": [],
        "instant": True,
    }
    return argparse.Namespace(service=service, **{**defaults, **given})


def target(url: str) -> Target:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return Target(host, int(port))


def test_every_fake_and_the_card_can_run_alone() -> None:
    assert set(FAKES) == set(KINDS)
    assert ["gpu", *FAKES] == SERVICES


@pytest.mark.parametrize("service", sorted(KINDS))
async def test_each_fake_alone_is_what_discovery_says_it_is(service: str) -> None:
    running = await serve_one(args(service))
    try:
        async with aiohttp.ClientSession() as session:
            found = await probe(session, target(running.url))
        assert isinstance(found, Service), found
        assert found.kind is KINDS[service]
    finally:
        await running.aclose()


async def test_fakes_on_one_simulated_card_allocate_there() -> None:
    card = await serve_one(args("gpu", total_mib=16384))
    ollama = await serve_one(args("ollama", gpu=card.url, model=["tiny:1b=1500"]))
    try:
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny:1b", "prompt": "hi", "stream": False}
            async with session.post(ollama.url + "/api/generate", json=body) as resp:
                assert resp.status == 200, await resp.text()
            async with session.get(card.url + "/v1/gpu") as resp:
                gpu = await resp.json()
        assert gpu["total_mib"] == 16384
        assert gpu["used_mib"] >= 1500  # the model's weights, on the shared card
    finally:
        await ollama.aclose()
        await card.aclose()


async def test_the_command_prints_its_address_and_stops_on_ctrl_c() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mgpumanager.cli",
        "sim",
        "gpu",
        "--port",
        "0",
        "--total-mib",
        "8192",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 45)).decode()
        assert line.startswith("the simulated GPU (8192 MiB): http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].split(";")[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                assert (await resp.json())["total_mib"] == 8192
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode == 0, err
