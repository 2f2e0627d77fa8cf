# The two commands of the README: `make demo` and `make test`. Each creates .venv if missing and
# installs what it needs: torch first (the CPU build on this machine), then the project with extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# Peer RETRO implementations for `benchmarks/train_step.py --peers-python` live in their own venv
# (never project dependencies): `make peers-venv`, then `make bench-peers`. Not part of `make test`.
PEERS_VENV ?= $(abspath ../peers-venv)
PEERS_PYTHON ?= python3.11

.PHONY: install browser demo test test-fast test-faults test-reliability lint format bench bench-retrieval bench-peers peers-venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/retro demo

# The page test of `retro serve` drives a real headless browser: Debian's chromium and its driver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver)) || \
		echo "warning: could not install chromium (the page test will be skipped)"

# Everything but the simulated multi-node clusters (`make test-faults`; CI runs both).
test: $(STAMP) browser
	$(BIN)/python -m pytest -x -q --durations=15 -m "not cluster"

test-reliability: $(STAMP)
	$(BIN)/python -m pytest -q -s tests/reliability

# Nodes lost mid-build, mid-training and mid-search, the multi-node placement and the autoscaler, on
# simulated clusters of cluster.yaml's node types (tests marked `cluster`); `.ci/run` runs it after `make test`.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -x -q --durations=15 -m cluster

test-fast: $(STAMP)
	$(BIN)/python -m pytest -x -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/model_parts.py
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/pool.py
	$(BIN)/python benchmarks/train_online.py --paired
	$(BIN)/python benchmarks/generate.py

# RETRO vs the baseline end to end (build, Ray Train, evaluation) on a mirrored and the natural corpus,
# 2 seeds each: long on 2 cores, so neither in `make bench` nor in `make test`. Tables are appended to
# benchmarks/RESULTS-retrieval.md. Override the sizes with BENCH_RETRIEVAL_ARGS="...".
BENCH_RETRIEVAL_ARGS ?= --config wiki-full --corpus mirrored natural --seeds 0 1

bench-retrieval: $(STAMP)
	$(BIN)/python benchmarks/retrieval_gain.py $(BENCH_RETRIEVAL_ARGS)

$(PEERS_VENV)/.installed:
	$(PEERS_PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet torch==2.13.0
	$(PEERS_VENV)/bin/pip install --quiet retro-pytorch==0.3.9 'pyarrow<26' 'numpy<2'
	$(PEERS_VENV)/bin/pip install --quiet --no-deps labml-nn==0.5.1
	$(PEERS_VENV)/bin/pip install --quiet labml==0.5.3 megatron-core==0.15.3 'numpy<2'
	touch $@

peers-venv: $(PEERS_VENV)/.installed

bench-peers: $(STAMP) $(PEERS_VENV)/.installed
	$(BIN)/python benchmarks/train_step.py --repeats 3 --peers-python $(PEERS_VENV)/bin/python

clean:
	rm -rf work .pytest_cache .ruff_cache
