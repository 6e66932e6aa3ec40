"""Quantization benchmark: file sizes on a model big enough to measure, and the fp16 keep-list.

Two measurements the tests cannot make on the tiny models:

* ``sizes``: a random OpenFlamingo-style model with hidden 512 (the tiny models are dominated
  by small tensors: norms, biases, latents, which are never quantized), exported fp32 and
  quantized to fp16 / int8 / int4 (block 32, 64, 128): bytes per graph and ratio to fp32.
* ``fp16-keep``: which parts of an fp16 graph must stay fp32. Random tiny models have unit-scale
  activations, so every keep-list gives the same tokens there; real LLMs carry hidden-state
  outliers of hundreds to thousands. This multiplies the LM's input embeddings by ``--outlier``
  (norms make the fp32 model use them like any hidden state), then measures fp16 parity for
  each keep-list against that fp32 export.

    python benchmarks/quantize_bench.py sizes [--hidden 512] [--json]
    python benchmarks/quantize_bench.py fp16-keep [--outlier 400] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.data import calibration_set  # noqa: E402
from exporter.parity import OnnxBackend, run_parity  # noqa: E402
from exporter.quantize import QuantizeOptions, quantize_export  # noqa: E402
from runtime.manifest import load_manifest  # noqa: E402


def _export(root: Path, family: str, **kw: Any) -> Path:
    from exporter.export import export_model
    from flamingo.loaders import load_flamingo
    from flamingo.tiny import build_tiny_flamingo

    paths = build_tiny_flamingo(root / "src", family, **kw)
    model, tok, _ = load_flamingo(paths.lm_dir, paths.vision_path, paths.checkpoint_path)
    out = root / "fp32"
    export_model(model, tok, out, progress=None)
    return out


def _bytes(export: Path) -> dict[str, int]:
    manifest = load_manifest(export, verify_hashes=False)
    return {
        name: sum((export / f).stat().st_size for f in (g.file, *g.external_data))
        for name, g in manifest.graphs.items()
    }


def sizes(hidden: int, family: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fp32 = _export(
            root, family, hidden=hidden, heads=8, layers=4, vision_width=hidden,
            vision_heads=8, vision_layers=4, image_size=64, patch=16,
        )  # fmt: skip
        rows = {"fp32": _bytes(fp32)}
        variants = {
            "fp16": QuantizeOptions("fp16", "fp16"),
            "int8": QuantizeOptions("int8", "int8", episodes=4, decode_steps=2),
            "int4-b32": QuantizeOptions("int4", "int4", block_size=32),
            "int4-b64": QuantizeOptions("int4", "int4", block_size=64),
            "int4-b128": QuantizeOptions("int4", "int4", block_size=128),
        }
        for name, options in variants.items():
            quantize_export(fp32, root / name, options)
            rows[name] = _bytes(root / name)
        total32 = sum(rows["fp32"].values())
        return {
            "family": family,
            "hidden": hidden,
            "bytes": rows,
            "ratio_total": {k: sum(v.values()) / total32 for k, v in rows.items()},
            "ratio_decoder": {k: v["decoder"] / rows["fp32"]["decoder"] for k, v in rows.items()},
        }


def _scale_embeddings(export: Path, factor: float) -> None:
    """Multiply the LM's input embedding table (Gather data) by `factor`, re-hash."""
    path = export / "decoder.onnx"
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits)
    table = inits[gather.input[0]]
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table) * factor, table.name))
    onnx.save(model, str(path))
    manifest = load_manifest(export, verify_hashes=False)
    manifest.record_files(export)
    manifest.write(export)


def fp16_keep(
    outlier: float, families: list[str], executor: str, n_episodes: int, decode_steps: int
) -> list[dict[str, Any]]:
    from tokenizers import Tokenizer

    rows = []
    for family in families:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            fp32 = _export(root, family)
            if outlier != 1.0:
                _scale_embeddings(fp32, outlier)
            episodes = calibration_set("random", episodes=n_episodes, seed=1234).episodes
            tok = Tokenizer.from_file(str(fp32 / "tokenizer" / "tokenizer.json"))
            reference = OnnxBackend(fp32, executor=executor)
            for keep in ((), ("norm",), ("norm", "softmax", "logits")):
                out = root / ("fp16-" + "-".join(keep or ("none",)))
                quantize_export(fp32, out, QuantizeOptions("fp16", "fp16", fp16_keep=keep))
                candidate = OnnxBackend(out, executor=executor)
                m = run_parity(reference, candidate, episodes, tok, decode_steps=decode_steps)[
                    "metrics"
                ]
                rows.append(
                    {
                        "family": family,
                        "outlier": outlier,
                        "executor": executor,
                        "keep": list(keep),
                        "decoder_cosine": m["decoder"]["cosine"],
                        "top1": m["decoder"]["top1"],
                        "greedy": m["pipeline"]["greedy_exact_match"],
                        "nan": bool(np.isnan(m["decoder"]["cosine"])),
                    }
                )
                shutil.rmtree(out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["sizes", "fp16-keep"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--family", default="llama")
    parser.add_argument("--outlier", type=float, default=400.0)
    parser.add_argument("--families", default="llama,gpt_neox,mpt")
    parser.add_argument(
        "--executor",
        default="reference",
        help="fp16-keep: reference (numpy, ops in declared dtypes: shows fp16 overflow), "
        "onnxruntime or onnxruntime-unoptimized (CPU runs fp16 ops it lacks kernels for in fp32)",
    )
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.what == "sizes":
        result: Any = sizes(args.hidden, args.family)
    else:
        result = fp16_keep(
            args.outlier, args.families.split(","), args.executor, args.episodes, args.decode_steps
        )
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.what == "sizes":
        for name, row in result["bytes"].items():
            print(
                f"{name:<10} vision {row['vision'] / 2**20:8.2f} MiB  decoder "
                f"{row['decoder'] / 2**20:8.2f} MiB  total {result['ratio_total'][name]:.3f}  "
                f"decoder {result['ratio_decoder'][name]:.3f} of fp32"
            )
    else:
        for r in result:
            print(
                f"{r['family']:<9} x{r['outlier']:<6g} keep {'+'.join(r['keep']) or 'none':<20} "
                f"cosine {r['decoder_cosine']:.6f} top1 {r['top1']:.4f} greedy {r['greedy']:.3f}"
            )


if __name__ == "__main__":
    main()
