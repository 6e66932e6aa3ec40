"""Export an OpenFlamingo-3B-shaped model (random weights) and measure time and peak memory.

A benchmark, not a CI test: the full shape holds ~2.6 G fp32 parameters (~10 GB), so it shows
whether `export_model` fits a 24 GiB machine and what dominates its peak RSS. The model is built
on the meta device and materialised in place (`to_empty` + seeded init), so the script itself
never holds a second copy of the weights; what is measured is the exporter.

Shape (OpenFlamingo-3B-vitl-mpt1b): ViT-L/14 at 224 px, resampler depth 6 at width 1024,
24-layer MPT-1B (MosaicGPT: d_model 2048, 16 heads, ALiBi, qk_ln, tied embeddings, vocab 50280
after Flamingo's tokens) with a gated cross-attention block before every decoder layer.

    python benchmarks/export_3b.py --json                       # full shape
    python benchmarks/export_3b.py --layers 4 --vision-layers 4 --json   # quick trial
    python benchmarks/export_3b.py --smoke --json               # + onnxruntime 1-token prefill
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

VOCAB = 50280  # MPT-1B's GPT-NeoX tokenizer (50277) + <|endofchunk|>, <image>, <PAD>
STUB_WORDS = ("<|endoftext|>", "<|endofchunk|>", "<image>", "<PAD>", "<unk>", "a", "photo")


def peak_rss_bytes() -> int:
    """ru_maxrss of this process (KiB on Linux) in bytes: the headline number."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StagePeaks:
    """Wall time and peak RSS per stage.

    By default the peak recorded for a stage is ru_maxrss at its end (the running maximum, so
    it only says which stage first reached the peak). With reset=True the high-water mark is
    reset at each stage start (Linux /proc/self/clear_refs "5") so each stage shows its own
    peak; that also resets ru_maxrss, so the overall peak is then the maximum over stages.
    """

    def __init__(self, reset: bool = False) -> None:
        self.stages: list[dict[str, Any]] = []
        self.reset = reset
        self._name: str | None = None
        self._start = 0.0
        self._max = 0

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def start(self, name: str) -> None:
        self.stop()
        self._name, self._start = name, time.perf_counter()
        if self.reset:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.reset = False

    def stop(self) -> None:
        if self._name is None:
            return
        peak = peak_rss_bytes()
        self._max = max(self._max, peak)
        self.stages.append(
            {
                "stage": self._name,
                "wall_s": round(time.perf_counter() - self._start, 2),
                "peak_rss_bytes": peak,
                "rss_after_bytes": self._status("VmRSS"),
            }
        )
        self._name = None

    @property
    def overall_peak(self) -> int:
        """Peak RSS of the whole run (ru_maxrss, or the maximum over reset stages)."""
        return max(self._max, peak_rss_bytes())


def build_config(layers: int, vision_layers: int) -> Any:
    """FlamingoConfig of OpenFlamingo-3B-vitl-mpt1b (layer counts scalable for a trial)."""
    from flamingo.config import CrossAttentionConfig, FlamingoConfig, LMConfig, VisionConfig

    vision = VisionConfig(
        image_size=224, patch_size=14, width=1024, layers=vision_layers, heads=16, embed_dim=768
    )
    lm = LMConfig(
        family="mpt",
        vocab_size=VOCAB,
        hidden_size=2048,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
        intermediate_size=4 * 2048,
        norm_eps=1e-5,
        act="gelu",
        tie_word_embeddings=True,
        qk_ln=True,
        max_position_embeddings=2048,
    )
    return FlamingoConfig(
        vision=vision,
        lm=lm,
        cross_attn=CrossAttentionConfig(every_n_layers=1),
        media_token_id=STUB_WORDS.index("<image>"),
        eoc_token_id=STUB_WORDS.index("<|endofchunk|>"),
        pad_token_id=STUB_WORDS.index("<PAD>"),
    )


