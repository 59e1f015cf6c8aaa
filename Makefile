# Every target creates or reuses the virtual environment in $(VENV), installed from the pinned
# constraints.txt so a model trained next year is built with the same libraries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A FracAtlas folder or zip; empty downloads FracAtlas.zip from figshare (article 22363012).
FRACATLAS_SOURCE ?=

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
# Prefect's temporary local server migrates its database on first start, which on a fresh
# two-core machine takes longer than Prefect's default 20 s.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: venv main repro test test-all clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@

## main: the whole pipeline on FracAtlas (ingest, validate, split, train, evaluate, register)
main: venv
	$(PY) -m flows.retrain $(if $(FRACATLAS_SOURCE),--source "$(FRACATLAS_SOURCE)")

## repro: the DVC stages only, on the data already ingested
repro: venv
	$(VENV)/bin/dvc repro

## test: the default suite (unit and integration, without tests marked slow)
test: venv
	$(PY) -m pytest

## test-all: everything, including tests marked slow
test-all: venv
	$(PY) -m pytest -m 'slow or not slow'

clean:
	rm -rf $(VENV) outputs mlartifacts mlflow.db
