PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
JOBS ?= 2

.PHONY: install install-test demo test clean services

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU wheel, so nothing else resolves a CUDA build
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m vidloom.demo

test: install-test services
	$(PY) -m pytest -n $(JOBS) -q

# what the tests start themselves, from Debian's packages: Chromium for the serve web page's
# browser test (driven by Playwright through its executable path) and PostgreSQL for the shared
# job store (a throwaway server on loopback)
services:
	@command -v chromium >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -q && apt-get install -y -q chromium postgresql)

clean:
	rm -rf $(VENV) build *.egg-info
