"""The `flamingo-export` command line: thin wrappers over library functions the tests call too.

Commands that need torch import it lazily, so `flamingo-export run` works with the base
(torch-free) install.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from cli.precision import export_precision_options

MODEL_OPTIONS = [
    click.option("--lm", "lm_dir", required=True, type=click.Path(path_type=Path),
                 help="HF language model directory (config.json, weights, tokenizer)."),
    click.option("--vision", "vision_path", required=True, type=click.Path(path_type=Path),
                 help="open_clip CLIP state dict (.safetensors/.pt) or an HF CLIP directory."),
    click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(path_type=Path),
                 help="OpenFlamingo checkpoint.pt (or .safetensors)."),
    click.option("--cross-attn-every-n-layers", type=int, default=None,
                 help="Cross-attention interval (default: inferred from the checkpoint)."),
    click.option("--preset", default=None, help="A released OpenFlamingo model (see `presets`)."),
    click.option("--vision-heads", type=int, default=None,
                 help="Vision attention heads (open_clip files have no config; default width/64)."),
    click.option("--vision-act", type=click.Choice(["quick_gelu", "gelu"]), default=None,
                 help="Vision MLP activation (default quick_gelu: OpenAI CLIP weights)."),
    click.option("--vision-tokens-after-ln-post", is_flag=True, default=False,
                 help="Apply ln_post to the patch tokens (open_clip >= 2.23); default: before "
                      "ln_post, as the released checkpoints were trained."),
]  # fmt: skip


def model_options(f: Any) -> Any:
    for option in reversed(MODEL_OPTIONS):
        f = option(f)
    return f


def load_model(**kw: Any) -> tuple[Any, Any, Any]:
    """Load the reference model, turning loader errors into a clean CLI error."""
    from flamingo.loaders import LoadError, load_flamingo

    try:
        return load_flamingo(
            kw["lm_dir"],
            kw["vision_path"],
            kw["checkpoint_path"],
            cross_attn_every_n_layers=kw["cross_attn_every_n_layers"],
            preset=kw["preset"],
            vision_heads=kw["vision_heads"],
            vision_act=kw["vision_act"],
            vision_tokens_after_ln_post=kw["vision_tokens_after_ln_post"],
        )
    except LoadError as e:
        raise click.ClickException(str(e)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flamingo-export")
def main() -> None:
    """Export Flamingo (OpenFlamingo) models to ONNX/TensorRT and run few-shot inference."""


@main.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(as_json: bool, **kw: Any) -> None:
    """Load a model from local files and print what was resolved."""
    from flamingo.inspect import describe

    model, tok, report = load_model(**kw)
    info = describe(model, tok, report)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"LM family            {info['lm_family']}")
    lm = info["lm"]
    click.echo(
        f"LM                   {lm['num_layers']} layers, hidden {lm['hidden_size']}, "
        f"{lm['num_heads']} heads ({lm['num_kv_heads']} KV), vocab {lm['vocab_size']}"
    )
    v = info["vision"]
    click.echo(
        f"vision               ViT {v['image_size']}px/{v['patch_size']}, width {v['width']}, "
        f"{v['layers']} layers, {v['heads']} heads, act {v['act']}, "
        f"tokens {'after' if v['tokens_after_ln_post'] else 'before'} ln_post"
    )
    click.echo(
        f"cross-attention      every {info['cross_attn_every_n_layers']} layer(s): before "
        f"decoder layers {info['cross_attn_layer_indices']}"
    )
    click.echo(
        f"special tokens       <image>={info['media_token_id']} "
        f"<|endofchunk|>={info['eoc_token_id']} pad={info['pad_token_id']}"
    )
    click.echo("parameters")
    for name, n in info["num_parameters"].items():
        click.echo(f"  {name:<19}{n:>14,}")
    for label, items in (("unexpected", report.unexpected), ("filled", report.filled)):
        for item in items:
            click.echo(f"{label}: {item}")


@main.command()
@model_options
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
@click.option(
    "--max-images",
    type=int,
    default=32,
    show_default=True,
    help="Most images per prompt the engines are built for.",
)
@click.option(
    "--max-seq-len",
    type=int,
    default=2048,
    show_default=True,
    help="Most tokens (prompt + generated) per sequence.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@export_precision_options  # --precision fp16|int8|int4 and the quantize options
def export(
    output: Path,
    opset: int,
    max_images: int,
    max_seq_len: int,
    force: bool,
    as_json: bool,
    **kw: Any,
) -> None:
    """Write OUT/vision.onnx, OUT/decoder.onnx, the tokenizer and manifest.json."""
    from cli.precision import export_and_quantize, make_options
    from exporter.export import ExportError, ExportOptions

    options = ExportOptions(
        opset=opset, max_images=max_images, max_seq_len=max_seq_len, force=force
    )
    try:
        options.validate()  # before the (slow) model load
        make_options(kw, force)  # bad quantization options fail before the model load
        model, tok, _ = load_model(**kw)
        manifest = export_and_quantize(model, tok, output, options, kw)
    except ExportError as e:
        raise click.ClickException(str(e)) from e
    summary = {
        "output": str(output),
        "files": manifest.files,
        "graphs": {
            k: {"file": g.file, "precision": g.precision, "opset": g.opset}
            for k, g in manifest.graphs.items()
        },
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for name, digest in manifest.files.items():
            size = (output / name).stat().st_size
            click.echo(f"{name:<40} {size / 2**20:>9.2f} MiB  sha256 {digest[:12]}")


PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


@main.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--prompt",
    default=None,
    help="Text with one <image> marker per image (instead of --demos/--task).",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Image file, once per <image> marker, in order; with --demos or --task: "
    "the one query image.",
)
@click.option(
    "--demos",
    type=click.Path(path_type=Path),
    default=None,
    help="Few-shot demonstrations, JSONL: {image, caption} or {image, question, "
    "answer} per line (image paths relative to the file).",
)
@click.option(
    "--task",
    type=click.Choice(["caption", "vqa"]),
    default=None,
    help="Few-shot template (default caption).",
)
@click.option("--question", default=None, help="The query's question (--task vqa).")
@click.option("--max-new-tokens", type=int, default=20, show_default=True)
@click.option("--num-beams", type=int, default=1, show_default=True)
@click.option("--length-penalty", type=float, default=1.0, show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy/beam argmax.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=50, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible per seed).")
@click.option("--no-repeat-ngram-size", type=int, default=0, show_default=True)
@click.option(
    "--provider",
    "providers",
    multiple=True,
    help="onnxruntime execution provider, in priority order (repeatable; "
    "cpu, cuda, tensorrt or a full name; default cpu).",
)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option(
    "--stream",
    is_flag=True,
    help="Print text as tokens are chosen (beam search: at the end; with --json: to stderr).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="text, token_ids, logprobs, timings_ms, stats."
)
def run(
    export_dir: Path,
    prompt: str | None,
    images: tuple[Path, ...],
    demos: Path | None,
    task: str | None,
    question: str | None,
    providers: tuple[str, ...],
    threads: int | None,
    stream: bool,
    as_json: bool,
    **search: Any,
) -> None:
    """Generate from an export folder with onnxruntime (no torch needed).

    Either --prompt with its images, or a few-shot query: [--demos FILE] [--task caption|vqa]
    [--question Q] --image QUERY.
    """
    from runtime.images import ImageError
    from runtime.manifest import ManifestError
    from runtime.pipeline import FlamingoPipeline, TextStream
    from runtime.prompts import load_demos_jsonl

    if prompt is not None and (demos is not None or task is not None or question is not None):
        raise click.UsageError("--prompt cannot be combined with --demos, --task or --question")
    if prompt is None and len(images) != 1:
        raise click.UsageError(
            f"a few-shot query needs exactly one --image (the query), got {len(images)}; "
            "or give --prompt"
        )
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers] or ["CPUExecutionProvider"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            pipe = FlamingoPipeline(export_dir, providers=names, threads=threads)
        for w in caught:  # e.g. an export made for TensorRT that is slow on this EP
            click.echo(f"[flamingo-export] note: {w.message}", err=True)
        config = pipe.default_config(**search)
        config.validate()
        streamer = TextStream(pipe.tokenizer, config.eos_token_ids) if stream else None

        def on_token(row: int, token_id: int) -> None:
            if streamer is not None and row == 0:
                click.echo(streamer.push(token_id), nl=False, err=as_json)

        callback = on_token if stream else None
        if prompt is not None:
            out = pipe.generate(prompt, [str(p) for p in images], config, callback)
        else:
            examples = load_demos_jsonl(demos) if demos is not None else []
            if not as_json:  # what the answer is conditioned on (stderr: stdout = the answer)
                _echo_few_shot(examples, images[0], question)
            out = pipe.few_shot(
                examples, str(images[0]), task or "caption", question, config, callback
            )
    except (ManifestError, ImageError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if streamer is not None:
        click.echo(streamer.flush(), err=as_json)
    if as_json:
        result = out.to_dict()
        if prompt is None:
            result["demonstrations"] = [_demo_dict(d) for d in examples]
            result["query_image"] = str(images[0])
        click.echo(json.dumps(result, indent=2))
    elif streamer is None:
        click.echo(out.text)


def _demo_dict(demo: Any) -> dict[str, str]:
    fields = {"text": demo.text, "question": demo.question, "answer": demo.answer}
    return {"image": str(demo.image), **{k: v for k, v in fields.items() if v is not None}}


def _echo_few_shot(examples: list[Any], query: Path, question: str | None) -> None:
    click.echo(f"{len(examples)} demonstration(s):", err=True)
    for d in examples:
        said = d.text if d.text is not None else f"Q: {d.question} A: {d.answer}"
        click.echo(f"  {d.image} -> {said}", err=True)
    click.echo(f"query: {query}" + (f"  Q: {question}" if question else ""), err=True)
    click.echo("answer:", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def presets(as_json: bool) -> None:
    """List the released OpenFlamingo models and their LM/cross-attention layout."""
    from dataclasses import asdict

    from flamingo.config import PRESETS

    if as_json:
        click.echo(json.dumps([asdict(p) for p in PRESETS.values()], indent=2))
        return
    for p in PRESETS.values():
        click.echo(
            f"{p.name:<42} {p.lm_family:<9} {p.lm_layers} layers, cross-attn every "
            f"{p.cross_attn_every_n_layers}  ({p.lm_name})"
        )


from cli.trt import register  # noqa: E402  check, plan, build, trt-run (TensorRT)

register(main)

from cli.precision import register as register_quant  # noqa: E402  quantize, parity, sensitivity

register_quant(main)
main.add_command(__import__("bench.harness", fromlist=["bench"]).bench)  # bench
main.add_command(__import__("cli.serve", fromlist=["serve"]).serve)  # serve (OpenAI API)

if __name__ == "__main__":
    sys.exit(main())
