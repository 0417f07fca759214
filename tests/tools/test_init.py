"""`mgpumanager init` on a simulated box: every fake found with its type, models and measured
sizes, routing for each kind, coexistence that follows the sizes, a registry `check-config`
accepts, and a broker started on it serving a job of each kind. Once through the CLI in a
subprocess, as a user runs it."""

from __future__ import annotations

import asyncio
import math
import socket
import sys
from collections.abc import AsyncIterator
from itertools import combinations
from pathlib import Path
from typing import Any

import aiohttp
import pynvml
import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_proposal import FakeSystem, service

from conftest import running_broker, wait_for
from fake_nvml import FakeNvml
from fake_nvml import proc as gpu_proc
from mgpumanager.cli import main as cli_main
from mgpumanager.registry import Config, load_config
from mgpumanager.sim import launcher
from mgpumanager.sim.cluster import FakeSpec, SimCluster, start_cluster
from mgpumanager.sim.comfyui import ComfyUISettings
from mgpumanager.sim.mvoice import MVoiceSettings
from mgpumanager.sim.ollama import OllamaSettings
from mgpumanager.sim.server import serving
from mgpumanager.sim.speaches import SpeachesSettings
from mgpumanager.sim.vllm import VLLMSettings
from mgpumanager.sim.whisper import WhisperSettings
from mgpumanager.tools.discover import Model, Scan, ServiceKind, Target, parse_target
from mgpumanager.tools.init import InitError, registry_text, run_init
from mgpumanager.tools.procfs import Unit
from mgpumanager.tools.proposal import Gpu, make_plan
from mgpumanager.upstreams.gpu import GpuProcess, GpuReading

MIB = 1024 * 1024
TOTAL = 40960
MARGIN = 512
SMALL, LARGE = "llama3.1:8b", "qwen2.5:32b"
VLLM_MODEL = "Qwen/Qwen2.5-7B-Instruct"
STT_MODEL, TTS_MODEL = "Systran/faster-whisper-small", "speaches-ai/Kokoro-82M-v1.0-ONNX"
GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}
# What each fake holds on the card once warmed up (below): what init must measure.
MEASURED = {
    "mvoice": 6000,
    "whisper": 3000,
    "speaches": 200 + 1000,  # its CUDA context and the one model loaded
    "ollama": 6200,  # SMALL loaded; LARGE only on disk
    "vllm": 10000,
    "comfyui": 12000 + 300,  # model and CUDA context
}
TYPES = {
    "mvoice": "generic",
    "whisper": "command",
    "speaches": "speaches",
    "ollama": "ollama",
    "vllm": "vllm",
    "comfyui": "comfyui",
}


def box_spec(**kwargs: Any) -> FakeSpec:
    spec = FakeSpec(
        mvoice=MVoiceSettings(vram_mib=6000, preload=True),
        ollama=OllamaSettings(models={SMALL: 6200, LARGE: 30000}),
        comfyui=ComfyUISettings(model_mib=12000, ctx_mib=300),
        whisper=WhisperSettings(model_mib=3000),
        speaches=SpeachesSettings(),
        vllm=VLLMSettings(model=VLLM_MODEL, vram_mib=10000),
    )
    return FakeSpec(**{**spec.__dict__, **kwargs}).with_timing(
        load_s=0, run_s=0, free_delay_s=0, wake_s=0, embed_s=0
    )


async def warm_up(cluster: SimCluster) -> None:
    """Use the box as its owner would have: a chat, a transcription model, an image."""
    urls = cluster.urls
    async with aiohttp.ClientSession() as session:
        if "ollama" in urls:
            body = {"model": SMALL, "prompt": "hi", "stream": False}
            async with session.post(urls["ollama"] + "/api/generate", json=body) as resp:
                assert resp.status == 200
        if "speaches" in urls:
            async with session.post(f"{urls['speaches']}/api/ps/{STT_MODEL}") as resp:
                assert resp.status == 201
        async with session.post(urls["comfyui"] + "/prompt", json={"prompt": GRAPH}) as resp:
            prompt_id = (await resp.json())["prompt_id"]

        async def image_done() -> bool:
            async with session.get(f"{urls['comfyui']}/history/{prompt_id}") as resp:
                return bool(await resp.json())

        await wait_for(image_done, what="the warm-up image")
    expected = {n: mib for n, mib in MEASURED.items() if n in urls}
    owners = {"whisper": "whisper-server"}
    await wait_for(
        lambda: all(cluster.gpu.held_by(owners.get(n, n)) == mib for n, mib in expected.items()),
        what="every fake loaded",
    )


