#!/bin/bash
# The base install at its declared floors (pyproject.toml): a fresh venv with exactly those
# versions (and numpy 2 with the onnxruntime floor), the runtime generating from EXPORT_DIR
# (greedy, beam, sampling; fp32 and any other export given) and `check` with onnx alone.
# Usage: benchmarks/floors.sh EXPORT_DIR [MORE_EXPORT_DIRS...]   (needs the package index)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
V=$(mktemp -d /tmp/floors.XXXXXX); trap 'rm -rf "$V"' EXIT
python3 -m venv "$V"
gen='
import sys
from runtime.generation import GenerationConfig
from runtime.pipeline import FlamingoPipeline
for export in sys.argv[1:]:
    pipe = FlamingoPipeline(export)
    for cfg in (GenerationConfig(max_new_tokens=4), GenerationConfig(max_new_tokens=4, num_beams=3),
                GenerationConfig(max_new_tokens=4, do_sample=True, seed=1, top_k=5)):
        import numpy as np
        image = np.random.default_rng(0).random((40, 50, 3)).astype(np.float32)
        out = pipe.generate("<image>Output:", [image], cfg)
        print(export, cfg.num_beams, cfg.do_sample, out.token_ids)
'
for numpy in 1.24.4 2.4.6; do
  "$V/bin/pip" install -q "numpy==$numpy" onnxruntime==1.19.0 tokenizers==0.20.0 Pillow==10.0.0 \
    click==8.1.0
  "$V/bin/pip" install -q --no-deps -e "$REPO"
  echo "== numpy $numpy, onnxruntime 1.19.0, tokenizers 0.20.0, Pillow 10.0.0, click 8.1.0"
  (cd "$REPO" && "$V/bin/python" -c "$gen" "$@")
done
"$V/bin/pip" install -q onnx==1.16.0
echo "== check with onnx 1.16.0 only"
"$V/bin/flamingo-export" check "$1" | tail -1
echo "== reference: the project's venv"
(cd "$REPO" && .venv/bin/python -c "$gen" "$@")
