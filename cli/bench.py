"""`bench`: latency, tokens/s and memory of an export, side by side with its peers in one run.

The harness (bench/harness.py) is a library in the installed package; this is its command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .options import (
    EXPORT_DIR,
    FiniteFloatRange,
    echo_json,
    model_named,
    model_options,
    output_options,
    parse_shots,
    pop_model_args,
    progress_printer,
    require_extra,
    require_model_files,
    spinning_option,
    user_errors,
)


@click.command("bench")
@EXPORT_DIR
@click.option(
    "--shots",
    default="0,4,8,16",
    show_default=True,
    callback=parse_shots,
    help="Demonstrations per prompt, comma-separated.",
)
@click.option(
    "--max-new-tokens",
    type=int,
    default=16,
    show_default=True,
    help="Tokens generated per prompt: exactly this many (greedy, stop token off).",
)
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs (median).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs per case.")
@click.option(
    "--threads", type=int, default=None, help="onnxruntime = torch threads (default: all CPUs)."
)
@spinning_option
@click.option(
    "--reference",
    is_flag=True,
    help="Compare with our PyTorch reference (implied by --lm/--vision/--checkpoint).",
)
@click.option(
    "--oracle", is_flag=True, help="Also compare with the published open_flamingo generate."
)
@model_options(required=False)
@click.option(
    "--oracle-vision",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="HF CLIP vision directory for --oracle (default: --vision or vision_hf/ beside it).",
)
@click.option(
    "--baseline-export",
    "baseline_exports",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Another export to compare with (repeatable), e.g. the fp32 export of an int8 one.",
)
@click.option(
    "--settle-ms",
    type=FiniteFloatRange(0, 60_000),
    default=250.0,
    show_default=True,
    help="Pause before each run, so the previous backend's spinning threads are idle.",
)
@output_options
@user_errors()
def bench(
    export_dir: Path,
    shots: tuple[int, ...],
    max_new_tokens: int,
    repeats: int,
    warmup: int,
    threads: int | None,
    allow_spinning: bool,
    reference: bool,
    oracle: bool,
    oracle_vision: Path | None,
    baseline_exports: tuple[Path, ...],
    settle_ms: float,
    as_json: bool,
    quiet: bool,
    **kw: Any,
) -> None:
    """Latency, tokens/s and memory of EXPORT_DIR on 0-16-shot caption prompts, with and without
    the prefix cache; with the model files, side by side with the PyTorch reference."""
    from bench.harness import BenchOptions, ModelFiles, run_bench
    from bench.report import format_table

    model = pop_model_args(kw)
    files = None
    if model_named(model) or reference or oracle:
        if not model_named(model):
            raise click.UsageError(
                "--reference/--oracle need --lm, --vision and --checkpoint (or --model DIR, "
                "IDEFICS)"
            )
        require_model_files(model)
        model_dir = model.pop("model_dir")
        if model_dir is not None and oracle:
            raise click.UsageError(
                "--oracle runs the published open_flamingo package: OpenFlamingo files "
                "(--lm, --vision, --checkpoint), not --model (an IDEFICS folder)"
            )
        require_extra("export", "bench (with the PyTorch reference)")
        if model_dir is not None:
            files = ModelFiles(None, None, None, model_dir=model_dir,
                               load_options={"preset": model["preset"]})  # fmt: skip
        else:
            files = ModelFiles(
                model.pop("lm_dir"),
                model.pop("vision_path"),
                model.pop("checkpoint_path"),
                model.pop("cross_attn_every_n_layers"),
                oracle_vision,
                load_options=model,
            )
    options = BenchOptions(
        shots=shots,
        new_tokens=max_new_tokens,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        settle_ms=settle_ms,
        allow_spinning=allow_spinning,
    )
    say = progress_printer(quiet, prefix="bench")
    report = run_bench(export_dir, options, files, oracle, say, baseline_exports)
    if as_json:
        echo_json(report)
    else:
        click.echo(format_table(report))


COMMANDS = (bench,)