def fake_system(cluster: SimCluster) -> FakeSystem:
    """A pid for each fake's port; whisper runs in a systemd unit."""
    ports = {port_of(url): 1000 + i for i, url in enumerate(cluster.urls.values())}
    return FakeSystem(
        ports, {ports[port_of(cluster.urls["whisper"])]: Unit("whisper-server.service")}
    )


def port_of(url: str) -> int:
    return parse_target(url.removeprefix("http://")).port


def scan_of(cluster: SimCluster) -> list[Target]:
    return [parse_target(u.removeprefix("http://")) for u in cluster.urls.values()]


@pytest.fixture
async def box() -> AsyncIterator[SimCluster]:
    async with await start_cluster(total_mib=TOTAL, spec=box_spec()) as cluster:
        await warm_up(cluster)
        yield cluster


def consumers_of(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return dict(data["consumers"])


async def test_init_finds_every_service_and_writes_a_registry_that_checks(
    box: SimCluster, tmp_path: Path
) -> None:
    unknown = web.Application()
    with socket.socket() as silent:  # bound, not listening: nothing answers on its port
        silent.bind(("127.0.0.1", 0))
        async with serving(unknown) as other:
            scan = [*scan_of(box), parse_target(other.url.removeprefix("http://"))]
            silent_port = silent.getsockname()[1]
            scan.append(Target("127.0.0.1", silent_port, scanned=True))
            out = tmp_path / "consumers.yaml"
            plan, report = await run_init(
                scan=scan,
                out=out,
                gpu_sim=box.gpu_url,
                usual_ports=(),
                system=fake_system(box),
            )
    config = load_config(out)  # what check-config and serve read
    assert cli_main(["check-config", str(out)]) == 0
    written = consumers_of(out)

    # Every service, with the right type, at its URL.
    assert {n: c["type"] for n, c in written.items()} == TYPES
    assert {n: c.url for n, c in config.consumers.items()} == box.urls

    # Measured sizes, the Ollama model that is not loaded estimated from its size on disk.
    async with aiohttp.ClientSession() as session:
        async with session.get(box.urls["ollama"] + "/api/tags") as resp:
            tags = {m["name"]: m["size"] for m in (await resp.json())["models"]}
    large_estimate = math.ceil(math.ceil(tags[LARGE] / MIB) * 1.2)
    costs = {n: c.vram_resident_mib for n, c in config.consumers.items()}
    assert costs == {**MEASURED, "ollama": large_estimate}
    assert written["ollama"]["models"] == [
        {"name": SMALL, "vram_mib": 6200},
        {"name": LARGE, "vram_mib": large_estimate},
    ]
    assert written["speaches"]["models"] == [
        {"name": STT_MODEL, "vram_mib": MEASURED["speaches"]},
        {"name": TTS_MODEL},
    ]
    assert written["vllm"]["models"] == [{"name": VLLM_MODEL, "vram_mib": 10000}]
    assert {n: c.gpu_processes for n, c in config.consumers.items()} == {
        n: ["whisper-server" if n == "whisper" else n] for n in TYPES
    }

    # Routing for each kind, speech above chat above images.
    assert config.routing == {
        "tts": "mvoice",
        "stt": "whisper",
        "llm": "ollama",
        "image": "comfyui",
    }
    assert config.audio_proxy == "mvoice"
    assert {n: c.priority for n, c in config.consumers.items()} == {
        "mvoice": 3, "whisper": 3, "speaches": 3, "ollama": 2, "vllm": 2, "comfyui": 1,
    }  # fmt: skip

    # Coexistence: exactly the pairs that fit with the margin, and both cases occur.
    usable = TOTAL - MARGIN
    verdicts = []
    for a, b in combinations(config.consumers, 2):
        fits = costs[a] + costs[b] <= usable
        assert config.coexist(a, b) == fits, (a, b, costs[a], costs[b])
        assert (b in config.consumers[a].can_coexist_with) == fits
        verdicts.append(fits)
    assert True in verdicts and False in verdicts

    # whisper.cpp is stopped and started through its unit.
    whisper = config.consumers["whisper"]
    assert whisper.unload is not None and whisper.load is not None
    assert whisper.unload.command == [
        "systemctl", "--no-ask-password", "stop", "whisper-server.service"
    ]  # fmt: skip
    assert whisper.load.command == [
        "systemctl", "--no-ask-password", "start", "whisper-server.service"
    ]  # fmt: skip

    # Suggested front doors, as comments, with the move each needs.
    text = out.read_text()
    for name, url in box.urls.items():
        assert f"# front_door: {url.removeprefix('http://')}" in text, name
    assert "OLLAMA_HOST=127.0.0.1:" in text
    # Each service would move to a port nothing else uses (nor the silent one init was given).
    moved = [port_of(c.front_door.moved_url) for c in plan.consumers if c.front_door]
    assert len(moved) == len(set(moved)) == len(TYPES)
    taken = {port_of(u) for u in box.urls.values()} | {port_of(other.url), silent_port, 8770}
    assert not taken & set(moved)

    # The unknown port and the silent one are reported, not guessed.
    assert "not identified" in report and other.url in report
    assert "nothing answers" in report
    assert len(plan.consumers) == len(TYPES)
    assert "CHECK" in text and f"{LARGE} are estimates" in report


async def test_a_broker_on_the_written_registry_serves_a_job_of_each_kind(
    box: SimCluster, tmp_path: Path
) -> None:
    out = tmp_path / "consumers.yaml"
    await run_init(
        scan=scan_of(box), out=out, gpu_sim=box.gpu_url, usual_ports=(), system=fake_system(box)
    )
    config = load_config(out)
    box.activity.clear()
    await serve_one_job_per_kind(config, llm_model=SMALL, tts={"text": "hello"})
    # Each job ran on the consumer its kind routes to.
    assert {i.consumer for i in box.activity.intervals()} == set(config.routing.values())
    assert box.gpu.oom_count == 0


async def test_speaches_and_vllm_get_the_routes_when_alone(tmp_path: Path) -> None:
    spec = box_spec(mvoice=None, ollama=None, whisper=None)
    async with await start_cluster(total_mib=TOTAL, spec=spec) as box:
        await warm_up(box)
        out = tmp_path / "consumers.yaml"
        await run_init(scan=scan_of(box), out=out, gpu_sim=box.gpu_url, usual_ports=())
        config = load_config(out)
        assert config.routing == {
            "tts": "speaches", "stt": "speaches", "llm": "vllm", "image": "comfyui"
        }  # fmt: skip
        assert config.audio_proxy is None
        box.activity.clear()
        await serve_one_job_per_kind(config, llm_model=VLLM_MODEL, tts={"input": "hello"})
        assert {i.consumer for i in box.activity.intervals()} == {"speaches", "vllm", "comfyui"}
        assert box.gpu.oom_count == 0


async def serve_one_job_per_kind(config: Config, *, llm_model: str, tts: dict[str, Any]) -> None:
    async with running_broker(config) as broker, aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("file", b"RIFF" + b"\0" * 1024, filename="a.wav")
        jobs: dict[str, dict[str, Any]] = {
            "tts": {"json": tts},
            "stt": {"data": form},
            "llm": {"json": {"model": llm_model, "prompt": "hi", "stream": False}},
            # Not warm_up's graph: ComfyUI would answer that one from its cache, running nothing.
            "image": {"json": {"prompt": {"3": {**GRAPH["3"], "inputs": {"seed": 2}}}}},
        }
        for kind, kwargs in jobs.items():
            async with session.post(f"{broker.url}/v1/{kind}", **kwargs) as resp:
                body = await resp.read()
                assert resp.status == 200, (kind, body[:300])
                assert body, kind

        async def scheduler() -> dict[str, Any]:
            async with session.get(broker.url + "/v1/status") as resp:
                return dict((await resp.json())["scheduler"])

        # The image job ends when its prompt has finished, after /v1/image answered.
        async def all_done() -> bool:
            return bool((await scheduler())["completed"] == 4)

        await wait_for(all_done, what="four completed jobs")
        assert (await scheduler())["failed"] == 0


async def test_the_cli_in_a_subprocess(tmp_path: Path) -> None:
    """As a user runs it: the real /proc finds the whisper process (its own process, like a
    whisper-server) and its GPU memory by process id."""
    async with await start_cluster(total_mib=TOTAL, spec=box_spec(whisper_subprocess=True)) as box:
        await warm_up(box)
        out = tmp_path / "registry.yaml"
        argv = ["init", "--no-usual-ports", "--gpu-sim", box.gpu_url, "--out", str(out)]
        for url in box.urls.values():
            argv += ["--scan", url.removeprefix("http://")]

        async def cli(*extra: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mgpumanager.cli", *argv, *extra,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            stdout, stderr = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, stdout.decode(), stderr.decode()

        status, stdout, stderr = await cli()
        assert status == 0, stderr
        config = load_config(out)
        assert {n: str(c.type) for n, c in config.consumers.items()} == TYPES
        whisper = config.consumers["whisper"]
        assert whisper.vram_resident_mib == 3000 and whisper.gpu_processes == ["whisper-server"]
        assert box.whisper_process is not None
        assert f"pid {launcher_pid(box)}" in out.read_text()
        for name in TYPES:
            assert f"\n  {name} " in stdout
        assert "Check by hand:" in stdout
        first = out.read_text()

        # Never overwritten without --force: exit 2, a clear line, the file untouched.
        status, stdout, stderr = await cli()
        assert status == 2 and "--force" in stderr and "Traceback" not in stderr
        assert out.read_text() == first

        status, stdout, stderr = await cli("--force")
        assert status == 0, stderr
        assert (tmp_path / "registry.yaml.bak").read_text() == first
        load_config(out)


def launcher_pid(box: SimCluster) -> int:
    assert box.whisper_process is not None
    pid = launcher.running_pid(box.whisper_process.pidfile)
    assert pid is not None
    return pid


async def test_an_existing_file_is_refused_before_anything_is_probed(tmp_path: Path) -> None:
    out = tmp_path / "consumers.yaml"
    out.write_text("keep me\n")
    # No GPU answers at this URL: had init probed first, it would fail on that instead.
    with pytest.raises(InitError, match="--force") as refused:
        await run_init(out=out, gpu_sim="http://127.0.0.1:9", usual_ports=())
    assert refused.value.status == 2
    assert out.read_text() == "keep me\n"


async def test_nothing_found_writes_nothing(tmp_path: Path) -> None:
    async with await start_cluster(spec=FakeSpec(mvoice=None, ollama=None, comfyui=None,
                                                 whisper=None)) as gpu_only:  # fmt: skip
        out = tmp_path / "consumers.yaml"
        with pytest.raises(InitError, match="found no GPU service") as nothing:
            await run_init(out=out, gpu_sim=gpu_only.gpu_url, usual_ports=())
    assert nothing.value.status == 1
    assert not out.exists()


async def test_an_unreadable_gpu_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as nobody:  # bound, not listening: the simulated GPU is not there
        nobody.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{nobody.getsockname()[1]}"
        with pytest.raises(InitError, match="cannot read the GPU") as failed:
            await run_init(out=tmp_path / "r.yaml", gpu_sim=url, usual_ports=())
    assert failed.value.status == 1
    no_driver = FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound())
    with pytest.raises(InitError, match="--gpu-sim"):  # says how to try it without a GPU
        await run_init(out=tmp_path / "r.yaml", nvml=no_driver, usual_ports=())
    assert not (tmp_path / "r.yaml").exists()


async def test_on_nvml_memory_goes_to_the_process_listening_and_its_children(
    tmp_path: Path,
) -> None:
    """The NVML path: processes named by their command lines, attributed by process id (an
    Ollama runner is a child of `ollama serve`), sizes from NVML, not from the services."""
    spec = box_spec(mvoice=None, whisper=None, speaches=None, vllm=None)
    async with await start_cluster(total_mib=TOTAL, spec=spec) as box:
        await warm_up(box)
        proc_root = tmp_path / "proc"
        for pid, argv in {
            101: "/usr/local/bin/ollama runner --model /blobs/sha256-1 --port 40001",
            200: "/usr/bin/python3 /opt/ComfyUI/main.py --port 8188",
        }.items():
            (proc_root / str(pid)).mkdir(parents=True)
            (proc_root / str(pid) / "cmdline").write_bytes(argv.replace(" ", "\0").encode())
        nvml = FakeNvml(
            total_mib=81920, used_mib=18400, procs=[gpu_proc(101, 6100), gpu_proc(200, 12300)]
        )
        ollama, comfyui = port_of(box.urls["ollama"]), port_of(box.urls["comfyui"])
        system = FakeSystem({ollama: 100, comfyui: 200}, {100: Unit("ollama.service")})
        system.descendants = lambda pid: {101} if pid == 100 else set()  # type: ignore[method-assign]
        out = tmp_path / "consumers.yaml"
        await run_init(
            scan=scan_of(box), out=out, nvml=nvml, proc_root=proc_root, system=system,
            usual_ports=(),
        )  # fmt: skip
    config = load_config(out)
    assert config.gpu.backend == "nvml"
    assert {n: (c.vram_resident_mib, c.gpu_processes) for n, c in config.consumers.items()} == {
        "ollama": (
            math.ceil(math.ceil(int(30000 * MIB * 0.85) / MIB) * 1.2),  # LARGE, not loaded
            ["ollama"],
        ),
        "comfyui": (12300, ["ComfyUI"]),
    }
    assert config.consumers["ollama"].models[0].vram_mib == 6100  # SMALL: NVML's figure
    text = " ".join(out.read_text().replace("#", " ").split())  # comments wrap
    assert "sudo systemctl edit ollama.service" in text, text  # the port move through its unit


def test_the_cli_says_what_is_wrong_with_a_scan_address(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["init", "--scan", "not-an-address"])
    assert exited.value.code == 2
    assert "HOST:PORT" in capsys.readouterr().err


model_names = st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=6, unique=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=model_names,
    sizes=st.lists(st.integers(min_value=0, max_value=200_000), min_size=6, max_size=6),
    version=st.text(max_size=40),
    kinds=st.lists(st.sampled_from(list(ServiceKind)), min_size=1, max_size=8),
)
def test_whatever_the_services_say_the_registry_checks(
    names: list[str], sizes: list[int], version: str, kinds: list[ServiceKind]
) -> None:
    """Model names, versions and sizes come from the services: any of them must still give a
    registry that reads back as planned and passes check-config."""
    services = []
    for port, kind in enumerate(kinds, start=1):
        models = tuple(
            Model(n, i % 2 == 0, sizes[i % len(sizes)] or None, sizes[-1 - i % len(sizes)] or None)
            for i, n in enumerate(names)
        )
        services.append(
            service(
                kind,
                port,
                version=version,
                models=models,
                loaded=bool(port % 2),
                held_mib=sizes[0],
                unit=Unit(version or "x.service"),
            )
        )
    procs = tuple(GpuProcess(None, k.value, sizes[i % 6]) for i, k in enumerate(kinds))
    gpu = Gpu(GpuReading("sim", version or "g", 81920, 0, 81920, 0, procs), "http://127.0.0.1:1")
    plan = make_plan(Scan(services=services), gpu, FakeSystem({}, {}))
    text = registry_text(plan)  # raises if it does not read back or does not check
    data = yaml.safe_load(text)
    for c in plan.consumers:
        written = data["consumers"][c.name]
        assert [m["name"] for m in written.get("models", [])] == [m.name for m, _ in c.models]


def test_vllm_without_sleep_mode_is_pinned() -> None:
    svc = service(
        ServiceKind.VLLM, models=(Model(VLLM_MODEL, True),), loaded=True, sleep_mode=False
    )
    procs = (GpuProcess(None, "vllm", 9000),)
    gpu = Gpu(GpuReading("sim", "g", 81920, 9000, 72920, 0, procs), "http://127.0.0.1:1")
    plan = make_plan(Scan(services=[svc]), gpu, FakeSystem({}, {}))
    written = yaml.safe_load(registry_text(plan))["consumers"]["vllm"]
    assert written["pinned"] is True and written["vram_resident_mib"] == 9000
    assert any("without sleep mode" in line for line in plan.checks)
