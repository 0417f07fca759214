"""Where the registry comes from when the command line names none.

`serve` without `--config` serves `/etc/mgpumanager/consumers.yaml` (where `make deploy` and
the unit keep it) when it exists, and otherwise refuses to start, naming both ways to give
one: the annotated example registry is never served by accident, with its placeholder
consumers. `demo` takes its registry from the package itself, so it runs from any directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ETC_REGISTRY = Path("/etc/mgpumanager/consumers.yaml")


class NoRegistry(Exception):
    """`serve` was given no registry and the box has none installed."""


def serve_registry(given: Path | None, installed: Path | None = None) -> Path:
    """The registry `serve` runs: `given` (--config), else `installed` (by default
    ETC_REGISTRY) if it exists."""
    if given is not None:
        return given
    installed = installed or ETC_REGISTRY
    if installed.is_file():
        return installed
    raise NoRegistry(
        f"no registry: pass --config FILE, or install one at {installed} "
        "(`mgpumanager init --out FILE` writes one for this box)"
    )


def demo_registry() -> Path:
    """The demo's registry, shipped inside the package (package data)."""
    return Path(str(resources.files("mgpumanager").joinpath("demo.yaml")))


__all__ = ["ETC_REGISTRY", "NoRegistry", "demo_registry", "serve_registry"]
