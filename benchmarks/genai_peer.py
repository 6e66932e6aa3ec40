"""Our decode against onnxruntime-genai's on the same decoder graph (issue 18, deliver 3).

Why: onnxruntime-genai's C++ generation loop and KV cache are the obvious peer for a decoder
run on onnxruntime; if it decodes our graph faster, our per-step overhead is the difference.
It can drive the decoder in the in-graph indices form (runtime.spec.DecoderForm): this script
takes an export (default: the demo model, exported on the fly), derives that form into a
temporary folder where the decoder is portable, writes a genai_config.json beside it, and
decodes one few-shot prompt greedily with onnxruntime-genai and with our runtime, alternating
the two in one run (ABBA order) at the same thread count. Both get the same cross-attention
K/V (our vision graph, random pixels; onnxruntime-genai as extra model inputs). It asserts
identical greedy tokens and reports the median decode tokens/s of each and their ratio (ours
over genai's), and the median and range of the per-repeat ratios (each repeat's pair ran back
to back).

EOS: ours runs without one (every step decodes); onnxruntime-genai needs an eos id, so it
gets one that our run never produced: identical tokens are unaffected, and a genai token that
differs from ours fails the comparison as it should. Batch 1, greedy.

    python benchmarks/genai_peer.py                       # demo model, report
    python benchmarks/genai_peer.py EXPORT_DIR --json     # one JSON object on stdout
    python benchmarks/genai_peer.py --form inplace,in-graph   # genai on its shared KV buffer
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # run as a plain script from anywhere
        sys.path.insert(0, str(path))

from bandwidth import busy_warning, cpu_name  # noqa: E402

from runtime.errors import FlamingoExportError  # noqa: E402
from runtime.manifest import Manifest, load_manifest  # noqa: E402
from runtime.spec import DecoderForm, ModelDims  # noqa: E402

DEMO = ROOT / "models" / "demo"


def say(message: str) -> None:
    print(f"[genai_peer] {message}", file=sys.stderr, flush=True)


def genai_config(
    manifest: Manifest, threads: int, share_buffer: bool, eos_token_id: int, max_length: int
) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for an export's decoder in the in-graph indices
    form (input/output names from runtime.spec; model type "llama": the generic decoder)."""
    dims = ModelDims.from_config(manifest.model)
    lm = manifest.model["lm"]
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if dims.uses_position_ids:
        inputs["position_ids"] = "position_ids"
    inputs |= {
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads:
        session["intra_op_num_threads"] = threads
    special = manifest.special_tokens
    return {
        "model": {
            "bos_token_id": special.get("bos_token_id") or 0,
            "eos_token_id": eos_token_id,
            "pad_token_id": special["pad_token_id"],
            "type": "llama",
            "vocab_size": dims.vocab_size,
            "context_length": manifest.limits["max_seq_len"],
            "decoder": {
                "session_options": session,
                "filename": manifest.graphs["decoder"].file,
                "head_size": dims.head_dim,
                "hidden_size": lm["hidden_size"],
                "num_attention_heads": lm["num_heads"],
                "num_hidden_layers": dims.num_layers,
                "num_key_value_heads": dims.num_kv_heads,
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": max_length,
            "min_length": 0,
            "past_present_share_buffer": share_buffer,
            "early_stopping": True,
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }


def export_demo(out: Path) -> Path:
    """The demo model exported fp32 (portable) into `out`."""
    from exporter.export import export_model
    from flamingo.loaders import load_flamingo

    model, tok, _ = load_flamingo(
        DEMO / "lm", DEMO / "open_clip_model.safetensors", DEMO / "checkpoint.safetensors"
    )
    export_model(model, tok, out, progress=None)
    return out


def prompt_ids(manifest: Manifest, shots: int, seed: int) -> np.ndarray:
    """(1, T) ids: `shots` chunks "<image>" + 12 text tokens + "<|endofchunk|>", then the
    query's "<image>" + 4 text tokens (text ids drawn from the non-special vocabulary)."""
    special = manifest.special_tokens
    reserved = {special[k] for k in ("media_token_id", "eoc_token_id", "pad_token_id")}
    vocab = [
        i for i in range(ModelDims.from_config(manifest.model).vocab_size) if i not in reserved
    ]
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    for _ in range(shots):
        ids += [special["media_token_id"], *rng.choice(vocab, 12), special["eoc_token_id"]]
    ids += [special["media_token_id"], *rng.choice(vocab, 4)]
    return np.array([ids], dtype=np.int64)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import onnxruntime_genai as og

    from exporter.decoder_forms import derive_export
    from runtime.engine import OnnxFlamingo
    from runtime.generation import GenerationConfig, generate

    warning = busy_warning()  # before any work of ours adds to the load
    if warning:
        say(f"warning: {warning}")
    src = args.export_dir or export_demo(work / "portable")
    form = DecoderForm.parse(args.form)
    if form.indices != "in-graph":
        raise SystemExit("--form must include in-graph: onnxruntime-genai feeds no media index")
    # genai_config.json goes beside the decoder: always in a folder of our own
    if load_manifest(src).graphs["decoder"].form == form:
        shutil.copytree(src, work / "form")
    else:
        say(f"deriving the decoder form {form.to_dict()} from {src}")
        derive_export(src, work / "form", form)
    src = work / "form"
    manifest = load_manifest(src)
    engine = OnnxFlamingo(src, threads=args.threads, spin=not args.no_allow_spinning)
    dims = engine.dims
    n_images = args.shots + 1
    rng = np.random.default_rng(args.seed)
    size = dims.image_size
    pixels = rng.standard_normal((n_images, 3, size, size)).astype(np.float32)
    cross = engine.rows_cross_kv(engine.encode_images(pixels), [list(range(n_images))])
    ids = prompt_ids(manifest, args.shots, args.seed)
    new = args.max_new_tokens
    config = GenerationConfig(max_new_tokens=new, eos_token_ids=())

    def ours() -> tuple[list[int], float, float]:
        start = time.perf_counter()
        model = engine.step_model(cross, np.array([n_images]))
        out = generate(model, ids, np.ones_like(ids), config)
        end = time.perf_counter()
        return list(out.sequences[0]), model.prefill_end - start, end - start

    first = ours()[0]
    unused = (manifest.special_tokens["pad_token_id"], *range(dims.vocab_size))
    eos = next(i for i in unused if i not in first)
    cfg = genai_config(
        manifest, args.threads or 0, form.kv_cache == "inplace", eos, ids.shape[1] + new
    )
    (src / "genai_config.json").write_text(json.dumps(cfg, indent=1))
    og_model = og.Model(str(src))
    named = {k: np.ascontiguousarray(v) for k, v in cross.items()}

    def genai() -> tuple[list[int], float, float]:
        start = time.perf_counter()
        params = og.GeneratorParams(og_model)
        params.set_search_options(max_length=ids.shape[1] + new, do_sample=False)
        generator = og.Generator(og_model, params)
        for name, value in named.items():
            generator.set_model_input(name, value)
        generator.append_tokens(ids)
        prefill = time.perf_counter() - start
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, prefill, time.perf_counter() - start

    runs: dict[str, list[tuple[list[int], float, float]]] = {"ours": [], "genai": []}
    genai()  # warm-up (ours warmed above)
    # alternate, so both see the same machine load, in ABBA order: the engine that runs right
    # after the other starts beside its still-spinning workers, and each should do so half
    # the time
    peers = {"ours": ours, "genai": genai}
    for rep in range(args.repeats):
        for name in ("ours", "genai") if rep % 2 == 0 else ("genai", "ours"):
            runs[name].append(peers[name]())
    identical = all(r[0] == first for peer in runs.values() for r in peer)

    def summary(peer: str) -> dict[str, Any]:
        decode = [(total - prefill) for _, prefill, total in runs[peer]]
        return {
            "tokens": runs[peer][0][0],
            "prefill_ms": 1e3 * statistics.median(p for _, p, _ in runs[peer]),
            "total_ms": 1e3 * statistics.median(t for _, _, t in runs[peer]),
            "decode_tokens_per_s": (new - 1) / statistics.median(decode),
            "decode_ms_per_token": 1e3 * statistics.median(decode) / (new - 1),
        }

    report = {"ours": summary("ours"), "genai": summary("genai")}
    ratio = report["ours"]["decode_tokens_per_s"] / report["genai"]["decode_tokens_per_s"]
    # each repeat's pair ran back to back: its ratio is the least disturbed by load drifts
    paired = [(g[2] - g[1]) / (o[2] - o[1]) for o, g in zip(runs["ours"], runs["genai"])]
    return {
        "tokens_identical": identical,
        "speed_ratio": ratio,
        "speed_ratio_paired": {
            "median": statistics.median(paired),
            "min": min(paired),
            "max": max(paired),
        },
        "end_to_end_ratio": report["genai"]["total_ms"] / report["ours"]["total_ms"],
        **report,
        "export": str(args.export_dir or "models/demo (exported fp32)"),
        "form": form.to_dict(),
        "precision": manifest.graphs["decoder"].precision,
        "shots": args.shots,
        "prompt_tokens": int(ids.shape[1]),
        "max_new_tokens": new,
        "repeats": args.repeats,
        "threads": args.threads or os.cpu_count(),
        "our_decoder_spins": not args.no_allow_spinning,
        "cpu": cpu_name(),
        "loadavg": os.getloadavg(),
        "busy_warning": warning,
        "onnxruntime_genai": og.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", nargs="?", type=Path, help="default: the demo model")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--form",
        default="in-graph",
        help="decoder form: a comma list that includes in-graph (default; e.g. inplace,in-graph)",
    )
    parser.add_argument("--shots", type=int, default=4, help="demonstrations (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    parser.add_argument(
        "--repeats", type=int, default=6, help="default 6 (even: ABBA gives each side first)"
    )
    parser.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-allow-spinning",
        action="store_true",
        help="our sessions do not spin (onnxruntime session.intra_op.allow_spinning = 0)",
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens < 2 or args.repeats < 1 or args.shots < 0:
        parser.error("--max-new-tokens >= 2, --repeats >= 1, --shots >= 0")
    if args.threads is not None and args.threads < 0:
        parser.error("--threads >= 0 (0: all CPUs)")
    if args.export_dir is not None and not (args.export_dir / "manifest.json").is_file():
        parser.error(f"{args.export_dir}: not an export folder (no manifest.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="genai_peer_") as tmp:
            report = run(args, Path(tmp))
    except FlamingoExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        paired = report["speed_ratio_paired"]
        for peer in ("ours", "genai"):
            r = report[peer]
            print(
                f"{peer:>6}: decode {r['decode_tokens_per_s']:8.1f} tokens/s "
                f"({r['decode_ms_per_token']:.2f} ms/token), prefill {r['prefill_ms']:.1f} ms, "
                f"total {r['total_ms']:.1f} ms"
            )
        print(
            f"tokens identical: {report['tokens_identical']}; speed ratio (decode tokens/s, "
            f"ours / genai, medians of {report['repeats']}): {report['speed_ratio']:.3f}; "
            f"per repeat {paired['median']:.3f} ({paired['min']:.3f}-{paired['max']:.3f}); "
            f"end to end {report['end_to_end_ratio']:.3f}; {report['cpu']}, "
            f"{report['threads']} threads"
        )
    return 0 if report["tokens_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
