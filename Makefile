# Two commands on a fresh machine: `make demo` (main job on the embedded demo model)
# and `make test` (lint + the whole test suite). Both create .venv from the lock first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[export,dev]'
	# Test oracle: the published OpenFlamingo package, without its pinned torch/open_clip deps.
	$(BIN)/pip install -q --no-deps -c constraints.txt open-flamingo==2.0.1
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/flamingo-export --help

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
