# maelab: `make run` trains the embedded default end to end; `make test` runs the suite.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export KEDRO_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

# the pipeline `make run` runs: the biggest one that exists on the embedded default
RUN_PIPELINE ?= $(shell $(BIN)/python -c "from maelab.pipeline_registry import register_pipelines as r; \
  p = r(); print(next(n for n in ('rmae_full', 'pretrain_mae', 'ingest') if n in p))" 2>/dev/null)

.PHONY: setup run test lint format clean viz mlflow

setup: $(STAMP)

# re-install only when the dependency list changes; the project itself is an editable install
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/kedro run --pipelines=$(RUN_PIPELINE)

# where to look: the pipelines (kedro-viz) and the runs / registered encoders (MLflow UI), on this machine
HOST ?= 127.0.0.1
VIZ_PORT ?= 4141
MLFLOW_PORT ?= 5000
viz: setup
	$(BIN)/kedro viz run --host=$(HOST) --port=$(VIZ_PORT) --no-browser

# the tracking store of conf/base + conf/local mlflow.yml (or $$MLFLOW_TRACKING_URI), as training writes it
mlflow: setup
	$(BIN)/mlflow ui --host $(HOST) --port $(MLFLOW_PORT) --backend-store-uri \
	  "$$($(BIN)/python -c "from maelab.config import mlflow_settings; print(mlflow_settings()['tracking_uri'])")"

test: setup
	$(BIN)/ruff check src tests pipelines
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests pipelines
	$(BIN)/ruff format --check src tests pipelines
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format src tests pipelines
	$(BIN)/ruff check --fix src tests pipelines

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
