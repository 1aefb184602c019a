# Two entry points for a fresh machine: `make demo` and `make test`.
# torch is pinned to the CPU build this project is developed and tested with; a looser
# pin lets pip pull a multi-GB CUDA build. pyproject.toml keeps the honest range.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test install install-dev clean

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

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs sites_example/data .pytest_cache
