# Two entry points (see README): `make pipeline` and `make test`.
# Both set up .venv first (idempotent; scripts/setup.sh).
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup pipeline test test-fast bench mlflow-ui exps

setup:
	@bash scripts/setup.sh

pipeline: setup
	dvc repro
	dvc metrics show

test: setup
	python -m pytest -q tests

test-fast: setup
	python -m pytest -q -m "not slow" tests

bench: setup
	python -m benchmarks.run

mlflow-ui: setup
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

exps: setup
	python -m pipeline.exps
