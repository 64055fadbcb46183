# `make serve` and `make test` work on a fresh machine with python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051
DB ?= sqlite:///./tether.db

.PHONY: serve test lint proto proto-check bench migrate clean

$(STAMP): pyproject.toml client/pyproject.toml server/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./client -e ./server -e '.[dev]'
	@# An older tether-server owned bin/tether; upgrading it removes the client's script.
	test -x $(BIN)/tether || $(BIN)/pip install --quiet --no-deps --force-reinstall -e ./client
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/tether serve --listen $(LISTEN) --db $(DB)

migrate: $(STAMP)
	$(BIN)/tether migrate --db $(DB)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint

proto: $(STAMP)
	$(BIN)/python tools/gen_protos.py

bench: $(STAMP)
	$(BIN)/python -m tests.bench.load $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
