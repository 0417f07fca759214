"""`proposal`: sizes from what was measured or said, GPU processes given to their services by
process id and name, and nothing guessed where two services could own a process."""

from __future__ import annotations

from typing import Any

from mgpumanager.tools.discover import Model, Service, ServiceKind, Target
from mgpumanager.tools.procfs import Unit
from mgpumanager.tools.proposal import Consumer, attribute, process_pattern, size_consumer
from mgpumanager.upstreams.gpu import GpuProcess, GpuReading


class FakeSystem:
    """/proc and systemd as a test wants them: a pid per port, a unit per pid."""

    def __init__(self, ports: dict[int, int], units: dict[int, Unit]) -> None:
        self.ports = ports
        self.units = units

    def listening_pid(self, port: int) -> int | None:
        return self.ports.get(port)

    def listening_ports(self) -> set[int]:
        return set(self.ports)

    def descendants(self, pid: int) -> set[int]:
        return set()

    def unit_of(self, pid: int) -> Unit | None:
        return self.units.get(pid)


def service(kind: ServiceKind, port: int = 1, **kw: Any) -> Service:
    return Service(Target("127.0.0.1", port), kind, healthy=True, **kw)


def test_what_is_not_loaded_costs_the_whole_card_and_says_so() -> None:
    usable = 24576 - 512
    cases = {
        "mvoice unloaded": (service(ServiceKind.MVOICE, loaded=False), None),
        "vllm asleep": (service(ServiceKind.VLLM, loaded=False, sleep_mode=True), 500),
        "comfyui context only": (service(ServiceKind.COMFYUI, loaded=False, held_mib=300), 300),
        "mvoice silent, context only": (service(ServiceKind.MVOICE, loaded=None), 400),
    }
    for what, (svc, measured) in cases.items():
        c = Consumer("x", svc, measured_mib=measured)
        size_consumer(c, usable)
        assert (c.cost.mib, c.cost.how) == (usable, "unknown"), what
        assert c.cost.note.startswith("CHECK"), what


def test_sizes_the_services_report_when_nothing_is_measured() -> None:
    comfy = Consumer("c", service(ServiceKind.COMFYUI, loaded=True, held_mib=9000))
    size_consumer(comfy, 24000)
    assert (comfy.cost.mib, comfy.cost.how) == (9000, "reported")
    two = (Model("a", True, 4000, 5000), Model("b", True, 8000, 9500), Model("c", False, 100))
    ollama = Consumer("o", service(ServiceKind.OLLAMA, loaded=True, models=two), measured_mib=14500)
    size_consumer(ollama, 24000)
    # Two loaded: the measured sum is not split; each has Ollama's own figure.
    assert [(s.mib, s.how) for _, s in ollama.models if s] == [
        (5000, "reported"), (9500, "reported"), (120, "estimate")
    ]  # fmt: skip
    assert (ollama.cost.mib, ollama.cost.how) == (9500, "reported")
    models = (Model("a", True), Model("b", True))
    speaches_svc = service(ServiceKind.SPEACHES, loaded=True, models=models)
    speaches = Consumer("s", speaches_svc, measured_mib=2400)
    size_consumer(speaches, 24000)
    assert [s for _, s in speaches.models] == [None, None]
    assert (speaches.cost.mib, speaches.cost.how) == (2400, "measured")


def reading(*procs: GpuProcess) -> GpuReading:
    used = sum(p.used_mib or 0 for p in procs)
    return GpuReading("nvml", "GPU 0", 24576, used, 24576 - used, 0, tuple(procs))


def test_gpu_processes_go_to_their_service_by_pid_then_by_name() -> None:
    ollama = Consumer("ollama", service(ServiceKind.OLLAMA, 1, pid=100))
    comfy = Consumer("comfyui", service(ServiceKind.COMFYUI, 2, pid=200))
    whisper = Consumer("whisper", service(ServiceKind.WHISPER, 3))
    runner = GpuProcess(101, "/usr/bin/ollama runner --model /blobs/sha256-ab", 6000)
    comfy_proc = GpuProcess(200, "/usr/bin/python3 /opt/ComfyUI/main.py --port 8188", 9000)
    whisper_proc = GpuProcess(300, "/usr/local/bin/whisper-server -m large.bin", 3000)
    stranger = GpuProcess(400, "python train.py", 2000)
    system = FakeSystem({}, {})
    system.descendants = lambda pid: {101} if pid == 100 else set()  # type: ignore[method-assign]
    unclaimed = attribute(
        [ollama, comfy, whisper], reading(runner, comfy_proc, whisper_proc, stranger), system
    )
    assert unclaimed == [stranger]
    assert (ollama.measured_mib, ollama.gpu_processes) == (6000, ["ollama"])
    assert (comfy.measured_mib, comfy.gpu_processes) == (9000, ["ComfyUI"])
    assert (whisper.measured_mib, whisper.gpu_processes) == (3000, ["whisper-server"])


def test_a_name_two_services_share_is_not_guessed() -> None:
    a = Consumer("ollama-1", service(ServiceKind.OLLAMA, 1))
    b = Consumer("ollama-2", service(ServiceKind.OLLAMA, 2))
    proc = GpuProcess(None, "ollama", 5000)
    assert attribute([a, b], reading(proc), FakeSystem({}, {})) == [proc]
    assert a.measured_mib is None and b.measured_mib is None
    # Nor written as their gpu_processes: each would measure the other's memory too.
    assert a.gpu_processes == b.gpu_processes == []


def test_a_service_on_another_machine_gets_no_process_of_this_card() -> None:
    remote = Consumer("ollama", Service(Target("10.0.0.7", 11434), ServiceKind.OLLAMA))
    proc = GpuProcess(7, "/usr/local/bin/ollama runner", 5000)
    assert attribute([remote], reading(proc), FakeSystem({}, {})) == [proc]
    assert remote.gpu_processes == [] and remote.measured_mib is None


def test_a_service_not_on_the_gpu_gets_its_usual_names_marked_check() -> None:
    comfy = Consumer("comfyui", service(ServiceKind.COMFYUI))
    assert attribute([comfy], reading(GpuProcess(1, "python train.py", 100)), FakeSystem({}, {}))
    assert comfy.measured_mib is None
    assert (comfy.gpu_processes, comfy.patterns_seen) == (["ComfyUI", "comfyui"], False)


def test_process_pattern_is_the_script_or_module_it_runs() -> None:
    assert process_pattern("/usr/bin/python3 /opt/ComfyUI/main.py --port 8188") == (
        "/opt/ComfyUI/main.py"
    )
    assert process_pattern("python -u -m vllm.entrypoints.openai.api_server") == (
        "vllm.entrypoints.openai.api_server"
    )
    assert process_pattern("/srv/mvoice/bin/server --listen 0") == "/srv/mvoice/bin/server"
    assert process_pattern("pid:123") is None
