"""Every device of the box: the NVML box reader (physical GPUs and MIG instances, keyed by UUID),
static `gpu.devices`, the simulated box, and each consumer's binding."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from conftest import make_config
from fake_nvml import MIB, proc
from mgpumanager.registry import GpuConfig, StaticDevice
from mgpumanager.registry.load import ConfigError, parse_config
from mgpumanager.sim.box import SimBox, sim_uuid
from mgpumanager.sim.gpu import SimGPU, gpu_app
from mgpumanager.sim.server import serve_app
from mgpumanager.upstreams.devices import DeviceProcess, DeviceReading, binding, misplaced
from mgpumanager.upstreams.devices_check import check_devices
from mgpumanager.upstreams.gpu import SimReader, device_uuids, devices_of, make_reader
from mgpumanager.upstreams.nvml_box import NvmlBoxReader


@dataclass
class Card:
    uuid: str
    total_mib: int
    used_mib: int
    procs: list[SimpleNamespace] = field(default_factory=list)
    mig: list[Card] = field(default_factory=list)


@dataclass
class FakeBox:
    """pynvml for a box of several cards; a card with `mig` instances is in MIG mode."""

    cards: list[Card]
    inits: int = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if not 0 <= index < len(self.cards):
            raise pynvml.NVMLError_InvalidArgument()
        return self.cards[index]

    def nvmlDeviceGetMigMode(self, handle: Card) -> tuple[int, int]:
        on = 1 if handle.mig else 0
        return on, on

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Card) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Card, slot: int) -> Any:
        if slot >= len(handle.mig):
            raise pynvml.NVMLError_NotFound()
        return handle.mig[slot]

    def nvmlDeviceGetUUID(self, handle: Card) -> str:
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: Card, version: int | None = None) -> Any:
        free = handle.total_mib - handle.used_mib
        return SimpleNamespace(
            total=handle.total_mib * MIB, used=handle.used_mib * MIB, free=free * MIB
        )

    def nvmlDeviceGetName(self, handle: Card) -> str:
        return f"card {handle.uuid}"

    def nvmlDeviceGetUtilizationRates(self, handle: Card) -> Any:
        return SimpleNamespace(gpu=10, memory=1)

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        return {1: "ollama serve", 2: "python main.py --cuda-device 1"}.get(pid, "x")

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Card) -> list[SimpleNamespace]:
        return handle.procs


async def test_nvml_reads_every_card_keyed_by_uuid_with_its_processes() -> None:
    box = FakeBox(
        [
            Card("GPU-aaa", 24_576, 14_000, [proc(1, 14_000)]),
            Card("GPU-bbb", 12_288, 8_000, [proc(1, 2_000), proc(2, 6_000)]),
        ]
    )
    reader = await make_reader(GpuConfig(backend="nvml"), nvml=box)
    assert isinstance(reader, NvmlBoxReader)
    assert device_uuids(reader) == ("GPU-aaa", "GPU-bbb")
    reading = await reader.read()
    assert (reading.total_mib, reading.used_mib) == (24_576 + 12_288, 22_000)
    a, b = reading.devices
    assert (a.uuid, a.index, a.total_mib, a.free_mib) == ("GPU-aaa", 0, 24_576, 10_576)
    assert [(p.pid, p.used_mib) for p in b.processes] == [(1, 2_000), (2, 6_000)]
    await reader.aclose()
    assert box.inits == 0


async def test_each_mig_instance_is_a_device() -> None:
    box = FakeBox(
        [
            Card("GPU-a100", 81_920, 0, mig=[Card("MIG-1", 40_960, 100), Card("MIG-2", 20_480, 0)]),
            Card("GPU-other", 24_576, 0),
        ]
    )
    reader = await make_reader(GpuConfig(backend="nvml"), nvml=box)
    assert device_uuids(reader) == ("MIG-1", "MIG-2", "GPU-other")
    reading = await reader.read()
    assert [d.total_mib for d in reading.devices] == [40_960, 20_480, 24_576]
    await reader.aclose()


async def test_one_card_keeps_the_one_device_reader() -> None:
    reader = await make_reader(
        GpuConfig(backend="nvml"), nvml=FakeBox([Card("GPU-solo", 24_576, 0)])
    )
    assert not isinstance(reader, NvmlBoxReader)
    assert device_uuids(reader) == ("GPU-0",)
    assert len(devices_of(await reader.read())) == 1
    await reader.aclose()


async def test_static_devices_are_read_as_cards_without_figures() -> None:
    gpu = GpuConfig(
        backend="static",
        devices=[
            StaticDevice(uuid="GPU-x", total_mib=16_000),
            StaticDevice(uuid="GPU-y", total_mib=8_000),
        ],
    )
    reader = await make_reader(gpu)
    assert reader.total_mib == 24_000
    assert device_uuids(reader) == ("GPU-x", "GPU-y")
    reading = await reader.read()
    assert [(d.uuid, d.total_mib, d.used_mib) for d in reading.devices] == [
        ("GPU-x", 16_000, None),
        ("GPU-y", 8_000, None),
    ]
    single = await make_reader(GpuConfig(backend="static", total_mib=24_576))
    assert device_uuids(single) == ("GPU-0",) and (await single.read()).devices == ()


async def test_the_simulated_box_serves_each_card() -> None:
    cards = [SimGPU(16_000, "a"), SimGPU(16_000, "b")]
    cards[1].allocate("comfyui", 12_000)
    app = await serve_app(gpu_app(cards[0], snapshot=SimBox(cards).snapshot))
    reader = SimReader(app.url)
    try:
        await reader.start()
        assert device_uuids(reader) == (sim_uuid(0), sim_uuid(1))
        reading = await reader.read()
        assert [d.used_mib for d in reading.devices] == [0, 12_000]
        assert reading.devices[1].processes[0].name == "comfyui"
    finally:
        await reader.aclose()
        await app.aclose()


def test_binding_by_index_or_uuid_default_every_device() -> None:
    config = make_config(
        {
            "a": {"url": "http://127.0.0.1:1", "vram_resident_mib": 1, "devices": [1]},
            "b": {"url": "http://127.0.0.1:2", "vram_resident_mib": 1, "devices": ["GPU-x"]},
            "c": {"url": "http://127.0.0.1:3", "vram_resident_mib": 1},
        }
    )
    assert binding(config, ["GPU-x", "GPU-y"]) == {
        "a": frozenset({"GPU-y"}),
        "b": frozenset({"GPU-x"}),
        "c": frozenset({"GPU-x", "GPU-y"}),
    }


def test_a_process_on_an_undeclared_device_is_named() -> None:
    devices = [
        DeviceReading("GPU-x", 0, "x", 100, processes=(DeviceProcess(1, "ollama serve", 10),)),
        DeviceReading("GPU-y", 1, "y", 100, processes=(DeviceProcess(2, "ollama runner", 10),)),
    ]
    assert misplaced(["ollama"], frozenset({"GPU-x"}), devices) == ["GPU-y"]
    assert misplaced(["ollama"], frozenset({"GPU-x", "GPU-y"}), devices) == []


def test_check_config_refuses_unknown_indices_and_uuids_of_static_devices() -> None:
    text = """
