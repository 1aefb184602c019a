# Two entry points for a fresh machine: `make demo` and `make test`.
# torch is pinned to the CPU build this project is developed and tested with; a looser
# pin lets pip pull a multi-GB CUDA build. pyproject.toml keeps the honest range.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test install install-dev tools clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

install-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/medgan demo --device cpu

# Debian's dicom3tools (dciodvfy) validates the DICOM that `medgan infer` writes; where
# apt-get cannot install it (not Debian, not root) those tests skip and say why.
tools:
	@command -v dciodvfy >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && apt-get install -y -qq dicom3tools >/dev/null; } || \
		echo "dicom3tools not installed: the DICOM validation tests will skip"

test: $(DEV_STAMP) tools
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs sites_example/data .pytest_cache
