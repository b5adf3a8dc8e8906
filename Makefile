# The two commands the README opens with: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint typecheck unit

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m pyhast.demo

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: setup
	$(VENV)/bin/mypy

test: setup lint typecheck
	$(VENV)/bin/pytest -q tests

unit: setup
	$(VENV)/bin/pytest -q tests/unit tests/fuzz

.PHONY: bench
# Performance benchmark (issue 6), not part of `make test`: make bench BENCH_ARGS=--quick
bench: setup
	$(VENV)/bin/pip install -q --disable-pip-version-check -r bench/requirements.txt
	$(PY) bench/run.py $(BENCH_ARGS)

.PHONY: bench-stages
# CPU per request of each stage of the write path (bench/stages.py, no root): BENCH_ARGS=--quick
bench-stages: setup
	$(PY) bench/stages.py $(BENCH_ARGS)

.PHONY: fault-long fuzz-long
# Issue 5's long targets (not part of `make test`).
fault-long: setup
	$(PY) -m tests.fault.driver --runs 200 --seed 1 --profile long --out tests/fault/results-long.json

fuzz-long: setup
	$(PY) -m tests.fuzz.long --inputs 1000000