def build_model(cfg: Any, seed: int = 0, std: float = 0.02) -> Any:
    """Random fp32 Flamingo with exactly one copy of its weights ever allocated.

    Built on the meta device (no storage), then `to_empty` allocates each tensor once and the
    init writes in place. std 0.02 keeps activations finite through 24 + 24 blocks.
    """
    import torch

    from flamingo.model import Flamingo

    with torch.device("meta"):
        model = Flamingo(cfg)
    model = model.to_empty(device="cpu")
    lm = model.lang_model
    if cfg.lm.tie_word_embeddings:  # to_empty gives each alias its own storage: tie again
        lm.lm_head.weight = lm.embed_tokens.weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or name.endswith(("latents", "class_embedding")):
                p.normal_(0.0, std, generator=gen)
            elif name.endswith("gate"):
                p.fill_(0.5)  # non-zero so cross-attention contributes
            elif name.endswith("bias"):
                p.zero_()
            else:  # LayerNorm weights
                p.fill_(1.0)
    lm._init_buffers()  # ALiBi slopes (non-persistent buffers are garbage after to_empty)
    return model.eval().requires_grad_(False)


def stub_tokenizer() -> Any:
    """Word-level fast tokenizer with Flamingo's special tokens: enough for export to save."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(STUB_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<PAD>",
        additional_special_tokens=["<|endofchunk|>", "<image>"],
    )


def weight_bytes(model: Any) -> dict[str, int]:
    """fp32 bytes of the unique parameters each graph needs (tied weights counted once).

    vision graph = vision tower + resampler + every cross-attention layer's to_kv (K/V over the
    latents are computed there); decoder graph = the rest of the LM.
    """
    seen: set[int] = set()
    out = {"vision": 0, "decoder": 0}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        vision = not name.startswith("lang_model.") or ".attn.to_kv." in name
        out["vision" if vision else "decoder"] += p.numel() * p.element_size()
    out["total"] = out["vision"] + out["decoder"]
    return out


def graph_initializers(path: Path) -> dict[str, Any]:
    """Initializer bytes of a graph, and whether a vocab x width matrix is stored twice."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total, vocab_mats = 0, []
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        size = n * {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}.get(t.data_type, 8)
        total += size
        if VOCAB in t.dims and len(t.dims) == 2:
            vocab_mats.append({"name": t.name, "dims": list(t.dims)})
    return {
        "initializers": len(model.graph.initializer),
        "initializer_bytes": total,
        "vocab_matrices": vocab_mats,
        "op_counts_head": _head_ops(model),
    }


