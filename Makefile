# The two commands of the README:
#   make demo   set up and run the ReST demo on the built-in task
#   make test   set up and run the test suite
# Every install is constrained by requirements.lock, the whole resolved set the tests passed with.
# Upgrade on purpose: change a pin in pyproject.toml, `make lock`, `make test-all`, commit both files.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

LOCK   := requirements.lock
PIP    := $(BIN)/python -m pip install --quiet -c $(LOCK)

.PHONY: demo test test-stack test-all bench compare lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: it resolves to the CPU wheel instead of GBs of CUDA packages.
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flywheel run recipes/arithmetic-rest.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not stack" -q

# The real local stack (Prefect server, MLflow server, S3 server on loopback), as users run it.
# It installs what it needs itself: Playwright for Python (pinned in requirements.lock; never
# `playwright install`) and Debian's chromium, which the browser test drives headless.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-stack: $(STAMP)
	$(PIP) -e ".[dev,stack]"
	test -x /usr/bin/chromium || ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium)
	$(BIN)/python -m pytest -m stack -q

test-all: $(STAMP)
	$(MAKE) test-stack
	$(PIP) -e ".[dev,serving]"  # transformers serve, for tests/test_transformers_serve.py
	$(BIN)/python -m pytest -m "not stack" -q

bench: $(STAMP)
	$(PIP) -e ".[dev,bench]"
	$(BIN)/python bench/run.py

compare: $(STAMP)
	$(BIN)/python -m flows.compare recipes/arithmetic-dpo.yaml

# Re-resolve requirements.lock from pyproject.toml (then run make test-all and commit it).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python infra/lock.py

clean:
	rm -rf lake mlflow/mlflow.db mlflow/artifacts .flywheel
