"""Few-shot evaluation speed: open_flamingo's evaluation loop on the PyTorch model vs
`flamingo-export eval` on the export, the same evaluation in one run.

The data is the demo task written as a COCO captioning benchmark in the official formats
(Karpathy `dataset_coco.json`, COCO `captions_val2014.json`, image folders): every image's
caption is one attribute's word (default: colour), train images from the training pairs, test
images of the held-out pairs, so a few demonstrations teach the answer. Both sides run
OpenFlamingo's protocol (random demonstrations from the query set, seed 42, 3 beams, 20 new
tokens, length_penalty 0, CIDEr): the baseline is `open_flamingo/eval/evaluate.py`'s
`evaluate_captioning` (batch 8, its default) driving the PyTorch demo model through our
`EvalModel` adapter (`evaluation.reference`), the candidate `evaluation.runner.evaluate` on the
fp32 export. Each shot count runs twice per side, the repeated demonstrations case
(`--query-set-size` equal to the largest shot count: every query draws the same images, in its
own order) and `--large-query-set` (every train record). Wall time per shot count includes
the metric; the answers of both sides are compared.

    python benchmarks/eval_bench.py [--queries 200] [--shots 0,4,8,16] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "demo"


def write_demo_coco(root: Path, n_train: int, n_test: int, attribute: str) -> Path:
    """The demo task as a COCO captioning benchmark (see the module docstring)."""
    import random

    from demo.task import sample_scene

    images, annotations = [], []
    for i in range(n_train + n_test):
        train = i < n_train
        folder = "train2014" if train else "val2014"
        rng = random.Random(f"eval-bench/{i}")
        scene = sample_scene(rng, "train" if train else "heldout")
        name = f"COCO_{folder}_{i:012d}.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        scene.render().save(root / folder / name, quality=95)
        caption = scene.answer(attribute)
        images.append({"filepath": folder, "filename": name, "cocoid": i,
                       "split": "train" if train else "test",
                       "sentences": [{"raw": caption}]})  # fmt: skip
        if not train:
            annotations.append({"image_id": i, "id": i, "caption": caption})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    (root / "annotations").mkdir(exist_ok=True)
    coco = {"images": [{"id": im["cocoid"]} for im in images if im["split"] == "test"],
            "annotations": annotations}  # fmt: skip
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(coco))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--shots", default="0,4,8,16")
    parser.add_argument("--train", type=int, default=256, help="train records")
    parser.add_argument("--attribute", default="colour")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads (1: ~8x faster than 2 for this model)")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    shots = [int(s) for s in args.shots.split(",")]

    import torch

    from evaluation.reference import ReferenceEvalModel, run_open_flamingo_eval
    from evaluation.runner import EvalOptions, evaluate
    from evaluation.tasks import TASKS
    from exporter.export import export_model
    from flamingo.loaders import load_flamingo
    from runtime.pipeline import FlamingoPipeline

    torch.set_num_threads(args.torch_threads)
    tmp = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    data = write_demo_coco(tmp / "coco", args.train, args.queries, args.attribute)
    model, tokenizer, _ = load_flamingo(
        MODEL / "lm", MODEL / "open_clip_model.safetensors", MODEL / "checkpoint.safetensors"
    )
    export_model(model, tokenizer, tmp / "export", progress=None)
    reference = ReferenceEvalModel(model, tokenizer, batched=True)

    def opener(path: Path) -> Any:
        return FlamingoPipeline(path, threads=args.threads)

    rows = []
    for label, query_set in (("repeated", max(max(shots), 2)), ("large", args.train)):
        for k in shots:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints; --json is ours
                of_score, of_results = run_open_flamingo_eval(
                    TASKS["coco"], data, reference, shots=k, seed=42, num_samples=args.queries,
                    query_set_size=query_set, batch_size=8,
                )  # fmt: skip
            of_s = time.perf_counter() - t0
            options = EvalOptions(shots=(k,), seed=42, num_samples=args.queries,
                                  query_set_size=query_set)  # fmt: skip
            t0 = time.perf_counter()
            ours = evaluate([tmp / "export"], "coco", data, options, opener).exports[0].trials[0]
            ours_s = time.perf_counter() - t0
            same = [(p["id"], p["prediction"]) for p in ours.predictions] == [
                (r["image_id"], r["caption"]) for r in of_results
            ]
            rows.append({"demonstrations": label, "query_set_size": query_set, "shots": k,
                         "open_flamingo_s": round(of_s, 2), "eval_s": round(ours_s, 2),
                         "speedup": round(of_s / ours_s, 2), "cider_open_flamingo": of_score,
                         "cider_eval": ours.score, "same_answers": same})  # fmt: skip
            if not args.json:
                print(rows[-1], flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                       if ln.startswith("Model name")), platform.processor())  # fmt: skip
    meta = {"cpu": model_name, "threads": {"onnxruntime": args.threads,
            "torch": args.torch_threads}, "queries": args.queries, "train": args.train}  # fmt: skip
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        print(meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
