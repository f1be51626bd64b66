# Developer entry points. The orchestration lives in scripts/devstack.py; this
# file only makes sure the virtualenv exists and is current.
#
#   make run    whole local platform (API, worker, beat, Flower) + a demo tenant
#   make test   every test against real PostgreSQL, Redis and moto
#   make unit   unit tests only, no services
#   make clean  stop private services started by devstack, drop local state
#   make deploy-check  render the Helm chart for every values file and validate it and
#               docker-compose.yml (no cluster, no Docker; tests/deploy runs it in make test)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv run test unit services stop clean chaos deploy-check bench bench-profile

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever the dependency list changes (setup.cfg newer than the stamp).
$(STAMP): setup.cfg $(wildcard pyproject.toml setup.py) | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

run: venv
	$(PY) scripts/devstack.py run

test: venv
	$(PY) scripts/devstack.py test $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest tests/unit tests/deploy $(PYTEST_ARGS)

deploy-check: venv
	$(PY) scripts/deploy_check.py

services: venv
	$(PY) scripts/devstack.py services

stop:
	$(PYTHON) scripts/devstack.py stop

# devstack.py stop is stdlib-only, so it works even without the venv.
clean:
	-$(PYTHON) scripts/devstack.py stop
	rm -rf .local build

# Fault injection against the real platform (private PostgreSQL, Redis, moto):
# CHAOS_TRIALS trials per fault point; report in build/chaos-report.json.
CHAOS_TRIALS ?= 30
chaos: venv
	$(PY) scripts/chaos.py --trials $(CHAOS_TRIALS)

# Benchmarks beside the bare stack (bench/run.py): build/bench.json, docs/BENCHMARKS.md.
# BENCH_QUICK=1 for a run of a few minutes.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(BENCH_STAMP)
	BENCH_QUICK=$(BENCH_QUICK) $(PY) bench/run.py

# py-spy samples of the API and the worker under load (bench/profile.py): build/profile/.
bench-profile: $(BENCH_STAMP)
	$(PY) bench/profile.py
