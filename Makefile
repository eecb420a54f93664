# dercmd: `make run` starts everything on one machine, `make test` runs every test.
# Both set themselves up on a fresh machine (virtualenv in .venv, dependencies from PyPI).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=
FAULTS_ARGS ?=

.PHONY: install run test unit bench faults lint clean

$(STAMP): pyproject.toml setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dercmd needs Python 3.11 or newer: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dercmd run

# The benchmark (libs/dercmd/bench): make bench BENCH_ARGS="--burst 3000 --rate 100"
bench: $(STAMP)
	$(BIN)/python -m dercmd.bench $(BENCH_ARGS)

# The fault suite (libs/dercmd/bench/faults.py): make faults FAULTS_ARGS="--rate 500"
faults: $(STAMP)
	$(BIN)/python -m dercmd.bench.faults $(FAULTS_ARGS)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
