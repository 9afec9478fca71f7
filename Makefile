# Two set-up commands (see README): `make demo` and `make test`.
# Both create or refresh .venv in the repo root and install everything they need.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch where no CUDA device exists. On these machines pip takes a CPU
# wheel of torch 2.13.0 from local disk; elsewhere set TORCH_PIP_ARGS, e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# On a machine with nvidia-smi the default PyPI wheel (a CUDA build) is taken instead.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_CUDA),torch,torch==$(TORCH_VERSION))

# A real Prometheus server and promtool for tests/service/test_metrics.py: Debian's package,
# downloaded and unpacked under .venv/prometheus/ (nothing installed system-wide, no root needed
# unless apt's package lists must be fetched first). Where that fails (no apt-get, no network)
# make goes on: the test skips on a developer's machine and fails under CI (CI set).
PROMETHEUS_DIR := $(VENV)/prometheus
PROMETHEUS := $(PROMETHEUS_DIR)/usr/bin/prometheus

.PHONY: demo test lint venv clean bench prometheus

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps record which extras were installed; they are refreshed whenever pyproject.toml changes.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[$*]"
	touch $@

venv: $(VENV)/.installed-viz

demo: $(VENV)/.installed-viz
	$(BIN)/cicw-stream demo

# Static checks first (seconds), then the whole suite; settings in pyproject.toml.
lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy

# Two pytest workers, a test file each at a time (module fixtures stay in one process): most of
# the suite waits on Ray, the broker and subprocesses rather than computing, so two files at
# once take ~10 min on 2 cores where one at a time took ~13.
test: lint $(PROMETHEUS)
	$(BIN)/python -m pytest -n 2 --dist loadfile

prometheus: $(PROMETHEUS)

$(PROMETHEUS):
	@mkdir -p $(PROMETHEUS_DIR)/deb
	@cd $(PROMETHEUS_DIR)/deb && rm -f prometheus_*.deb && \
	if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then \
	    echo "make: no apt-get/dpkg here: no Prometheus for tests/service/test_metrics.py"; \
	else \
	    { apt-cache show prometheus >/dev/null 2>&1 || apt-get update -qq || true; } && \
	    apt-get download -qq prometheus 2>&1 | grep -v "unsandboxed as root"; \
	    if ls prometheus_*.deb >/dev/null 2>&1; then dpkg -x prometheus_*.deb .. && rm prometheus_*.deb; \
	    else echo "make: apt-get could not download prometheus: tests/service/test_metrics.py cannot use it"; fi; \
	fi

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
