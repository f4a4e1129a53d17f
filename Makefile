# Two commands do all the set-up on a fresh machine:
#   make demo   builds Fashion-MNIST MDS shards and trains with and without selection
#   make test   runs the test suite
# Both create the virtual environment and install what is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint data venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[composer,dev]'
	@touch $@

data:
	@bash scripts/ensure-fashion-mnist.sh

demo: $(STAMP) data
	$(PY) -m benchmarks.demo

test: $(STAMP) data
	@bash scripts/run-tests.sh $(PY) $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check jest_stream integrations benchmarks tests examples

clean:
	rm -rf $(VENV) build dist *.egg-info
