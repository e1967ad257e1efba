# Two entry points, each creating (or reusing) the virtual environment in .venv:
#   make run    the main job: the quick staleness stress benchmark (under 3 minutes on 2 cores)
#   make test   lint + the whole test suite + a strict docs build
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CORE_STAMP := $(VENV)/.installed-core
CONSTRAINTS := requirements/tested.txt
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: run test lint docs env clean bench-full

env: $(STAMP)

# torch first, pinned to the CPU build: a bare `torch` requirement would pull a CUDA build.
# `make run` needs only the core and the bench extra; `make test` adds the trainers, docs and dev
# tools. OpenRLHF hard-pins GPU-only packages, so it goes in with --no-deps, plus what its loss needs.
# SkyRL and AReaL pin GPU stacks and other versions of ray / transformers / hydra: --no-deps too,
# then only what their loss, config and actor modules import.
$(CORE_STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[bench]"
	touch $(CORE_STAMP)

$(STAMP): $(CORE_STAMP)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,trl,verl,verl-tq,bench,report,docs]"
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps openrlhf==0.11.2
	$(PIP) install -q -c $(CONSTRAINTS) --no-build-isolation deepspeed==0.19.6 einops
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps skyrl==0.3.0 skyrl-gym==0.4.0 areal==1.0.4
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[skyrl,areal]"
	touch $(STAMP)

run: $(CORE_STAMP)
	$(PY) -m stable_async.bench --preset quick --out bench-out

# The full benchmark behind docs/benchmark.md and docs/benchmark-results.md (see the timing there).
bench-full: $(CORE_STAMP)
	$(PY) -m stable_async.bench --preset full --workers 2 --out bench-full --report-md docs/benchmark-results.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir .site

test: lint docs
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .site .pytest_cache
