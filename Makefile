# Quick start: `make demo` (train + evaluate on the course dataset) and `make test` (whole suite).
# Both create .venv and install everything they need on a fresh clone. `make test-fast` is the fast tier
# (no apt, no Orthanc, no Chromium); `make docs` builds the documentation site with --strict.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CHESTXRAY_DATA ?= $(abspath ../shared/datasets)

.PHONY: demo test test-fast test-slow docs install install-dev allocator browser pacs clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e . 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import chestxray, torch, timm, lightning"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import pytest, skimage, hypothesis"
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[docs]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import mkdocs, material, mkdocstrings"
	touch $@

install: $(VENV)/.installed allocator
install-dev: $(VENV)/.installed-dev allocator

# tcmalloc keeps large blocks that glibc's malloc gives back and faults in again on every training step
# (1.3x on a quiet machine, more under load); the CLI re-executes itself on it (chestxray/allocator.py).
# Without apt (or root) the tool still runs, on the system allocator, and says so.
allocator:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || \
	  ($(SUDO) apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 || \
	   ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4) || \
	   echo "tcmalloc not installed: chestxray runs on the system allocator (slower training)")

# The main job: train the default model on the course dataset's train/ and evaluate it once on test/.
COURSE := $(CHESTXRAY_DATA)/chest_xray_4class
demo: install
	rm -rf runs/demo
	$(BIN)/chestxray train "$(COURSE)" --out runs --name demo
	$(BIN)/chestxray evaluate runs/demo/bundle "$(COURSE)" --out runs/demo/evaluation
	@echo "bundle: runs/demo/bundle  (try: $(BIN)/chestxray serve runs/demo/bundle)"

# Debian's Chromium and ChromeDriver drive the browser test of the web page.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver)

# Debian's Orthanc (with its DICOMweb plugin) is the real PACS of the DICOM network tests.
pacs:
	command -v Orthanc >/dev/null && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb)

# The whole suite. Tiers (tests/conftest.py): `slow` marks what trains, starts processes or servers, drives
# Chromium (`browser`) or needs Orthanc (`pacs`); everything else is the fast tier, where a test over 5 s fails.
# The whole suite: the fast tier first (a quick answer), then the rest (property tests again at full count).
test: install-dev browser pacs
	$(MAKE) --no-print-directory test-fast
	$(MAKE) --no-print-directory test-slow

# The fast tier: no apt, Orthanc or Chromium, a few hypothesis examples per property; at most 90 s on 2 cores.
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "not slow" --hypothesis-profile fast

# The rest of `make test` after `make test-fast` (CI runs both): the slow tier, and the property tests
# again with their full example counts.
test-slow: install-dev browser pacs
	$(BIN)/python -m pytest -q -m "slow or hypothesis"

# The documentation site (MkDocs, Material, mkdocstrings) into site/; any warning fails the build.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

clean:
	rm -rf runs .pytest_cache site
