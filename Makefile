# synrep: `make demo` runs the main job, `make test` runs the tests; each sets everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Torch wheels this machine serves from disk; users with other set-ups may pass TORCH_SPEC="torch".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
# the DejaVu core fonts draw the glyphs dataset (the distant domain of the negative-transfer study)
DEJAVU := /usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf
# `make check-install`: a fresh venv, `pip install .` with its dependencies, the quickstart
CHECK_DIR ?= /tmp/synrep-check-install
# headless Chromium and its driver: the report test renders the HTML report in a real browser
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data browser demo test test-fast lint bench clean check-install

setup: $(VENV)/.installed data

data: $(FASHION_MNIST) $(DEJAVU)

$(FASHION_MNIST):
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

$(DEJAVU):
	$(SUDO) apt-get install -y fonts-dejavu-core || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y fonts-dejavu-core)

browser: $(CHROMEDRIVER)

$(CHROMEDRIVER):
	$(SUDO) apt-get install -y chromium chromium-driver || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev,gen]"
	touch $@

demo: setup
	$(VENV)/bin/synrep run configs/quickstart.yaml

test: setup browser
	$(VENV)/bin/ruff check .
	SYNREP_REQUIRE_BROWSER=1 $(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/fashion_simclr.py
	$(PY) benchmarks/captions.py --json benchmarks/results/captions.json
	$(PY) benchmarks/images.py --json benchmarks/results/images.json

check-install: data
	rm -rf $(CHECK_DIR) && mkdir -p $(CHECK_DIR)/elsewhere
	$(PYTHON) -m venv $(CHECK_DIR)/venv
	$(CHECK_DIR)/venv/bin/pip install -q $(TORCH_SPEC)
	$(CHECK_DIR)/venv/bin/pip install -q .
	cd $(CHECK_DIR)/elsewhere && ../venv/bin/synrep run quickstart train.steps=20 \
	  captions.num=200 run.dir=$(CHECK_DIR)/run

clean:
	rm -rf runs
