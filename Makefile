# One entry point for every task; CI runs `make test` through .ci/run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/consumers.yaml
HOST   ?=

IMAGE  ?= mgpumanager:local
BASE   ?= python:3.11-slim

# The real ComfyUI the tests in tests/test_real_comfyui.py start (docs/real-comfyui.md): its
# source from this tarball, built once into REAL_COMFYUI_DIR, outside the work tree.
REAL_COMFYUI_TARBALL ?= ../shared/upstreams/comfyui-a125cd8.tar.gz
REAL_COMFYUI_DIR     ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mgpumanager/real-comfyui/comfyui-a125cd8
export REAL_COMFYUI_DIR

.PHONY: check build test test-fast test-docker image lint soak run demo bench bench-events bench-sched bench-proxy bench-prefetch bench-wait deploy undeploy clean \
	real-comfyui test-real-comfyui ray test-ray bench-cluster

# The default: everything CI checks (lint, then the whole suite).
check: lint test

build: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

# The suite without the end-to-end runs marked `slow` (a quick loop while working).
test-fast: $(STAMP)
	$(BIN)/pytest -q -m 'not slow'

# Unpack the tarball and build ComfyUI's own virtualenv, once (reused while present); where
# the tarball is absent it says so and the real-ComfyUI tests skip. `make test` runs them
# when it has been built; .ci/run builds it first.
real-comfyui:
	scripts/real_comfyui.sh $(REAL_COMFYUI_TARBALL) $(REAL_COMFYUI_DIR) $(PYTHON)

# Only the tests that start the real ComfyUI (and the contract test against it).
test-real-comfyui: $(STAMP) real-comfyui
	$(BIN)/pytest -q tests/test_real_comfyui.py tests/sim/test_comfyui_contract.py

# The broker's image (Dockerfile) from BASE, any base with Python 3.11. The wheels are built
# here with this machine's pip, so the build itself needs no network (--network none).
image: $(STAMP)
	rm -rf build/wheels
	$(BIN)/pip wheel --quiet --wheel-dir build/wheels .
	docker build --network none --build-arg BASE=$(BASE) -t $(IMAGE) .

# Against a real dockerd (.ci/docker-setup starts one and makes a base): fake services in
# containers stopped and started by the broker, init finding them, the image serving the demo.
# Every test there is skipped, saying why, where no Docker answers or IMAGE is missing.
test-docker: $(STAMP)
	MGPU_DOCKER_TESTS=1 MGPU_IMAGE=$(IMAGE) $(BIN)/pytest -q -rs -p no:cacheprovider tests/docker

# The reliability runs at full size (10,000 fuzzed requests, 64 clients x 64 jobs, a storm of
# 450 leaving clients, 28 SIGHUPs under load...); `make test` runs smaller versions of the same.
# Their figures (what docs/reliability.md publishes) end up in $(VENV)/soak-figures.
soak: $(STAMP)
	rm -f $(VENV)/soak-figures
	MGPU_SOAK=1 MGPU_FIGURES=$(VENV)/soak-figures $(BIN)/pytest -q tests/reliability
	cat $(VENV)/soak-figures

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

run: $(STAMP)
	$(BIN)/mgpumanager serve --config $(CONFIG)

# DEMO_ARGS="--port N" moves the whole demo (N for the broker, the rest as far from it);
# --port 0: free ports, named in the banner.
demo: $(STAMP)
	$(BIN)/mgpumanager demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_swap.py
	$(BIN)/python bench/bench_events.py

# Job latency with and without a /v1/events client that stops reading (needs curl).
bench-events: $(STAMP)
	$(BIN)/python bench/bench_events.py

# Streamed clients waiting behind a 20 s job: header latency, silence, broker CPU (~1 minute,
# bench/results/wait.json).
bench-wait: $(STAMP)
	$(BIN)/python bench/bench_wait.py

# The broker's own hop against a bare aiohttp proxy with one lock and nginx, on loopback
# (needs wrk and curl; nginx where installed): ~4 minutes, bench/results/proxy.json.
bench-proxy: $(STAMP)
	$(BIN)/python bench/bench_proxy.py

# A swap's load with its weights cold against read ahead during the job before (a generated
# 1 GiB file in a temporary folder, removed after; needs ~2 GiB free there): ~1 minute,
# bench/results/prefetch.json.
bench-prefetch: $(STAMP)
	$(BIN)/python bench/bench_prefetch.py

bench-sched: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/bench_sched.py
	$(BIN)/python bench/sched_model.py
	$(BIN)/python bench/bench_gpus.py

# The `ray` extra (Ray Serve and Ray, ~0.5 GB) in the same .venv, once.
RAY_STAMP := $(VENV)/.ray-installed
ray: $(RAY_STAMP)

$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $(RAY_STAMP)

# Several boxes on one machine (docs/cluster.md): a local Ray cluster of two simulated hosts,
# each a simulated GPU, fakes and a broker on loopback, with a front per host. Not part of
# `make test` (~30 s, ~2.5 GB).
test-ray: $(RAY_STAMP)
	MGPU_RAY_TESTS=1 $(BIN)/pytest -q -rs -p no:cacheprovider tests/cluster_ray

# The hop through a host's front against a call straight to its broker, same script, same
# simulated host, and the same hop through Ray Serve's proxy: bench/results/cluster.json.
bench-cluster: $(RAY_STAMP)
	$(BIN)/python bench/bench_cluster.py --serve

# rsync the tree to HOST's /opt/mgpumanager, build its .venv there, then deploy/install.sh as
# root: the mgpumanager user, the registry under /etc/mgpumanager (installed once, never
# overwritten), the polkit rule written from it, the hardened unit; restart. Idempotent.
# A box deployed before the registry moved to /etc keeps the one it was running.
deploy:
	@test -n "$(HOST)" || { echo "usage: make deploy HOST=gpu-box" >&2; exit 2; }
	ssh $(HOST) 'test -e /etc/mgpumanager/consumers.yaml || \
	  test ! -e /opt/mgpumanager/config/consumers.yaml || \
	  sudo install -D -m 0600 /opt/mgpumanager/config/consumers.yaml /etc/mgpumanager/consumers.yaml'
	rsync -a --delete --exclude .venv --exclude .git ./ $(HOST):/opt/mgpumanager/
	ssh $(HOST) 'cd /opt/mgpumanager && make build && sudo bash deploy/install.sh'

# Stop and remove what deploy added (unit, polkit rule, user, /opt/mgpumanager); the registry
# under /etc/mgpumanager stays.
undeploy:
	@test -n "$(HOST)" || { echo "usage: make undeploy HOST=gpu-box" >&2; exit 2; }
	ssh $(HOST) 'sudo bash -s' <deploy/uninstall.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