def _head_ops(model: Any) -> list[str]:
    """Op types of the nodes producing `logits` (how the tied LM head was written)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    chain, name = [], "logits"
    while name in producers and len(chain) < 4:
        node = producers[name]
        chain.append(node.op_type)
        name = node.input[0]
    return chain


def smoke_check(out: Path) -> dict[str, Any]:
    """Load decoder.onnx in onnxruntime and run a 1-token prefill at batch 1 (run it in a
    process of its own: its peak RSS is the session's). Also benchmarks/export_9b.py's."""
    import numpy as np

    from runtime.engine import make_session
    from runtime.manifest import load_manifest
    from runtime.spec import ModelDims

    start = time.perf_counter()
    manifest = load_manifest(out, verify_hashes=False)
    dims = ModelDims.from_config(manifest.model)
    spec = manifest.graphs["decoder"].spec  # I/O dtypes as exported (fp16 graphs: fp16 I/O)
    session = make_session(out / manifest.graphs["decoder"].file, ["CPUExecutionProvider"], None)
    load_s = time.perf_counter() - start
    sizes = {"batch": 1, "sequence": 1, "past_sequence": 0, "total_sequence": 1}
    sizes["media_keys"] = dims.num_latents
    sizes["logits_positions"] = 1
    rng = np.random.default_rng(0)
    feed = {}
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "logits_index":
            feed[t.name] = np.zeros(shape, dtype=np.int64)  # the one token's position
        elif t.dtype == "int64":
            feed[t.name] = np.ones(shape, dtype=np.int64)
        else:
            feed[t.name] = rng.standard_normal(shape).astype(t.dtype)
    start = time.perf_counter()
    logits = session.run(["logits"], feed)[0]
    return {
        "ok": bool(np.isfinite(logits).all()) and logits.shape == (1, 1, dims.vocab_size),
        "logits_shape": list(logits.shape),
        "session_load_s": round(load_s, 2),
        "prefill_s": round(time.perf_counter() - start, 3),
        # VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts at its parent's peak
        "peak_rss_bytes": StagePeaks._status("VmHWM"),
    }


def run_export(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    from exporter.export import ExportOptions, export_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    peaks = StagePeaks(reset=args.stage_peaks)
    wall0 = time.perf_counter()
    peaks.start("build model")
    cfg = build_config(args.layers, args.vision_layers)
    model = build_model(cfg, seed=args.seed)
    tokenizer = stub_tokenizer()
    weights = weight_bytes(model)

    def progress(message: str) -> None:
        if not args.json:
            print(f"[export_3b] {message}", file=sys.stderr, flush=True)
        for key, stage in (
            ("exporting vision", "export vision graph"),
            ("exporting decoder", "export decoder graph"),
            ("saving tokenizer", "tokenizer + manifest (sha256)"),
        ):
            if message.startswith(key):
                peaks.start(stage)

    export_model(model, tokenizer, out, ExportOptions(), progress=progress)
    peaks.stop()
    total_s = time.perf_counter() - wall0
    peak = peaks.overall_peak
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    listed = set(json.loads((out / "manifest.json").read_text())["files"]) | {"manifest.json"}
    result = {
        "shape": {
            "lm_layers": args.layers,
            "vision_layers": args.vision_layers,
            "xattn_layers": len(model.lang_model.cross_attn_layer_indices),
            "params": sum(p.numel() for p in model.parameters()),
        },
        "fp32_weight_bytes": weights,
        "peak_rss_bytes": peak,
        "peak_rss_source": "max of per-stage VmHWM" if peaks.reset else "ru_maxrss",
        "peak_over_weights": round(peak / weights["total"], 3),
        "wall_s": round(total_s, 1),
        "stages": peaks.stages,
        "files": files,
        "files_not_in_manifest": sorted(set(files) - listed),
        "graphs": {g: graph_initializers(out / f"{g}.onnx") for g in ("vision", "decoder")},
        "versions": {"torch": torch.__version__},
    }
    del model, tokenizer
    gc.collect()
    result["rss_after_export_bytes"] = StagePeaks._status("VmRSS")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="export folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the default temp export")
    parser.add_argument("--layers", type=int, default=24, help="LM layers (24 = full shape)")
    parser.add_argument("--vision-layers", type=int, default=24, help="ViT layers (24 = full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="onnxruntime 1-token prefill after")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--stage-peaks", action="store_true", help="reset the RSS high-water mark per stage"
    )
    parser.add_argument("--smoke-only", type=Path, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)

    if args.smoke_only:
        print(json.dumps(smoke_check(args.smoke_only)))
        return 0

    tmp_root = None
    if args.out is None:
        tmp_root = Path(tempfile.mkdtemp(prefix="flamingo-export-3b-"))
        out = tmp_root / "out"
    else:
        out = args.out
    try:
        result = run_export(args, out)
        result["out"] = str(out)
        if args.smoke:  # a fresh process: its RSS is onnxruntime's alone, not ours on top
            cmd = [sys.executable, str(Path(__file__).resolve()), "--smoke-only", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                result["smoke"] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                result["smoke"] = {"ok": False, "error": proc.stderr.strip()[-2000:]}
    finally:
        if tmp_root is not None and not args.keep:
            shutil.rmtree(tmp_root, ignore_errors=True)

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        gib = 2**30
        w = result["fp32_weight_bytes"]
        print(
            f"weights fp32: {w['total'] / gib:.2f} GiB (vision {w['vision'] / gib:.2f}, "
            f"decoder {w['decoder'] / gib:.2f})"
        )
        print(
            f"peak RSS: {result['peak_rss_bytes'] / gib:.2f} GiB "
            f"({result['peak_over_weights']:.2f}x weights), wall {result['wall_s']} s"
        )
        for s in result["stages"]:
            print(
                f"  {s['stage']:<32} {s['wall_s']:>8.1f} s  peak {s['peak_rss_bytes'] / gib:.2f}"
                " GiB"
            )
        if "smoke" in result:
            print(f"smoke: {result['smoke']}")
    smoke_ok = result.get("smoke", {"ok": True})["ok"]
    return 0 if smoke_ok else 1


if __name__ == "__main__":
    sys.exit(main())
