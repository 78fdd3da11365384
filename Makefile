# `make test` and `make demo` do all set-up on a fresh clone: a .venv with torch and the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of this version is on disk on our machines; elsewhere pip takes the usual build,
# and a machine where it is unavailable falls back to the newest torch.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

.PHONY: test demo lint install clean

install: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)" || $(BIN)/python -m pip install torch
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

test: $(VENV)/.installed lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(BIN)/medlandmark demo

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache
