"""Helpers of the container tests. They need a Docker daemon and the broker's image (`make
image`); each test is skipped, saying which is missing, where they are not there (`make
test-docker` runs pytest with -rs, so the reason is printed). .ci/docker-setup makes both on a
box with neither.

Containers run with --network host, so every byte stays on loopback; each is named
mgpu-test-* with a random suffix and removed at the end, whatever happened."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest

from mgpumanager.upstreams.containers import docker_socket

IMAGE = os.environ.get("MGPU_IMAGE", "mgpumanager:local")


def docker(*args: str, check: bool = True, timeout_s: float = 120) -> str:
    """The docker CLI (the tests' own set-up; the broker itself uses the Engine API)."""
    run = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and run.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {run.stderr.strip()}")
    return run.stdout.strip()


def why_no_docker() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on this machine (.ci/docker-setup installs docker.io)"
    if not os.path.exists(docker_socket()):
        return f"no Docker daemon: {docker_socket()} does not exist (.ci/docker-setup starts one)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        return f"the Docker daemon does not answer: {info.stderr.strip()[:200]}"
    image = subprocess.run(
        ["docker", "image", "inspect", IMAGE], capture_output=True, text=True, check=False
    )
    if image.returncode != 0:
        return f"no image {IMAGE}: build it with `make image` (BASE=... for another base)"
    return None


@pytest.fixture(scope="session")
def image() -> str:
    reason = why_no_docker()
    if reason is not None:
        pytest.skip(f"container tests skipped: {reason}")
    return IMAGE


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Containers a test creates; removed after it."""
    made: list[str] = []
    yield made
    for name in made:
        docker("rm", "-f", name, check=False)


def unique(prefix: str) -> str:
    return f"mgpu-test-{prefix}-{secrets.token_hex(3)}"


def free_port(span: int = 1) -> int:
    """A loopback port with `span` free ones from it (a container binds it later, so the
    socket cannot be kept: the window is small and the range is checked)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + span > 65000:
            continue
        taken = False
        for port in range(base, base + span):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    taken = True
                    break
        if not taken:
            return base
    raise AssertionError("no free range of loopback ports")
