"""Prefill with the LM head on the last position only vs on every prompt position.

Why: generation reads only the last position's logits, yet a decoder that returns (B, T, V)
does T x vocab x width MACs of LM head per prompt (3 GFLOP for a 4-shot prompt at a 32k
vocabulary). The decoder graph takes `logits_index` (runtime.spec); this script measures what
asking for one position saves, against asking for all of them (what the graph computed before
it had that input), in one process, interleaved, on the runtime bench's 144M model with its LM
vocabulary grown to a real size (random rows appended to the embedding, a random LM head: the
speed does not depend on the values).

    python benchmarks/prefill_logits_bench.py --vocab 32000 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_export(workdir: Path, vocab: int) -> Path:
    """The runtime bench's model (benchmarks/runtime_bench.py FULL) with `vocab` LM rows."""
    import torch

    from benchmarks.runtime_bench import FULL
    from exporter.export import export_model
    from fixtures.tiny import build_tiny_flamingo
    from flamingo.loaders import load_flamingo

    out = workdir / "export"
    if out.exists():
        return out
    paths = build_tiny_flamingo(
        workdir / "src",
        "llama",
        cross_attn_every_n_layers=2,
        lm_overrides={"max_position_embeddings": 2048},
        **FULL,
    )
    model, tok, _ = load_flamingo(paths.lm_dir, paths.vision_path, paths.checkpoint_path)
    lm = model.lang_model
    old = lm.embed_tokens.weight.data
    if vocab > old.shape[0]:
        grown = torch.randn(vocab, old.shape[1]) * 0.02
        grown[: old.shape[0]] = old
        lm.embed_tokens = torch.nn.Embedding.from_pretrained(grown, freeze=False)
        lm.lm_head = torch.nn.Linear(old.shape[1], vocab, bias=False)
        model.cfg.lm.vocab_size = vocab
    export_model(model, tok, out, progress=None)
    return out


def measure(export: Path, shots: list[int], repeats: int, threads: int) -> list[dict[str, Any]]:
    from tokenizers import Tokenizer

    from bench.harness import caption_prompt_of
    from runtime.engine import OnnxFlamingo

    engine = OnnxFlamingo(export, threads=threads)
    tok = Tokenizer.from_file(str(export / "tokenizer" / "tokenizer.json"))
    size = engine.dims.image_size
    rows = []
    for k in shots:
        ids = np.array([tok.encode(caption_prompt_of(k)).ids], dtype=np.int64)
        n = int((ids == engine.media_token_id).sum())
        pixels = np.random.default_rng(k).standard_normal((n, 3, size, size)).astype(np.float32)
        cross = engine.rows_cross_kv(engine.encode_images(pixels), [list(range(n))])
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats + 1):  # the first round warms up
            for every in (True, False):
                model = engine.step_model(cross, np.array([n]))
                time.sleep(0.2)  # idle workers stop spinning between runs
                start = time.perf_counter()
                model._forward(ids, np.ones_like(ids), all_positions=every)
                times[every].append((time.perf_counter() - start) * 1e3)
        every_ms = statistics.median(times[True][1:])
        last_ms = statistics.median(times[False][1:])
        rows.append(
            {
                "shots": k,
                "prompt_tokens": int(ids.shape[1]),
                "every_position_ms": round(every_ms, 1),
                "last_position_ms": round(last_ms, 1),
                "ratio": round(last_ms / every_ms, 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000, help="LM vocabulary (default 32000)")
    parser.add_argument("--shots", default="0,4,16", help="comma-separated (default 0,4,16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keep model + export here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prefill_logits_"))
    export = build_export(workdir, args.vocab)
    shots = [int(k) for k in args.shots.split(",")]
    rows = measure(export, shots, args.repeats, args.threads)
    report = {"vocab": args.vocab, "threads": args.threads, "repeats": args.repeats, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"vocab {args.vocab}, {args.threads} threads, median of {args.repeats}")
        print("| shots | prompt tokens | logits for every position ms | last only ms | ratio |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['shots']} | {r['prompt_tokens']} | {r['every_position_ms']} | "
                f"{r['last_position_ms']} | {r['ratio']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
