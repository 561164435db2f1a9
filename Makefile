# tracktower developer entry points. `make test` is what CI (.ci/run) runs.
#
# Installs are keyed on stamp files inside the venv: they are redone only when pyproject.toml is
# newer than the stamp, so a second `make test` starts testing immediately.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TT := $(VENV)/bin/tracktower
CODE := features training serving

# Same default as tracktower.training.tracking.configure: env var, else ./mlflow.db.
TRACKING_URI := $(or $(MLFLOW_TRACKING_URI),sqlite:///mlflow.db)
# MLflow 3 sends usage telemetry by default; nothing here needs it, and CI may be offline.
export MLFLOW_DISABLE_TELEMETRY ?= true

# Exit 0 iff the registry already has models:/tracktower@champion in the current tracking store.
define CHAMPION_CHECK
import sys
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from tracktower.training.champion import CHAMPION_ALIAS
from tracktower.training.tracking import configure
configure(None)
try:
    MlflowClient().get_model_version_by_alias("tracktower", CHAMPION_ALIAS)
except MlflowException:
    sys.exit(1)
endef
export CHAMPION_CHECK

# Prints a user id that exists in the synthetic data, for the example request.
define EXAMPLE_USER
import pathlib, pandas as pd
p = pathlib.Path("data/synth/interactions.parquet")
print(pd.read_parquet(p, columns=["user_id"])["user_id"].iloc[0] if p.exists() else "<user_id>")
endef
export EXAMPLE_USER

.PHONY: help venv install dev run test test-fast lint format bench mlflow-ui clean

help:  ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

venv: $(PY)  ## Create .venv (python3.11) if missing

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed  ## Install tracktower (editable)

dev: $(VENV)/.installed-dev  ## Install tracktower with test/lint tools

run: install  ## Train on synthetic data unless a champion exists, then serve on :8000
	@if $(PY) -c "$$CHAMPION_CHECK"; then \
		echo "models:/tracktower@champion exists in $(TRACKING_URI): skipping training"; \
	else \
		$(TT) data synth --out data/synth; \
		$(TT) train --config configs/default.yaml \
			--interactions data/synth/interactions.parquet --tracks data/synth/tracks.parquet; \
	fi
	@echo
	@echo "Try:       curl 'http://127.0.0.1:8000/v1/users/$$($(PY) -c "$$EXAMPLE_USER")/recommendations?k=5'"
	@echo "Runs UI:   make mlflow-ui   (then open http://127.0.0.1:5000)"
	@echo
	$(TT) serve

test: dev  ## Lint, then the whole test suite
	$(MAKE) --no-print-directory lint
	@echo "$(VENV)/bin/pytest -q"; rc=0; $(VENV)/bin/pytest -q || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (discovery broken?)" >&2; fi; \
	exit $$rc

test-fast: dev  ## The unit tier only (no TF training, no subprocess, no MLflow server; < 2 min)
	$(VENV)/bin/pytest -q tests/unit

lint: dev  ## ruff check, ruff format --check, mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(CODE)

format: dev  ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install  ## Serving latency and offline quality benchmarks
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/quality.py

mlflow-ui: install  ## MLflow UI for the current tracking store on :5000
	$(VENV)/bin/mlflow ui --backend-store-uri '$(TRACKING_URI)' --host 127.0.0.1 --port 5000

clean:  ## Remove caches and build output (keeps .venv, data, mlflow.db, mlruns)
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -name '*.egg-info' -type d -exec rm -rf {} +
