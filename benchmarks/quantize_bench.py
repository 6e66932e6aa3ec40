"""Quantization benchmark: task accuracy on the demo model, speed and sizes on bigger models,
and the fp16 keep-list.

Measurements the tests cannot make (or make only in part) on the tiny models:

* ``demo``: the shipped demo model (models/demo) exported fp32 and quantized to fp16, int8
  (W8A8, calibrated on the demo task's training split), int8 weight-only and int4 (block 128,
  and 32); every variant's parity against the PyTorch model on the held-out 4-shot episodes of
  the README's accuracy table: task accuracy, top-1, cosine, greedy match, size. The README's
  demo parity table. ``demo-video``: the same for the demo video model (models/demo-video) on
  held-out 4-shot clip episodes (``--data demo-video-eval``; W8A8 calibrated on training clips).
* ``speed``: the 144M model of benchmarks/runtime_bench.py exported fp32 and quantized; each
  variant benched (`flamingo-export bench`'s run_bench) with the fp32 export as baseline in the
  same run: decode ms/token, prefill, vision, end to end, and their ratios to fp32.
* ``sizes``: a random OpenFlamingo-style model with hidden 512 (the tiny models are dominated
  by small tensors: norms, biases, latents, which are never quantized), exported fp32 and
  quantized to fp16 / int8 / int4 (block 32, 64, 128): bytes per graph and ratio to fp32.
* ``fp16-keep``: which parts of an fp16 graph must stay fp32. Random tiny models have unit-scale
  activations, so every keep-list gives the same tokens there; real LLMs carry hidden-state
  outliers of hundreds to thousands. This multiplies the LM's input embeddings by ``--outlier``
  (norms make the fp32 model use them like any hidden state), then measures fp16 parity for
  each keep-list against that fp32 export.

    python benchmarks/quantize_bench.py demo [--episodes 200] [--json]
    python benchmarks/quantize_bench.py demo-video [--episodes 200] [--json]
    python benchmarks/quantize_bench.py speed [--threads 1] [--json]
    python benchmarks/quantize_bench.py sizes [--hidden 512] [--json]
    python benchmarks/quantize_bench.py fp16-keep [--outlier 400] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from precision.data import calibration_set  # noqa: E402
from precision.parity import OnnxBackend, run_parity  # noqa: E402
from precision.quantize import QuantizeOptions, quantize_export  # noqa: E402
from runtime.manifest import load_manifest  # noqa: E402


def _export(root: Path, family: str, **kw: Any) -> Path:
    from exporter.export import export_model
    from fixtures.tiny import build_tiny_flamingo
    from flamingo.loaders import load_flamingo

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


DEMO_VARIANTS = {
    "fp16": QuantizeOptions("fp16", "fp16"),
    "int8 (W8A8)": QuantizeOptions("int8", "int8", calibration="demo"),
    "int8 weight-only": QuantizeOptions("int8", "int8", int8_mode="weight-only"),
    "int4 (block 128)": QuantizeOptions("int4", "int4", block_size=128),
    "int4 (block 32)": QuantizeOptions("int4", "int4", block_size=32),
}


def demo(episodes: int, shots: int, decode_steps: int, video: bool = False) -> list[dict[str, Any]]:
    """Parity of every precision of the demo model against its PyTorch model (task accuracy);
    `video`: the demo video model (models/demo-video's checkpoint on models/demo's LM and
    vision) on held-out clip episodes, int8 W8A8 calibrated on training clips."""
    from tokenizers import Tokenizer

    from exporter.export import export_model
    from flamingo.loaders import load_flamingo
    from precision.parity import TorchBackend

    model_dir = ROOT / "models" / "demo"
    model, tok, _ = load_flamingo(
        model_dir / "lm",
        model_dir / "open_clip_model.safetensors",
        ROOT / "models" / ("demo-video" if video else "demo") / "checkpoint.safetensors",
    )
    reference = TorchBackend(model, "pytorch:models/demo" + ("-video" if video else ""))
    source = "demo-video-eval" if video else "demo-eval"
    data = calibration_set(source, episodes=episodes, max_shots=shots, seed=1234).episodes
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32"
        export_model(model, tok, fp32, progress=None)
        tokenizer = Tokenizer.from_file(str(fp32 / "tokenizer" / "tokenizer.json"))
        fp32_bytes = sum(_bytes(fp32).values())
        variants: dict[str, Path] = {"fp32": fp32}
        for name, options in DEMO_VARIANTS.items():
            variants[name] = Path(tmp) / f"v{len(variants)}"
            if video and options.calibration == "demo":
                options = replace(options, calibration="demo-video")
            quantize_export(fp32, variants[name], options)
        for name, path in variants.items():
            print(f"[quantize_bench] demo parity: {name}", file=sys.stderr, flush=True)
            r = run_parity(reference, OnnxBackend(path), data, tokenizer, decode_steps=decode_steps)
            m, task = r["metrics"], r["metrics"]["task"]
            rows.append(
                {
                    "variant": name,
                    "precisions": r["precisions"],
                    "task_accuracy": task["candidate"],
                    "reference_accuracy": task["reference"],
                    "delta_points": round(100 * task["delta"], 2),
                    "lost": task["lost"],
                    "gained": task["gained"],
                    "top1": m["decoder"]["top1"],
                    "pipeline_top1": m["pipeline"]["top1"],
                    "decoder_cosine": m["decoder"]["cosine"],
                    "pipeline_cosine": m["pipeline"]["cosine"],
                    "greedy_exact": m["pipeline"]["greedy_exact_match"],
                    "size_ratio": sum(_bytes(path).values()) / fp32_bytes,
                    "episodes": task["episodes"],
                    "failures": r["failures"],
                }
            )
    return rows


SPEED_VARIANTS = {
    "fp16": QuantizeOptions("fp16", "fp16"),
    "int8 (W8A8)": QuantizeOptions("int8", "int8", episodes=4, decode_steps=2),
    "int8 weight-only": QuantizeOptions("int8", "int8", int8_mode="weight-only"),
    "int4 (block 128)": QuantizeOptions("int4", "int4"),
}


def speed(threads: int, repeats: int, shots: tuple[int, ...]) -> dict[str, Any]:
    """Each quantized variant of the runtime bench's 144M model benched against its fp32."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from runtime_bench import FULL

    from bench.harness import BenchOptions, run_bench
    from exporter.export import export_model
    from fixtures.tiny import build_tiny_flamingo
    from flamingo.loaders import load_flamingo

    def say(message: str) -> None:
        print(f"[quantize_bench] {message}", file=sys.stderr, flush=True)

    options = BenchOptions(shots=shots, new_tokens=16, repeats=repeats, threads=threads)
    out: dict[str, Any] = {"threads": threads, "shots": list(shots), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        say("building and exporting the 144M model (fp32)")
        paths = build_tiny_flamingo(
            root / "src", "llama", cross_attn_every_n_layers=2,
            lm_overrides={"max_position_embeddings": 2048}, **FULL,
        )  # fmt: skip
        model, tok, _ = load_flamingo(paths.lm_dir, paths.vision_path, paths.checkpoint_path)
        fp32 = root / "fp32"
        export_model(model, tok, fp32, progress=None)
        del model
        for name, q in SPEED_VARIANTS.items():
            say(f"quantizing: {name}")
            path = root / name.replace(" ", "_").replace("(", "").replace(")", "")
            quantize_export(fp32, path, q)
            say(f"benching {name} against fp32")
            report = run_bench(path, options, baseline_exports=[fp32], progress=say)
            rows = {}
            for r in report["results"]:
                case = r["cases"]["runtime_uncached"]
                base = r["cases"][f"export:{fp32.name}"]
                ratio = r["ratios"][f"export:{fp32.name}"]["uncached"]
                rows[str(r["shots"])] = {
                    k: {"variant": case[k], "fp32": base[k], "ratio": ratio[k]}
                    for k in ("vision_ms_per_image", "prefill_ms", "decode_ms_per_token",
                              "total_ms")
                }  # fmt: skip
            out["variants"][name] = {
                "bytes_ratio": sum(_bytes(path).values()) / sum(_bytes(fp32).values()),
                "results": rows,
                "load_avg": [
                    report["machine"]["load_avg_start"],
                    report["machine"]["load_avg_end"],
                ],
            }
            shutil.rmtree(path)
    return out


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
    parser.add_argument("what", choices=["demo", "demo-video", "speed", "sizes", "fp16-keep"])
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
    parser.add_argument("--episodes", type=int, default=None, help="demo 200, fp16-keep 4")
    parser.add_argument("--shots", type=int, default=4, help="demo: shots per episode")
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="speed")
    parser.add_argument("--repeats", type=int, default=3, help="speed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.what in ("demo", "demo-video"):
        video = args.what == "demo-video"
        result: Any = demo(args.episodes or 200, args.shots, args.decode_steps, video)
    elif args.what == "speed":
        result = speed(args.threads, args.repeats, (0, 4))
    elif args.what == "sizes":
        result = sizes(args.hidden, args.family)
    else:
        result = fp16_keep(
            args.outlier,
            args.families.split(","),
            args.executor,
            args.episodes or 4,
            args.decode_steps,
        )
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.what in ("demo", "demo-video"):
        print(
            "| variant | task accuracy | vs PyTorch (points) | lost / gained | top-1 "
            "| decoder cosine | greedy exact | size / fp32 |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in result:
            print(
                f"| {r['variant']} | {r['task_accuracy']:.1%} | {r['delta_points']:+.1f} "
                f"| {r['lost']} / {r['gained']} | {r['top1']:.4f} | {r['decoder_cosine']:.6f} "
                f"| {r['greedy_exact']:.3f} | {r['size_ratio']:.3f} |"
            )
    elif args.what == "speed":
        print(
            "| variant | shots | decode ms/tok (fp32) | prefill ms (fp32) | vision ms/img (fp32)"
            " | total ms (fp32) | size / fp32 |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, v in result["variants"].items():
            for k, row in v["results"].items():
                cells = " | ".join(
                    f"{row[m]['variant']:.1f} ({row[m]['fp32']:.1f}, x{row[m]['ratio']:.2f})"
                    for m in ("decode_ms_per_token", "prefill_ms", "vision_ms_per_image",
                              "total_ms")
                )  # fmt: skip
                print(f"| {name} | {k} | {cells} | {v['bytes_ratio']:.3f} |")
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
