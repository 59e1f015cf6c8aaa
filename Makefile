# Every target creates or reuses the virtual environment in $(VENV), installed from the pinned
# constraints.txt so a model trained next year is built with the same libraries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A FracAtlas folder or zip; empty downloads FracAtlas.zip from figshare (article 22363012).
FRACATLAS_SOURCE ?=

export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
# MLflow reads DO_NOT_TRACK only when it is "true"; DVC has its own switch.
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
# Prefect's temporary local server migrates its database on first start, which on a fresh
# two-core machine takes longer than Prefect's default 20 s.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: venv main repro serve-schedule deploy-schedule app browser test test-all bench audit clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt fracture/docs_assets.lock.json
	# constraints.txt is the set resolved on Python 3.11: a venv of another Python would get other libraries, or none.
	# A venv there already (made by hand, or left without pip by a machine that lacks ensurepip) is checked as well.
	test ! -x $(PY) || $(PY) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(None if v == "3.11" else \
		f"$(VENV) is a venv of Python {v}; constraints.txt pins the libraries resolved on Python 3.11: remove it (rm -rf $(VENV)) and run make again")'
	test ! -x $(PY) || $(PY) -m pip --version >/dev/null 2>&1 || { echo "$(VENV) has no pip, as python3 -m venv leaves it where \
		ensurepip is missing (on Debian and Ubuntu: apt-get install python3.11-venv): remove it (rm -rf $(VENV)) and run make again" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(None if v == "3.11" else \
		f"$(PYTHON) is Python {v}; constraints.txt pins the libraries resolved on Python 3.11: run make with PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pip and setuptools too are pinned: the interpreter's bundled pip would stay unaudited and old.
	$(PY) -m pip install --quiet --constraint constraints.txt pip setuptools
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	$(PY) -m fracture.docs_assets fetch
	touch $@

## main: the whole pipeline on FracAtlas (ingest, validate, split, train, evaluate, register)
main: venv
	$(PY) -m flows.retrain $(if $(FRACATLAS_SOURCE),--source "$(FRACATLAS_SOURCE)")

## repro: the DVC stages only, on the data already ingested
repro: venv
	$(VENV)/bin/dvc repro

## serve-schedule: retrain on the cron in params.yaml (schedule), run by this machine until stopped
serve-schedule: venv
	$(PY) -m flows.deploy serve $(if $(FRACATLAS_SOURCE),--source "$(FRACATLAS_SOURCE)")

## deploy-schedule: the same schedule on a work pool (schedule.work_pool, or WORK_POOL=name); its workers run it
##   in this checkout, or in PROJECT_DIR=/path as the workers see the project (/opt/fracture in the image).
##   FRACATLAS_SOURCE=path given here, on make's command line, is fixed in the deployment; one set in this
##   shell is not: this machine's path, it would override the workers' own FRACATLAS_SOURCE (the pool's env)
deploy-schedule: venv
	$(PY) -m flows.deploy deploy $(if $(WORK_POOL),--work-pool "$(WORK_POOL)") $(if $(PROJECT_DIR),--project-dir "$(PROJECT_DIR)") $(if $(filter command line,$(origin FRACATLAS_SOURCE)),$(if $(FRACATLAS_SOURCE),--source "$(FRACATLAS_SOURCE)"))

## app: the clinician's page on http://127.0.0.1:$(APP_PORT), serving models:/<name>@champion
APP_PORT ?= 8501
app: venv
	cd app && "$(abspath $(PY))" -m streamlit run streamlit_app.py --server.address 127.0.0.1 --server.port $(APP_PORT)

## browser: Debian's Chromium for the page's end-to-end test (installed with apt when missing, as root)
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  || echo "WARNING: apt-get could not install chromium; the browser test will skip"; \
	elif [ "$$(id -u)" = 0 ]; then echo "WARNING: /usr/bin/chromium is missing and this machine has no apt-get; install Chromium there with its own package manager, or the browser test skips"; \
	else echo "WARNING: /usr/bin/chromium is missing and this is not root; install it with 'sudo apt-get install chromium', or the browser test skips"; fi

## test: the default suite (unit and integration, without tests marked slow), in TEST_WORKERS processes
##   (pytest-xdist; each test file runs whole in one of them, so its fixtures are built once)
TEST_WORKERS ?= 2
test: venv browser
	$(PY) -m pytest --numprocesses $(TEST_WORKERS) --dist loadfile

## test-all: everything, including tests marked slow
test-all: venv browser
	$(PY) -m pytest --numprocesses $(TEST_WORKERS) --dist loadfile -m 'slow or not slow'

## bench: the benchmarks of bench/RESULTS.md, each printing its sides and their ratio (never part of the tests).
## The no-op run, draft_decode and process_exit need a project whose main job has run (make main) with the same FRACATLAS_SOURCE.
BENCH_DATA = $(or $(FRACATLAS_SOURCE),../shared/fracatlas)
bench: venv
	$(PY) -m bench.cache_vs_decode --data "$(BENCH_DATA)"
	$(PY) -m bench.train_loop
	$(PY) -m bench.allocator
	$(PY) -m bench.ensemble_cost
	$(PY) -m bench.consumer_inference --data "$(BENCH_DATA)"
	$(PY) -m bench.gate_scoring --data "$(BENCH_DATA)"
	$(PY) -m bench.dicom_display
	$(PY) -m bench.map_bootstrap
	$(PY) -m bench.serving_latency --data "$(BENCH_DATA)"
	$(PY) -m bench.orchestration --data "$(BENCH_DATA)"
	@if [ -f outputs/evaluate/metrics.json ]; then $(PY) -m bench.noop_run --source "$(BENCH_DATA)" && \
	$(PY) -m bench.draft_decode --project . && \
	$(PY) -m bench.heat_map_mirror --project . && \
	$(PY) -m bench.process_exit --source "$(BENCH_DATA)"; \
	else echo "bench.noop_run, bench.draft_decode, bench.heat_map_mirror and bench.process_exit skipped: run make main FRACATLAS_SOURCE=$(BENCH_DATA) first"; fi

## audit: pip-audit of every pin in constraints.txt against PyPI's advisories; the report goes to audit/pip-audit.json.
## Fails when a pinned version has a known vulnerability; says so when packages could not be audited.
audit: venv
	mkdir -p audit
	# No earlier report is left to be read as this run's when pip-audit writes none (PyPI unreachable).
	rm -f audit/pip-audit.json
	$(PY) -m pip_audit --requirement constraints.txt --no-deps --disable-pip --progress-spinner off \
	  --format json --output audit/pip-audit.json; status=$$?; \
	  $(PY) -m fracture.audit_report audit/pip-audit.json; exit $$status

## clean: removes the venv (the next make creates it again). The registry and its runs (mlflow.db, mlartifacts/), the
##   stages' outputs and the data stay: remove those yourself to start the project over, every registered version with them
clean:
	rm -rf $(VENV)
