"""The package's layout holds: every module imports first, alone, in a fresh interpreter (no
import cycle hides behind the order the tests happen to import things in), and
docs/architecture.md's module table names every module. The layers themselves are import-linter
contracts (`make lint`)."""

from __future__ import annotations

import asyncio
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import mgpumanager

ROOT = Path(__file__).resolve().parents[1]


def modules() -> list[str]:
    found = ["mgpumanager"]
    for info in pkgutil.walk_packages(mgpumanager.__path__, "mgpumanager."):
        if not info.name.endswith(".__main__"):  # a script: importing it runs it
            found.append(info.name)
    return sorted(found)


async def import_alone(module: str, slots: asyncio.Semaphore) -> tuple[str, int, str]:
    async with slots:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"import {module}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        return module, proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.slow
async def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    slots = asyncio.Semaphore(4)
    results = await asyncio.gather(*(import_alone(m, slots) for m in modules()))
    failed = {m: out.strip().splitlines()[-1] for m, rc, out in results if rc != 0}
    assert len(results) >= 70  # the whole package was found
    assert failed == {}


def test_the_architecture_doc_lists_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_./]+\.py)` \|", text, re.MULTILINE))
    package = ROOT / "src" / "mgpumanager"
    files = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    assert sorted(files - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - files) == [], "docs/architecture.md lists modules that do not exist"
