"""Export an OpenFlamingo-9B-shaped model to int4 on a small machine: peak memory and time.

The script writes a model with random weights in the files users download, then runs
`flamingo-export export --precision P` on them in a child process under `/usr/bin/time -v`
(peak RSS = its "Maximum resident set size"), loads the exported decoder in onnxruntime for a
1-token prefill (own process), and sets the export's file sizes beside what `flamingo-export
plan` estimates for the weights.

Shapes (random weights; the LM as bf16 safetensors shards with an index, the vision tower as an
open_clip `visual.*` state dict `.bin`, the OpenFlamingo `checkpoint.pt` holding the resampler,
the gated cross-attention layers and the resized input embeddings, fp32):
* `9b`: OpenFlamingo-9B-vitl-mpt7b: ViT-L/14 at 224 px, MPT-7B (32 layers x 4096, 32 heads,
  ALiBi, tied embeddings of 50432 rows), cross-attention before every 4th layer; tokenizer of
  50,280 tokens + <|endofchunk|>, <image>. 8.1 G parameters.
* `3b`: OpenFlamingo-3B-vitl-mpt1b: ViT-L/14, MosaicGPT MPT-1B (24 x 2048, QK LayerNorm),
  cross-attention before every layer. 2.6 G parameters.
* `0.6b`: the issue's LLaMA example: LLaMA 2048 x 8 layers, 32k vocabulary (untied head), with
  ViT-B/16 and cross-attention every 4th layer. 0.7 G parameters.

    python benchmarks/export_9b.py --shape 9b --precision int4 --json
    python benchmarks/export_9b.py --shape 3b --precision fp16 --json
    python benchmarks/export_9b.py --shape 0.6b --precision int4 --layers 4   # quick trial

The written model is kept in --workdir (reused by later runs of the same shape); the export is
removed unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

SHARD_BYTES = 2 << 30  # LM safetensors shards (HF's save_pretrained writes 5 GB ones)
FORMAT_VERSION = 1  # bump when the written model changes, so --workdir copies are rewritten


def shape_config(shape: str, layers: int | None) -> tuple[Any, dict[str, Any], int]:
    """(FlamingoConfig, the LM's HF config.json, base tokenizer size) of a benchmark shape."""
    from flamingo.config import CrossAttentionConfig, FlamingoConfig, LMConfig, VisionConfig
    from flamingo.mosaic_gpt import MPT_1B_REDPAJAMA_200B_CONFIG
    from trt.plan import preset_config

    if shape == "9b":
        cfg = preset_config("OpenFlamingo-9B-vitl-mpt7b")
        lm = cfg.lm
        hf = {
            "model_type": "mpt", "architectures": ["MPTForCausalLM"], "d_model": lm.hidden_size,
            "n_heads": lm.num_heads, "n_layers": layers or lm.num_layers, "expansion_ratio": 4,
            "max_seq_len": 2048, "vocab_size": lm.vocab_size, "no_bias": True,
            "norm_type": "low_precision_layernorm", "layer_norm_epsilon": 1e-5,
            "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_type": "multihead_attention",
                            "clip_qkv": None, "qk_ln": False, "softmax_scale": None},
            "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        }  # fmt: skip
        base_vocab = 50280
    elif shape == "3b":
        cfg = preset_config("OpenFlamingo-3B-vitl-mpt1b")
        hf = {**MPT_1B_REDPAJAMA_200B_CONFIG, "torch_dtype": "bfloat16"}
        hf["n_layers"] = layers or hf["n_layers"]
        base_vocab = 50280
    elif shape == "0.6b":
        lm = LMConfig(
            family="llama", vocab_size=32000, hidden_size=2048, num_layers=8, num_heads=16,
            num_kv_heads=16, head_dim=128, intermediate_size=5632, norm_eps=1e-5, act="silu",
            tie_word_embeddings=False,
        )  # fmt: skip
        vision = VisionConfig(patch_size=16, width=768, layers=12, heads=12, embed_dim=512)
        cfg = FlamingoConfig(vision, lm, cross_attn=CrossAttentionConfig(every_n_layers=4))
        hf = {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
            "num_hidden_layers": layers or lm.num_layers, "num_attention_heads": lm.num_heads,
            "num_key_value_heads": lm.num_kv_heads, "vocab_size": lm.vocab_size,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 2048,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        }  # fmt: skip
        base_vocab = 32000
    else:
        raise SystemExit(f"unknown shape {shape!r}")
    if layers:
        cfg.lm.num_layers = layers
        cfg.vision.layers = min(cfg.vision.layers, layers)
    return cfg, hf, base_vocab


def _random(shape: tuple[int, ...], name: str, gen: Any, dtype: Any) -> Any:
    """std 0.02 matrices; norm weights 1 + 0.02 N (distinct: no two tensors are equal);
    vectors 0.02 N; resampler latents N(0, 1); tanh gates around 0.5."""
    import torch

    out = torch.empty(shape, dtype=dtype)
    if name.endswith(("attn_gate", "ff_gate")):
        return out.uniform_(0.3, 0.7, generator=gen)
    if name.endswith("latents"):
        return out.normal_(0.0, 1.0, generator=gen)
    out.normal_(0.0, 0.02, generator=gen)
    if len(shape) == 1 and re.search(r"(norm|ln|layernorm)[^.]*\.weight$|_ln\.weight$", name):
        out += 1.0
    return out


def _stub_tokenizer(size: int, family: str) -> Any:
    """A word-level fast tokenizer of `size` tokens with the LM family's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family == "llama":
        specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    else:  # GPT-NeoX-20B's: <|endoftext|> everywhere, a padding token
        specials = {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}  # fmt: skip
    words = list(dict.fromkeys(specials.values()))
    words += [f"w{i}" for i in range(size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def write_model(shape: str, layers: int | None, root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the shape's files under root (reused when a complete copy is there)."""
    import torch
    from safetensors.torch import save_file

    from flamingo.config import DECODER_LAYERS_ATTR
    from flamingo.model import Flamingo

    marker = root / "written.json"
    files = {
        "lm_dir": root / "lm",
        "vision_path": root / "open_clip_pytorch_model.bin",
        "checkpoint_path": root / "checkpoint.pt",
    }
    stamp = {"shape": shape, "layers": layers, "seed": seed, "version": FORMAT_VERSION}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return files
    shutil.rmtree(root, ignore_errors=True)
    files["lm_dir"].mkdir(parents=True)
    cfg, hf, base_vocab = shape_config(shape, layers)
    gen = torch.Generator().manual_seed(seed)
    # the LM, as its HF class names its tensors (MosaicGPT: its own table)
    if hf["model_type"] == "mosaic_gpt":
        from flamingo.mosaic_gpt import mosaic_gpt_tensor_shapes

        lm_shapes = dict(mosaic_gpt_tensor_shapes(hf))
        embed_key, layers_attr = "transformer.wte.weight", "transformer.blocks"
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
        lm_shapes = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
        if hf.get("tie_word_embeddings"):
            lm_shapes.pop("lm_head.weight", None)
        embed_key = next(k for k in lm_shapes if k.endswith(("wte.weight", "embed_tokens.weight")))
        layers_attr = DECODER_LAYERS_ATTR[cfg.lm.family]
    (files["lm_dir"] / "config.json").write_text(json.dumps(hf, indent=2))
    _stub_tokenizer(base_vocab, cfg.lm.family).save_pretrained(str(files["lm_dir"]))
    shard: dict[str, Any] = {}
    weight_map: dict[str, str] = {}
    names = list(lm_shapes)
    shard_files: list[str] = []

    def flush() -> None:
        name = f"model-{len(shard_files) + 1:05d}.safetensors"
        save_file(shard, str(files["lm_dir"] / name), metadata={"format": "pt"})
        shard_files.append(name)
        weight_map.update({k: name for k in shard})
        shard.clear()

    size = 0
    for key in names:
        shard[key] = _random(lm_shapes[key], key, gen, torch.bfloat16)
        size += shard[key].numel() * 2
        if size >= SHARD_BYTES:
            flush()
            size = 0
    if shard:
        flush()
    count = len(shard_files)
    for old in shard_files:  # HF's naming: model-00001-of-00004.safetensors
        new = old.replace(".safetensors", f"-of-{count:05d}.safetensors")
        (files["lm_dir"] / old).rename(files["lm_dir"] / new)
        weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    index = {"metadata": {"total_size": sum(2 * _numel(s) for s in lm_shapes.values())},
             "weight_map": weight_map}  # fmt: skip
    (files["lm_dir"] / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    # vision tower and the Flamingo checkpoint, named as our model names them
    cfg.lm.vocab_size = max(cfg.lm.vocab_size, base_vocab + 3)
    with torch.device("meta"):
        meta = Flamingo(cfg)
    params = dict(meta.named_parameters())
    visual = {
        "visual." + k.removeprefix("vision_encoder."): _random(tuple(v.shape), k, gen, torch.float)
        for k, v in params.items()
        if k.startswith("vision_encoder.")
    }
    torch.save(visual, files["vision_path"])
    del visual
    ckpt = {}
    for k, v in params.items():
        if k.startswith("perceiver."):
            ckpt[k] = _random(tuple(v.shape), k, gen, torch.float32)
        elif k.startswith("lang_model.cross_attn_layers."):
            i, rest = k[len("lang_model.cross_attn_layers.") :].split(".", 1)
            name = f"lang_encoder.{layers_attr}.{i}.gated_cross_attn_layer.{rest}"
            ckpt[name] = _random(tuple(v.shape), name, gen, torch.float32)
    rows = (cfg.lm.vocab_size, cfg.lm.hidden_size)  # the resized, trained input embeddings
    ckpt[f"lang_encoder.{embed_key}"] = _random(rows, embed_key, gen, torch.float32)
    torch.save(ckpt, files["checkpoint_path"])
    del ckpt
    marker.write_text(json.dumps(stamp))
    return files


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _rss_of_tree(pid: int) -> int:
    """Resident bytes of a process and its descendants (0 if gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_export(files: dict[str, Path], out: Path, precision: str, extra: list[str]) -> dict:
    """`flamingo-export export` in a child under /usr/bin/time -v: its peak RSS and time, and
    each progress line stamped with the wall time and the resident memory at that moment."""
    cli = [sys.executable, "-c", "from cli.main import main; main()", "export",
           "--lm", str(files["lm_dir"]), "--vision", str(files["vision_path"]),
           "--checkpoint", str(files["checkpoint_path"]), "--precision", precision,
           "-o", str(out), *extra]  # fmt: skip
    timed = ["/usr/bin/time", "-v", *cli] if Path("/usr/bin/time").is_file() else cli
    start = time.perf_counter()
    proc = subprocess.Popen(timed, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=str(ROOT))  # fmt: skip
    lines: list[dict[str, Any]] = []
    tail: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        line = line.rstrip("\n")
        tail.append(line)
        if line.startswith("[flamingo-export]"):
            t = round(time.perf_counter() - start, 1)
            rss = _rss_of_tree(proc.pid)
            lines.append({"t_s": t, "rss_gib": round(rss / 2**30, 2), "message": line[18:]})
            print(f"[export_9b] {t:7.1f} s {rss / 2**30:6.2f} GiB  {line[18:]}", file=sys.stderr)
    proc.wait()
    wall = time.perf_counter() - start
    text = "\n".join(tail)
    if proc.returncode != 0:
        raise SystemExit(f"export failed ({proc.returncode}):\n{text[-4000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    peak = int(m[1]) * 1024 if m else None
    return {"peak_rss_bytes": peak, "wall_s": round(wall, 1), "progress": lines}


def smoke(out: Path) -> dict[str, Any]:
    """onnxruntime loads decoder.onnx and runs a 1-token prefill at batch 1 (own process)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--smoke-only", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _smoke_here(out: str) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from export_3b import smoke_check

    return smoke_check(Path(out))


def sizes_vs_plan(out: Path) -> dict[str, Any]:
    """Each graph's files beside `flamingo-export plan --export OUT`'s weight estimate."""
    from runtime.manifest import load_manifest
    from trt.plan import PlanInputs, plan_export
    from trt.targets import get_target

    manifest = load_manifest(out, verify_hashes=False)
    precision = sorted({g.precision for g in manifest.graphs.values()})[-1]
    plan = plan_export(manifest, str(out), get_target("orin-agx-64gb"),
                       PlanInputs(1, 1, 2048, precision))  # fmt: skip
    rows = {}
    for name, entry in manifest.graphs.items():
        size = sum((out / f).stat().st_size for f in (entry.file, *entry.external_data))
        est = plan.graph_weights[name]
        rows[name] = {"files_bytes": size, "plan_weight_bytes": est, "ratio": round(size / est, 3)}
    return rows


def fp32_weight_bytes(shape: str, layers: int | None) -> tuple[int, int]:
    """(parameters, fp32 bytes) of the model as the export loads it (tied weights once)."""
    import torch

    from flamingo.model import Flamingo

    cfg, _, base_vocab = shape_config(shape, layers)
    cfg.lm.vocab_size = max(cfg.lm.vocab_size, base_vocab + 3)
    with torch.device("meta"):
        meta = Flamingo(cfg)
    n = sum(p.numel() for p in meta.parameters())
    return n, 4 * n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n".join(line.strip() for line in __doc__.splitlines() if "python " in line),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shape",
        choices=["9b", "3b", "0.6b"],
        default="9b",
        help="model shape (default 9b: ~20 GB of model files and about an hour)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp16", "int8", "int4"],
        default="int4",
        help="default int4; int8 is int8 weight-only (the streamed int8 mode)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        help="fewer LM layers, for a quick trial: at least the shape's cross-attention "
        "interval (4 for 9b and 0.6b, 1 for 3b), so that the model has a cross-attention layer",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/flamingo-export-bench"),
        help="where the model files are written and kept (default /tmp/flamingo-export-bench)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the export")
    parser.add_argument("--no-smoke", action="store_true", help="skip the onnxruntime check")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--smoke-only", type=Path, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.layers is not None:
        interval = shape_config(args.shape, None)[0].cross_attn.every_n_layers
        if args.layers < interval:
            parser.error(
                f"--layers {args.layers}: the {args.shape} shape has cross-attention every "
                f"{interval} layers, so it needs --layers >= {interval}"
            )
    if args.smoke_only:
        print(json.dumps(_smoke_here(str(args.smoke_only))))
        return 0

    model_dir = args.workdir / (f"model-{args.shape}" + (f"-{args.layers}l" if args.layers else ""))
    out = args.workdir / f"export-{args.shape}-{args.precision}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    print(f"[export_9b] writing the {args.shape} model files into {model_dir}...",
          file=sys.stderr)  # fmt: skip
    files = write_model(args.shape, args.layers, model_dir)
    write_s = time.perf_counter() - start
    source_bytes = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    params, fp32_bytes = fp32_weight_bytes(args.shape, args.layers)
    extra = ["--int8-mode", "weight-only"] if args.precision == "int8" else []
    load_before = os.getloadavg()
    result = run_export(files, out, args.precision, extra)
    load_after = os.getloadavg()
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu(),
        "command": "flamingo-export export --precision " + " ".join([args.precision, *extra]),
        "shape": args.shape,
        "layers": args.layers,
        "params": params,
        "fp32_weight_bytes": fp32_bytes,
        "source_file_bytes": source_bytes,
        "write_model_s": round(write_s, 1),
        **result,
        "peak_over_fp32_weights": round(result["peak_rss_bytes"] / fp32_bytes, 3)
        if result["peak_rss_bytes"]
        else None,
        "load_average_before_after": [round(x, 2) for x in (*load_before, *load_after)],
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
        "sizes_vs_plan": sizes_vs_plan(out),
    }
    if not args.no_smoke:
        report["smoke"] = smoke(out)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        gib = 2**30
        print(f"{args.shape} at {args.precision}: {params / 1e9:.2f} G parameters, "
              f"fp32 {fp32_bytes / gib:.2f} GiB")  # fmt: skip
        ratio = report["peak_over_fp32_weights"]
        print(f"peak RSS {report['peak_rss_bytes'] / gib:.2f} GiB ({ratio}x fp32 weights), "
              f"wall {report['wall_s']} s")  # fmt: skip
        for name, row in report["sizes_vs_plan"].items():
            print(f"  {name}: files {row['files_bytes'] / gib:.2f} GiB, plan "
                  f"{row['plan_weight_bytes'] / gib:.2f} GiB")  # fmt: skip
        if "smoke" in report:
            print(f"smoke: {report['smoke']}")
    return 0 if report.get("smoke", {"ok": True})["ok"] else 1


def _cpu() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    model = re.search(r"Model name:\s*(.+)", text)
    cpus = re.search(r"^CPU\(s\):\s*(\d+)", text, re.M)
    return f"{model[1].strip() if model else '?'}, {cpus[1] if cpus else '?'} CPUs"


if __name__ == "__main__":
    sys.exit(main())
