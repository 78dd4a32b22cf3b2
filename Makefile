# Two entry points (see README): `make pipeline` and `make test`.
# Both set up .venv first (idempotent; scripts/setup.sh).
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup pipeline test test-fast bench mlflow-ui exps report field

setup:
	@bash scripts/setup.sh

# Ends with one line of this run's headline figures (`make exps`: every experiment side by side).
pipeline: setup
	dvc repro
	@python -m pipeline.exps --summary

# Both tiers run on two pytest workers (tests/conftest.py makes torch's waiting threads sleep there),
# each worker taking whole test files as it frees up (their module fixtures built once), the files
# on a shared session fixture (the 2-node cluster) as one unit, the longest units first: the last to
# finish are short ones. Both tiers always run.
TIER := -n 2 --dist loadfile --no-loadscope-reorder tests
test: setup
	@rc=0; python -m pytest -q -m "not slow" $(TIER) --durations=10 || rc=1; \
	python -m pytest -q -m slow $(TIER) --durations=25 || rc=1; exit $$rc

test-fast: setup
	python -m pytest -q -m "not slow" $(TIER) --durations=10

bench: setup
	python -m benchmarks.run

# The URL opens the experiment's runs table (model-training view), not MLflow's GenAI home page.
# One web worker and no MLflow job runner: a one-user UI, and the pipeline submits no GenAI jobs (README).
mlflow-ui: setup
	@python -m pipeline.store --url
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db \
		--host 127.0.0.1 --port 5000 --workers 1

exps: setup
	python -m pipeline.exps

# The paper's networks timed on this host (off the default `dvc repro`; the `field` section of params.yaml).
field: setup
	dvc repro field/dvc.yaml

# Rebuild the report from the outputs there are (runs no other stage, even a stale one).
report: setup
	dvc repro -f -s report
