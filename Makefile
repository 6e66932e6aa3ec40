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
	# torch from the local wheels only (--no-index): the index offers CUDA builds of the same
	# version; the CPU build on disk is 2.13.0+cpu, which constraints.txt's torch==2.13.0 matches
	# (--no-deps: torch's own dependencies come with the next step, which finds torch installed)
	$(BIN)/pip install -q --no-index --no-deps -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[export,eval,serve,ray,bench,video,dev]'
	$(BIN)/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)"
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

# The main job on the embedded demo model (models/demo, trained by `python -m demo.train`):
# load -> inspect -> export fp32 -> run a held-out 4-shot episode with the torch-free runtime ->
# parity of the export against PyTorch -> int8 (calibrated on the demo task's training split) ->
# the same episode on int8 -> parity of int8 against fp32, gated on held-out task accuracy.
DEMO := out/demo
MODEL := models/demo
MODEL_FILES := --lm $(MODEL)/lm --vision $(MODEL)/open_clip_model.safetensors \
	--checkpoint $(MODEL)/checkpoint.safetensors
VIDEO_FILES := --lm $(MODEL)/lm --vision $(MODEL)/open_clip_model.safetensors \
	--checkpoint models/demo-video/checkpoint.safetensors
EPISODE := --demos $(DEMO)/episode/demos.jsonl --image $(DEMO)/episode/query.png
HELD_OUT := --data demo-eval --episodes 200 --max-shots 4 --decode-steps 4
demo: $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/flamingo-export inspect $(MODEL_FILES)
	$(BIN)/flamingo-export export $(MODEL_FILES) --output $(DEMO)/export
	$(BIN)/python -m demo.task $(DEMO)/episode --shots 4
	$(BIN)/flamingo-export run $(DEMO)/export --max-new-tokens 4 $(EPISODE)
	$(BIN)/flamingo-export parity $(DEMO)/export $(MODEL_FILES) $(HELD_OUT)
	$(BIN)/flamingo-export quantize $(DEMO)/export --precision int8 --calibration demo \
		-o $(DEMO)/int8
	$(BIN)/flamingo-export run $(DEMO)/int8 --max-new-tokens 4 $(EPISODE)
	$(BIN)/flamingo-export parity $(DEMO)/export $(DEMO)/int8 $(HELD_OUT) \
		--report $(DEMO)/parity-int8.md
	# video: the demo's LM and vision with the clip checkpoint (models/demo-video), one held-out
	# 4-shot clip episode (animated GIFs) answered by the runtime
	$(BIN)/flamingo-export export $(VIDEO_FILES) --output $(DEMO)/video-export
	$(BIN)/python -m demo.task $(DEMO)/video-episode --shots 4 --video
	$(BIN)/flamingo-export run $(DEMO)/video-export --max-new-tokens 4 \
		--demos $(DEMO)/video-episode/demos.jsonl --video $(DEMO)/video-episode/query.gif

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
