"""`inspect`, `export` and `presets`: what a checkpoint resolves to, and its two ONNX graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .options import (
    echo_json,
    limit_options,
    load_model,
    make_quantize_options,
    model_options,
    needs_extra,
    output_options,
    pop_model_args,
    precision_options,
    progress_printer,
    quantize_options,
    user_errors,
)


@click.command()
@model_options()
@output_options
@user_errors()
@needs_extra("export")
def inspect(as_json: bool, quiet: bool, **kw: Any) -> None:
    """Load a model from local files and print what was resolved."""
    from flamingo.inspect import describe

    model, tok, report = load_model(pop_model_args(kw))
    info = describe(model, tok, report)
    if as_json:
        echo_json(info)
        return
    lm, v, r = info["lm"], info["vision"], info["resampler"]
    lines = [
        ("LM family", info["lm_family"]),
        ("LM", f"{lm['num_layers']} layers, hidden {lm['hidden_size']}, {lm['num_heads']} heads "
               f"({lm['num_kv_heads']} KV), vocab {lm['vocab_size']}"),
        ("vision", f"ViT {v['image_size']}px/{v['patch_size']}, width {v['width']}, "
                   f"{v['layers']} layers, {v['heads']} heads, act {v['act']}, tokens "
                   f"{'after' if v['tokens_after_ln_post'] else 'before'} ln_post"),
        ("resampler", f"depth {r['depth']}, {r['num_latents']} latents, "
                      f"{r['heads']} heads x {r['dim_head']}, "
                      + (f"frame embeddings for clips of up to {r['max_num_frames']} frames"
                         if r["max_num_frames"] else "no frame embeddings (max_num_frames "
                         "None)")),
        ("cross-attention", f"every {info['cross_attn_every_n_layers']} layer(s): before "
                            f"decoder layers {info['cross_attn_layer_indices']}"),
        ("special tokens", f"<image>={info['media_token_id']} "
                           f"<|endofchunk|>={info['eoc_token_id']} pad={info['pad_token_id']}"),
    ]  # fmt: skip
    for label, text in lines:
        click.echo(f"{label:<21}{text}")
    click.echo("parameters")
    for name, n in info["num_parameters"].items():
        click.echo(f"  {name:<19}{n:>14,}")
    for label, items in (
        ("unexpected", report.unexpected),
        ("filled", report.filled),
        ("assumed", report.assumptions),
    ):
        for item in items:
            click.echo(f"{label}: {item}")


@click.command()
@model_options()
@click.option(
    "--output",
    "-o",
    "output",
    required=True,
    type=click.Path(path_type=Path),
    help="Export folder to create (written atomically).",
)
@click.option(
    "--opset",
    type=int,
    default=17,
    show_default=True,
    help="ONNX opset (17 runs on TensorRT 8.5+, i.e. JetPack 5 and later).",
)
@limit_options(
    batch=False,
    lowered=False,
    seq_default="the LM's context (max_position_embeddings), at most 2048; a longer value is "
    "refused, except for ALiBi LMs (MPT), which extrapolate: a warning",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@precision_options(default="fp32")
@quantize_options
@output_options
@user_errors()
@needs_extra("export")
def export(
    output: Path,
    opset: int,
    max_images: int | None,
    max_seq_len: int | None,
    max_frames: int | None,
    force: bool,
    as_json: bool,
    quiet: bool,
    **kw: Any,
) -> None:
    """Write OUTPUT/vision.onnx, OUTPUT/decoder.onnx, the tokenizer and manifest.json
    (at --precision: exported fp32, then quantized)."""
    from exporter.export import ExportOptions, check_output
    from precision.quantize import export_at_precision

    limits = {"max_images": max_images, "max_seq_len": max_seq_len, "max_frames": max_frames}
    options = ExportOptions(
        opset=opset, force=force, **{k: v for k, v in limits.items() if v is not None}
    )
    # everything that can be refused is refused before the (slow) model load
    options.validate()
    check_output(output, force)
    model_args = pop_model_args(kw)
    quantize = make_quantize_options(kw, force)
    say = progress_printer(quiet)
    model, tok, _ = load_model(model_args, say)
    manifest = export_at_precision(model, tok, output, options, quantize, progress=say)
    summary = {
        "output": str(output),
        "files": manifest.files,
        "graphs": {
            k: {"file": g.file, "precision": g.precision, "opset": g.opset}
            for k, g in manifest.graphs.items()
        },
    }
    if as_json:
        echo_json(summary)
        return
    for name, digest in manifest.files.items():
        size = (output / name).stat().st_size
        click.echo(f"{name:<40} {size / 2**20:>9.2f} MiB  sha256 {digest[:12]}")


@click.command()
@output_options
def presets(as_json: bool, quiet: bool) -> None:
    """List the released OpenFlamingo models and their LM/cross-attention layout."""
    from dataclasses import asdict

    from flamingo.config import PRESETS

    if as_json:
        echo_json([asdict(p) for p in PRESETS.values()])
        return
    for p in PRESETS.values():
        click.echo(
            f"{p.name:<42} {p.lm_family:<9} {p.lm_layers} layers, cross-attn every "
            f"{p.cross_attn_every_n_layers}  ({p.lm_name})"
        )


COMMANDS = (inspect, export, presets)
