"""How far two decoder forms of one export's precisions are apart: logits of a 0-shot prompt
and the first greedy tokens teacher-forced, max abs difference, and the top-2 margins where
their greedy choices differ (README, "Vision and prefill on the CPU's int8 units").

    python benchmarks/form_logit_gap.py W/export W/forms/inplace [--precision fp32,int8-weight-only]

PORTABLE and OTHER are runtime_bench / decode_forms_bench folders (precisions beside them as
FOLDER-<precision>, fp32 the folder itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_forms_bench import prompt_ids
from runtime_bench import precision_export


def teacher_forced_logits(engine, cross: dict, ids: np.ndarray, tokens: list[int]) -> np.ndarray:
    """(len(tokens) + 1, V) last-position logits of the prompt and each forced token."""
    model = engine.step_model(cross, np.array([1]))
    out = [model.step(ids, np.ones_like(ids))]
    for t in tokens:
        ids = np.concatenate([ids, [[t]]], axis=1)
        out.append(model.step(ids, np.ones_like(ids)))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("portable", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--precision", default="fp32,int8-weight-only,int8-dynamic,int4")
    parser.add_argument("--tokens", type=int, default=8, help="forced tokens (default 8)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from runtime.engine import OnnxFlamingo

    base = OnnxFlamingo(args.portable, threads=args.threads)
    dims = base.dims
    pixels = np.random.default_rng(0).standard_normal((1, 3, dims.image_size, dims.image_size))
    cross = base.rows_cross_kv(base.encode_images(pixels.astype(np.float32)), [[0]])
    ids = prompt_ids(base.manifest, 0, 0)
    forced = teacher_forced_logits(base, cross, ids, [])[0]
    tokens = [int(forced.argmax())] * args.tokens  # a fixed continuation for every engine
    report = {}
    for precision in [p for p in args.precision.split(",") if p]:
        a, b = (
            teacher_forced_logits(
                OnnxFlamingo(precision_export(folder, precision), threads=args.threads),
                cross, ids, tokens,
            )
            for folder in (args.portable, args.other)
        )  # fmt: skip
        top2 = np.sort(a, axis=1)[:, -2:]
        flips = np.flatnonzero(a.argmax(1) != b.argmax(1))
        report[precision] = {
            "max_abs_logit_diff": float(np.abs(a - b).max()),
            "greedy_differs_at": flips.tolist(),
            "top2_margin_there": [round(float(top2[i, 1] - top2[i, 0]), 4) for i in flips],
        }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
