"""Which registry runs when the command line names none: `serve` takes the installed one or
refuses, naming both ways to give one (never the example registry by accident); `demo` finds
its own in the package, from any directory."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mgpumanager import cli
from mgpumanager.registry import load_config
from mgpumanager.registry.paths import ETC_REGISTRY, NoRegistry, demo_registry, serve_registry

ROOT = Path(__file__).resolve().parents[2]


def test_serve_without_config_refuses_with_exit_2_naming_both_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)  # where the example registry lies: it must not be picked up
    nowhere = tmp_path / "etc" / "consumers.yaml"  # this box may have a real one installed
    monkeypatch.setattr("mgpumanager.registry.paths.ETC_REGISTRY", nowhere)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "--config FILE" in err and str(nowhere) in err, err
    assert str(ETC_REGISTRY) == "/etc/mgpumanager/consumers.yaml"


def test_serve_takes_the_installed_registry_else_the_given_one(tmp_path: Path) -> None:
    installed = tmp_path / "consumers.yaml"
    with pytest.raises(NoRegistry, match="--config FILE"):
        serve_registry(None, installed)
    installed.write_text("consumers: {}\n")
    assert serve_registry(None, installed) == installed
    given = tmp_path / "mine.yaml"
    assert serve_registry(given, installed) == given


def test_the_demo_registry_is_package_data_found_from_any_directory(tmp_path: Path) -> None:
    package = ROOT / "src" / "mgpumanager"
    assert demo_registry().parent.resolve() == package.resolve()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "demo.yaml" in data["tool"]["setuptools"]["package-data"]["mgpumanager"]
    assert load_config(demo_registry()).consumers
    # from a directory with no config/ in it, as an installed mgpumanager runs
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mgpumanager import cli; p = cli._parser(); "
            "from mgpumanager.registry.paths import demo_registry; "
            "print(demo_registry().is_file())",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "True"