gpu:
  backend: static
  devices: [{uuid: GPU-x, total_mib: 16000}, {uuid: GPU-y, total_mib: 16000}]
consumers:
  a: {url: "http://127.0.0.1:1", vram_resident_mib: 1, devices: [0, 2]}
  b: {url: "http://127.0.0.1:2", vram_resident_mib: 1, devices: [GPU-z]}
  c: {url: "http://127.0.0.1:3", vram_resident_mib: 15000, devices: [GPU-y]}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "consumers.yaml")
    message = str(err.value)
    assert "consumers.a.devices.1" in message and "no GPU with index 2" in message
    assert "consumers.b.devices.0" in message and "GPU-z" in message
    assert "consumers.c" not in message


async def test_check_config_reads_the_gpu_and_refuses_a_device_it_does_not_have(
    tmp_path: Path,
) -> None:
    cards = [SimGPU(16_000, "a"), SimGPU(16_000, "b")]
    app = await serve_app(gpu_app(cards[0], snapshot=SimBox(cards).snapshot))
    try:
        config = make_config(
            {
                "a": {"url": "http://127.0.0.1:1", "vram_resident_mib": 1, "devices": [1]},
                "b": {"url": "http://127.0.0.1:2", "vram_resident_mib": 1, "devices": [2]},
            },
            gpu={"backend": "sim", "sim_url": app.url},
        )
        out = io.StringIO()
        assert await check_devices(config, tmp_path / "r.yaml", out) is False
        assert "consumers.b.devices: no GPU 2" in out.getvalue()
        assert "consumers.a" not in out.getvalue()
        fine = make_config(
            {"a": {"url": "http://127.0.0.1:1", "vram_resident_mib": 1, "devices": [sim_uuid(1)]}},
            gpu={"backend": "sim", "sim_url": app.url},
        )
        assert await check_devices(fine, tmp_path / "r.yaml", out) is True
    finally:
        await app.aclose()
