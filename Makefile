# Every target sets up .venv on first use: torch==2.13.0 first (the CPU wheel on disk), then the package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-all lint format quickstart bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[dev,gguf]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

quickstart: $(STAMP)
	$(VENV)/bin/sftlab quickstart

bench: $(STAMP)
	$(PY) -m benchmarks.sft

clean:
	rm -rf $(VENV) runs .pytest_cache
