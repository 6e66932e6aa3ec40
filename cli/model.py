"""`inspect`, `export` and `presets`: what a checkpoint resolves to, and its two ONNX graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .options import (
    MODEL_FILE_KEYS,
    DerivedHelpOption,
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
    require_model_files,
    user_errors,
)


def _opset_help() -> str:
    from trt.parser_tables import opset_advice  # needs onnx: the check extra

    return opset_advice()


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
    stop = "<|endofchunk|>" if info["media_rule"] == "openflamingo" else "</s> (EOS)"
    lines = [
        ("LM family", info["lm_family"]),
        ("LM", f"{lm['num_layers']} layers, hidden {lm['hidden_size']}, {lm['num_heads']} heads "
               f"({lm['num_kv_heads']} KV), vocab {lm['vocab_size']}"),
        ("vision", f"ViT {v['image_size']}px/{v['patch_size']}, width {v['width']}, "
                   f"{v['layers']} layers, {v['heads']} heads, act {v['act']}, "
                   f"{'CLS + patch' if v['include_cls'] else 'patch'} tokens "
                   f"{'after' if v['tokens_after_ln_post'] else 'before'} ln_post"),
        ("resampler", (f"{r['depth']} layers, {info['image_tokens']} latents, "
                       + (f"frame embeddings for clips of up to {r['max_num_frames']} frames"
                          if r.get("max_num_frames") else "no frame embeddings")
                       if r["enabled"]
                       else f"none: {info['image_tokens']} vision tokens per image")),
        ("cross-attention", f"every {info['cross_attn_every_n_layers']} layer(s): before "
                            f"decoder layers {info['cross_attn_layer_indices']}"),
        ("special tokens", f"<image>={info['media_token_id']} "
                           f"{stop}={info['eoc_token_id']} pad={info['pad_token_id']}"),
        ("media rule", info["media_rule"]),
    ]  # fmt: skip
    for label, text in lines:
        click.echo(f"{label:<21}{text}")
    click.echo("parameters")
    for name, n in info["num_parameters"].items():
        click.echo(f"  {name:<19}{n:>14,}")
    for line in report.lines():
        click.echo(line)


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
    cls=DerivedHelpOption,
    help_from=_opset_help,
    help="ONNX opset (`check --trt-version` says which TensorRT parses an export).",
)
@limit_options(
    batch=False,
    lowered=False,
    seq_default="the LM's context (max_position_embeddings), at most 2048; a longer value is "
    "refused, except for ALiBi LMs (MPT), which extrapolate: a warning",
)
@click.option(
    "--decoder-form",
    default="portable",
    show_default=True,
    help="The decoder graph's form, a comma list: 'portable' (what TensorRT parses), "
    "'in-graph' (media and logits indices computed in the graph: onnxruntime-genai can drive "
    "it), 'inplace' (GroupQueryAttention appending to a preallocated KV cache), or both "
    "'inplace,in-graph'; the last three run on onnxruntime only (runtime.spec.DecoderForm). "
    "'concat' and 'inputs' name the portable choice of each half explicitly.",
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
    decoder_form: str,
    max_frames: int | None,
    force: bool,
    as_json: bool,
    quiet: bool,
    **kw: Any,
) -> None:
    """Write OUTPUT/vision.onnx, OUTPUT/decoder.onnx, the tokenizer and manifest.json.

    At --precision fp16, int4 or int8 --int8-mode weight-only the weights are converted from
    the model files (OpenFlamingo's or an IDEFICS --model folder) one tensor at a time (the
    whole model is never in memory); W8A8 and dynamic int8 are exported fp32, then quantized
    (W8A8's calibration runs the fp32 graphs)."""
    from exporter.export import ExportOptions, check_output
    from precision.quantize import export_at_precision
    from precision.streaming import export_streaming, streams
    from runtime.spec import DecoderForm

    limits = {"max_images": max_images, "max_seq_len": max_seq_len, "max_frames": max_frames}
    options = ExportOptions(
        opset=opset,
        force=force,
        decoder_form=DecoderForm.parse(decoder_form),
        **{k: v for k, v in limits.items() if v is not None},
    )
    # everything that can be refused is refused before the (slow) model load
    options.validate()
    model_args = pop_model_args(kw)
    require_model_files(model_args)
    sources = [model_args[k] for k in MODEL_FILE_KEYS if model_args[k] is not None]
    check_output(output, force, inputs=sources)
    quantize = make_quantize_options(kw, force)
    say = progress_printer(quiet)
    if streams(quantize):
        manifest = export_streaming(model_args, output, options, quantize, progress=say)
    else:
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
