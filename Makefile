# The two commands of the README: `make demo` and `make test`. Each creates .venv if missing and
# installs what it needs: torch first (the CPU build on this machine), then the project with extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-reliability lint format bench clean

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

test: $(STAMP)
	$(BIN)/python -m pytest -x -q --durations=15

test-reliability: $(STAMP)
	$(BIN)/python -m pytest -q -s tests/reliability

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
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/pool.py
	$(BIN)/python benchmarks/train_online.py --paired
	$(BIN)/python benchmarks/generate.py

clean:
	rm -rf work .pytest_cache .ruff_cache
