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

# Until the trained demo model ships (issue 6), the main job runs on a tiny random-weight
# OpenFlamingo-style model written in the real formats: load -> inspect -> export -> run.
DEMO := out/demo
demo: $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/python -m flamingo.tiny $(DEMO)/src --family llama
	$(BIN)/flamingo-export inspect --lm $(DEMO)/src/lm \
		--vision $(DEMO)/src/open_clip_model.safetensors --checkpoint $(DEMO)/src/checkpoint.pt
	$(BIN)/flamingo-export export --lm $(DEMO)/src/lm \
		--vision $(DEMO)/src/open_clip_model.safetensors --checkpoint $(DEMO)/src/checkpoint.pt \
		--output $(DEMO)/export
	$(BIN)/python -c "from PIL import Image; \
		Image.new('RGB', (64, 48), 'red').save('$(DEMO)/red.png'); \
		Image.new('RGB', (48, 64), 'blue').save('$(DEMO)/blue.png')"
	$(BIN)/flamingo-export run $(DEMO)/export --json --max-new-tokens 8 \
		--prompt '<image>Output:A red square.<|endofchunk|><image>Output:' \
		--image $(DEMO)/red.png --image $(DEMO)/blue.png

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
