"""A stand-in for pynvml that raises the real pynvml exception classes: the GPU reader's tests
and `init`'s share it."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1024 * 1024


@dataclass
class FakeNvml:
    total_mib: int = 24_576
    used_mib: int = 4096
    reserved_mib: int = 300
    name: str | bytes = b"NVIDIA GeForce RTX 4090"
    util: int = 37
    procs: list[SimpleNamespace] = field(default_factory=list)
    proc_names: dict[int, str | bytes] = field(default_factory=dict)
    init_error: Exception | None = None
    v2_error: Exception | None = None
    memory_error: Exception | None = None
    util_error: Exception | None = None
    procs_error: Exception | None = None
    no_v3: bool = False
    calls: list[str] = field(default_factory=list)
    inits: int = 0

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")
        self.inits -= 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if index != 0:
            raise pynvml.NVMLError_InvalidArgument()
        return "handle0"

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        if self.memory_error is not None:
            raise self.memory_error
        if version is not None:
            self.calls.append("mem_v2")
            if self.v2_error is not None:
                raise self.v2_error
            used = self.used_mib
        else:
            self.calls.append("mem_v1")
            used = self.used_mib + self.reserved_mib  # v1 counts reserved memory as used
        free = self.total_mib - self.reserved_mib - self.used_mib
        return SimpleNamespace(total=self.total_mib * MIB, used=used * MIB, free=free * MIB)

    def nvmlDeviceGetName(self, handle: Any) -> str | bytes:
        return self.name

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        if self.util_error is not None:
            raise self.util_error
        return SimpleNamespace(gpu=self.util, memory=10)

    def nvmlSystemGetProcessName(self, pid: int) -> str | bytes:
        if pid not in self.proc_names:
            raise pynvml.NVMLError_NotFound()
        return self.proc_names[pid]

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any) -> list[SimpleNamespace]:
        self.calls.append("procs_v3")
        if self.no_v3:
            raise pynvml.NVMLError_FunctionNotFound()
        return self._procs()

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Any) -> list[SimpleNamespace]:
        self.calls.append("procs_v2")
        return self._procs()

    def _procs(self) -> list[SimpleNamespace]:
        if self.procs_error is not None:
            raise self.procs_error
        return self.procs


def proc(pid: int, used_mib: int | None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=None if used_mib is None else used_mib * MIB)
