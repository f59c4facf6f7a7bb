# pdserve: make install | protos | demo | test | bench | lint | format
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard protos/pdserve/v1/*.proto)
# Tests and the demo keep their generated tiny models here (not in ~/.cache) so a clone is self-contained.
export PDSERVE_CACHE ?= $(CURDIR)/.cache

.PHONY: install system-packages protos demo test test-fast bench lint format clean

install: $(VENV)/.installed protos system-packages

# Debian's prometheus/promtool, for the observability tests; installed when missing and possible.
system-packages:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's prometheus package"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	      && (service prometheus stop >/dev/null 2>&1 || true); \
	  else echo "warning: prometheus is not installed (apt-get install prometheus); its tests will fail"; fi; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 (a plain `torch` would fetch a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[engine,bench,dev]' --config-settings editable_mode=compat
	touch $@

protos: pdserve/v1/.generated

# Stubs land in ./pdserve/v1 (git-ignored), importable as pdserve.v1.*_pb2.
pdserve/v1/.generated: $(PROTOS) $(VENV)/.installed
	@mkdir -p pdserve/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	@touch pdserve/__init__.py pdserve/v1/__init__.py $@

demo: install
	$(PY) -m services.cli demo

test: install
	$(PY) -m pytest -q -ra --durations=15 tests

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" tests

bench: install
	$(PY) -m bench.all

# ruff (lint rules and formatting) and mypy, configured in pyproject.toml; `make format` rewrites.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf pdserve build results .pytest_cache
