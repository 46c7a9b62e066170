# make demo: run the built-in pipeline on the zoo.  make test: the test suite.
# Both create .venv on first use and install edgepipe with the tested versions (constraints.txt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, alone and pinned, so nothing can resolve it to a CUDA build.
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[pipeline,serve,dev]"
	# Triton's ModelConfig schema (edgepipe triton checks config.pbtxt with it). --no-deps: its
	# metadata caps ml-dtypes and protobuf below what onnx needs; the schema needs neither.
	$(PY) -m pip install -q --no-deps -c constraints.txt tritonclient
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgepipe demo

test: $(STAMP) lint
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check edgepipe tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/zoo_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
