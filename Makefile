# MapQuery RS: `make test` and `make demo` set everything up on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
QGIS_PYTHON ?= /usr/bin/python3
# Debian packages the QGIS side and the test harness need.
APT_PACKAGES := python3-qgis qgis python3-zmq python3-pytest python3-hypothesis xvfb xauth python3-venv
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?= -q
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: all venv system-deps lint test test-protocol test-backend test-plugin demo bench reliability plugin qgis clean help

help:
	@echo "make test    install what is missing (venv, Debian QGIS packages), lint (ruff) and run every test"
	@echo "make demo    start a backend and run the main job (the plugin's code, headless) against it"
	@echo "make bench   run the benchmarks in bench/"
	@echo "make reliability  fault, load, fuzz and attack figures (docs/reliability.md)"
	@echo "make plugin  build dist/mapquery_rs.zip for QGIS's 'Install from ZIP'"
	@echo "make qgis    open QGIS with the plugin and the sample raster"

# The backend's virtualenv: rebuilt only when pyproject.toml changes.
venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV) || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			rm -rf $(VENV); apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
			&& $(PYTHON) -m venv $(VENV); \
		else echo "cannot create a venv: install python3-venv"; exit 1; fi; }
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[dev,scale]'
	@touch $(STAMP)

# QGIS's own Python with pyzmq, pytest and hypothesis (Debian packages), installed when missing.
system-deps:
	@if $(QGIS_PYTHON) -c "import qgis.core, zmq, pytest, hypothesis" 2>/dev/null && command -v xvfb-run >/dev/null \
		&& command -v qgis >/dev/null && command -v xauth >/dev/null; then \
		:; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian packages: $(APT_PACKAGES)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	else \
		echo "missing Debian packages; run: sudo apt-get install $(APT_PACKAGES)"; exit 1; \
	fi

test: venv system-deps lint test-protocol test-backend test-plugin

# ruff (pyproject's [tool.ruff]: pyflakes, pycodestyle, bugbear at 120 columns) over every Python file
lint: venv
	$(VPY) -m ruff check .

# The protocol runs under both interpreters: the venv (numpy 2) and QGIS's Python (numpy 1.24).
test-protocol: venv system-deps
	$(VPY) -m pytest $(PYTEST_FLAGS) tests/protocol
	$(QGIS_PYTHON) -m pytest $(PYTEST_FLAGS) -p no:cacheprovider tests/protocol

test-backend: venv
	$(VPY) -m pytest $(PYTEST_FLAGS) tests/backend

test-plugin: venv system-deps
	@if [ -d tests/plugin ]; then \
		QT_QPA_PLATFORM=offscreen BACKEND_PYTHON=$(abspath $(VPY)) $(QGIS_PYTHON) -m pytest $(PYTEST_FLAGS) -p no:cacheprovider tests/plugin; \
	fi

# The main job, through the plugin's own code in QGIS's Python: backend, sample raster, classify, search,
# localize; layers (GeoTIFF, GeoPackage), a project and a PNG of the map land in out/.
demo: venv system-deps
	QT_QPA_PLATFORM=offscreen $(QGIS_PYTHON) scripts/demo_plugin.py --backend-python $(VPY) --out out/

# An installable plugin zip (Plugin Manager > Install from ZIP) with metadata.txt and shared_protocol inside.
plugin: system-deps
	$(QGIS_PYTHON) scripts/build_plugin.py

# QGIS desktop with the plugin installed and the sample raster loaded (needs a display).
qgis: venv system-deps
	scripts/run_qgis.sh

bench: venv
	$(VPY) bench/run_all.py

# Faults (kill -9 during localize x20), load (8 clients x 50 requests), fuzzing (10,000 messages).
reliability: venv
	$(VPY) bench/reliability.py

clean:
	rm -rf $(VENV) dist out .pytest_cache
