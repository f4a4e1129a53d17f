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
	@echo 'Creating $(VENV) with jest-stream and its composer and dev extras (several GB the first time).'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[composer,dev]'
	@touch $@

data:
	@bash scripts/ensure-fashion-mnist.sh
	@bash scripts/ensure-sotu.sh

demo:
	@echo 'make demo: first builds a virtual environment of several GB in $(VENV) (6.4 GB here:'
	@echo 'torch, Composer, mosaicml-streaming; only the first time) and the Fashion-MNIST pool as'
	@echo 'MDS shards under data/ (once); then trains a small CNN on the noisy pool with uniform'
	@echo 'sampling and with learnability selection: about 2 minutes on two CPU cores.'
	@$(MAKE) --no-print-directory venv data
	$(PY) -m benchmarks.demo

test: $(STAMP) data
	@bash scripts/run-tests.sh $(PY) $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check jest_stream integrations benchmarks tests examples

clean:
	rm -rf $(VENV) build dist *.egg-info
