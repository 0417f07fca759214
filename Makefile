# One entry point for every task; CI runs `make test` through .ci/run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/consumers.yaml
HOST   ?=

.PHONY: build test lint run demo bench bench-sched deploy clean

build: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy

run: $(STAMP)
	$(BIN)/mgpumanager serve --config $(CONFIG)

demo: $(STAMP)
	$(BIN)/mgpumanager demo

bench: $(STAMP)
	$(BIN)/python bench/bench_swap.py

bench-sched: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/bench_sched.py
	$(BIN)/python bench/sched_model.py

# rsync the tree to HOST, build there, install the systemd unit and restart it.
deploy:
	@test -n "$(HOST)" || { echo "usage: make deploy HOST=gpu-box" >&2; exit 2; }
	rsync -a --delete --exclude .venv --exclude .git ./ $(HOST):/opt/mgpumanager/
	ssh $(HOST) 'cd /opt/mgpumanager && make build && \
	  sudo install -m 0644 deploy/mgpumanager.service /etc/systemd/system/mgpumanager.service && \
	  sudo systemctl daemon-reload && sudo systemctl enable mgpumanager && sudo systemctl restart mgpumanager'

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
