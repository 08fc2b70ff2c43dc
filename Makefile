# Quick start: `make demo` runs the end-to-end demo, `make test` runs lint and the tests.
# Both create .venv on first use and reinstall only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# torch first, by exact version: on CPU machines this takes the CPU wheel, so no dependency
# can pull a multi-GB CUDA build. On a GPU host, install the CUDA build of it beforehand.
TORCH := torch==2.13.0

.PHONY: demo test lint install clean chromium

demo: $(INSTALLED)
	$(BIN)/fedseg demo --workdir demo_workdir

test: lint chromium
	$(BIN)/python -m pytest

# The report tests render pages in headless Chromium (Debian's package; installing needs root).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| (echo "make test needs Debian's chromium: apt-get install chromium" >&2; exit 1)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) demo_workdir .pytest_cache .ruff_cache
