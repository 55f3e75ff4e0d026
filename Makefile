PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BINARY := dist/fleetrun-agent
AGENT_SOURCES := $(wildcard agent/*.py agent/executors/*.py protocol/*.py build/*.py build/*.spec)

.PHONY: demo test lint bench binary clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fleetrun demo

test: $(STAMP) $(BINARY)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m bench

binary: $(BINARY)

$(BINARY): $(STAMP) $(AGENT_SOURCES)
	$(BIN)/python -m pip install --quiet 'pyinstaller>=6.10,<7'
	$(BIN)/pyinstaller --noconfirm --log-level WARN --distpath dist --workpath build/work \
		build/fleetrun-agent.spec

clean:
	rm -rf $(VENV) build/dist build/work dist *.egg-info
