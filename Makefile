# `make run` sets up and runs the default study; `make test` sets up and runs the tests;
# `make lint` checks style and formatting of the package, its tests and benchmarks, and the package's
# types (CI runs it before the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
ARGS ?=

.PHONY: setup model run test lint bench-setup clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build on a fresh venv
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

model: setup
	$(PY) -m optimizer.fetch

run: model
	$(PY) -m optimizer run $(ARGS)

test: model
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs --durations=15 -n auto --dist worksteal tests

$(VENV)/.lint-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,lint]"
	touch $@

lint: $(VENV)/.lint-installed
	$(PY) -m ruff check optimizer tests benchmarks
	$(PY) -m ruff format --check optimizer tests benchmarks
	$(PY) -m mypy

bench-setup: setup
	$(PY) -m pip install --quiet -e ".[test,bench]"

clean:
	rm -rf $(VENV) studies/*.db studies/*/
