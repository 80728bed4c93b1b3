# Two commands on a fresh machine: `make train` and `make test`.
# Each creates .venv and installs requirements.txt the first time.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED_MNIST := $(abspath ../shared/data/mnist)
# Offline MNIST: AIR_MNIST_DIR if set, else ../shared/data/mnist if present
# (otherwise TFDS downloads and checksums the files).
export AIR_MNIST_DIR ?= $(if $(wildcard $(SHARED_MNIST)/train-images-idx3-ubyte.gz),$(SHARED_MNIST),)
export TFDS_DATA_DIR ?= $(HOME)/tensorflow_datasets
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
ARGS ?=

.PHONY: venv train test lint format bench package-check clean

$(STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(PY) -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

SOURCES := air_jax experiments configs tests benchmarks

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)

format: $(STAMP)
	$(VENV)/bin/ruff format $(SOURCES)
	$(VENV)/bin/ruff check --fix $(SOURCES)

test: $(STAMP) lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=10 tests

bench: $(STAMP)
	$(PY) -m benchmarks.run $(ARGS)

# `pip install .` into a fresh venv, then air-infer from another directory.
package-check:
	bash .ci/package_check

clean:
	rm -rf $(VENV) .pytest_cache
