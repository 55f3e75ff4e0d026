PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BINARY := dist/fleetrun-agent
AGENT_SOURCES := $(wildcard agent/*.py agent/worker/*.py agent/worker/executors/*.py protocol/*.py build/*.py build/*.spec)

.PHONY: demo test test-deps lint bench binary clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fleetrun demo

test: test-deps $(STAMP) $(BINARY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# Headless Chromium and a running PostgreSQL: installed or started as root, else named.
test-deps:
	@build/test-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

.PHONY: soak chaos
soak: $(STAMP)
	$(BIN)/python -m bench.soak --retention-seconds 120

# The fault suite, with the long variants (60 s partitions); `make test` runs the rest.
CHAOS_TESTS := tests/e2e/test_reliability.py tests/e2e/test_partition.py \
	tests/e2e/test_disk_full.py tests/e2e/test_monitoring.py tests/unit/test_spool.py \
	tests/unit/test_storage_full.py tests/unit/test_stallwatch.py \
	tests/e2e/test_hardening.py tests/e2e/test_processes.py tests/e2e/test_adoption.py
chaos: $(STAMP)
	FLEETRUN_LONG_FAULTS=1 $(BIN)/python -m pytest -q $(CHAOS_TESTS)

binary: $(BINARY)

$(BINARY): $(STAMP) $(AGENT_SOURCES)
	$(BIN)/python -m pip install --quiet 'pyinstaller>=6.10,<7'
	$(BIN)/pyinstaller --noconfirm --log-level WARN --distpath dist --workpath build/work \
		build/fleetrun-agent.spec

clean:
	rm -rf $(VENV) build/dist build/work dist *.egg-info
