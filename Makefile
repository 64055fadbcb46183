# `make serve` and `make test` work on a fresh machine with python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051
DB ?= sqlite:///./tether.db

.PHONY: serve test lint proto proto-check bench bench-setup migrate clean

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

# Two workers (pytest-xdist): most tests wait on servers and databases, not on a core.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint

proto: $(STAMP)
	$(BIN)/python tools/gen_protos.py

# Side by side with etcd and a store-less server; `make bench BENCH_ARGS=--quick` is a smoke run.
# Without etcd (bench-setup failed) the bench still runs and says "etcd: unavailable".
bench: $(STAMP)
	-@$(MAKE) --no-print-directory bench-setup
	$(BIN)/python -m tests.bench.load $(BENCH_ARGS)
	$(BIN)/python -m tests.bench.wake
	$(BIN)/python -m tests.bench.cascade $(BENCH_ARGS)
	$(BIN)/python -m tests.bench.purge $(BENCH_ARGS)

# Debian's etcd-server (/usr/bin/etcd) when missing, and etcd's Python stubs generated from
# the etcd3 package's embedded descriptors into .bench/etcd_stubs (git-ignored).
bench-setup: $(STAMP)
	@command -v etcd >/dev/null || test -x /usr/bin/etcd || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server; }
	$(BIN)/pip install --quiet --no-deps etcd3==0.12.0
	$(BIN)/python -m tests.bench.etcd_stubs

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
