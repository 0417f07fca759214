"""`mgpumanager init` on a box whose services run in containers: it lists them, places each
service found in its container (by the listening process's cgroup, or by a published port),
proposes `container:` (and `type: docker` for whisper.cpp, which has no unload of its own),
and check-config then refuses a container that is gone. A fake Engine API stands in for
Docker (tests/fake_docker.py); the real one is tests/docker's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from test_init import box_spec, fake_system, port_of, scan_of

from fake_docker import FakeContainer, FakeDocker, serving
from mgpumanager.cli import main as cli_main
from mgpumanager.registry import load_config
from mgpumanager.sim.cluster import start_cluster
from mgpumanager.tools.init import run_init
from mgpumanager.upstreams.containers import DockerClient


async def test_init_proposes_the_containers_services_run_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = box_spec(mvoice=None, comfyui=None, speaches=None, vllm=None)
    fake = FakeDocker()
    async with (
        await start_cluster(total_mib=40960, spec=spec) as box,
        serving(fake, tmp_path / "docker.sock") as socket_path,
    ):
        system = fake_system(box)
        # whisper publishes its port (a bridge network: the listener is docker-proxy);
        # ollama uses the host's network, and its process's cgroup names its container.
        whisper_port = port_of(box.urls["whisper"])
        fake.add(
            FakeContainer("stt", image="whisper.cpp", host_network=False, ports=[whisper_port])
        )
        ollama = fake.add(FakeContainer("llm", image="ollama/ollama:latest"))
        fake.add(FakeContainer("webui", image="open-webui:main", gpu=False, running=False))
        proc_root = tmp_path / "proc"
        pid = system.listening_pid(port_of(box.urls["ollama"]))
        assert pid is not None
        (proc_root / str(pid)).mkdir(parents=True)
        (proc_root / str(pid) / "cgroup").write_text(f"0::/docker/{ollama.id}\n")
        out = tmp_path / "consumers.yaml"
        _, report = await run_init(
            scan=scan_of(box),
            out=out,
            gpu_sim=box.gpu_url,
            usual_ports=(),
            system=system,
            proc_root=proc_root,
            docker=DockerClient(socket_path),
        )
        written = yaml.safe_load(out.read_text())["consumers"]
        assert written["whisper"]["type"] == "docker"
        assert written["whisper"]["container"] == "stt"
        assert "unload" not in written["whisper"] and "load" not in written["whisper"]
        assert written["ollama"]["type"] == "ollama"  # its API and models stay its own
        assert written["ollama"]["container"] == "llm"
        assert list(written["ollama"])[:3] == ["type", "url", "container"]
        config = load_config(out)
        assert config.consumers["whisper"].gpu_processes[-1] == "[container:stt]"
        assert "Containers:" in report
        assert "llm" in report and "ollama/ollama:latest" in report and "host network" in report
        assert f"ports {port_of(box.urls['whisper'])}" in report
        assert "webui" not in report  # not running
        # check-config asks Docker: both exist; once one is removed, the file is refused.
        monkeypatch.setenv("DOCKER_HOST", f"unix://{socket_path}")
        # (In a thread: its blocking calls go to the fake on this loop.)
        assert await asyncio.to_thread(cli_main, ["check-config", str(out)]) == 0
        del fake.containers["stt"]
        assert await asyncio.to_thread(cli_main, ["check-config", str(out)]) == 2


async def test_without_docker_init_says_so(tmp_path: Path) -> None:
    spec = box_spec(mvoice=None, comfyui=None, speaches=None, vllm=None, ollama=None)
    async with await start_cluster(total_mib=40960, spec=spec) as box:
        out = tmp_path / "consumers.yaml"
        _, report = await run_init(
            scan=scan_of(box),
            out=out,
            gpu_sim=box.gpu_url,
            usual_ports=(),
            system=fake_system(box),
            docker=DockerClient(str(tmp_path / "none.sock")),
        )
    assert "Containers: not listed (Docker is not reachable" in report
    assert "container" not in yaml.safe_load(out.read_text())["consumers"]["whisper"]
