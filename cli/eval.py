"""`eval`: few-shot benchmark scores of one or more exports with OpenFlamingo's protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from evaluation.sampling import MAX_SEED
from evaluation.tasks import TASKS

from .options import (
    check_output_file,
    echo_json,
    engine_options,
    open_pipeline,
    output_options,
    parse_shots,
    progress_printer,
    user_errors,
)


@click.command("eval")
@click.argument(
    "exports", nargs=-1, required=True, metavar="EXPORT_DIR [EXPORT_DIR ...]",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)  # fmt: skip
@click.option("--task", type=click.Choice(list(TASKS)), required=True,
              help="The benchmark (demo: the demo model's held-out episodes, no "
                   "--data).")  # fmt: skip
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="The benchmark's folder, official files in the layout of the README's "
                   "Evaluate section.")  # fmt: skip
@click.option("--shots", default="0,4,8,16,32", show_default=True, callback=parse_shots,
              help="Demonstrations per prompt, comma-separated.")  # fmt: skip
@click.option("--trials", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trials per shot count; trial t draws with seed --seed + t.")  # fmt: skip
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None,
              help="Seed of the first trial's draws (default 42 as OpenFlamingo; demo: "
                   "1234).")  # fmt: skip
@click.option("--num-samples", type=int, default=-1, show_default=True,
              help="Test items per trial (-1: all; demo: 200).")  # fmt: skip
@click.option("--query-set-size", type=int, default=2048, show_default=True,
              help="Train records the random demonstrations are drawn from.")  # fmt: skip
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Queries per batch (evaluate.py's --batch_size; a query's answer does not "
                   "depend on its batch).")  # fmt: skip
@click.option("--rices", is_flag=True,
              help="Demonstrations by image similarity (RICES) instead of at random.")  # fmt: skip
@click.option("--rices-vision", default="export", show_default=True,
              help="RICES image features: 'export' (the first export's mean resampler "
                   "latents) or a CLIP model (open_clip state dict or HF CLIP folder; needs "
                   "the export extra).")  # fmt: skip
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Write a Markdown report (and a PNG plot of score vs shots beside "
                   "it).")  # fmt: skip
@engine_options
@output_options
@user_errors()
def eval_(
    exports: tuple[Path, ...],
    task: str,
    data: Path | None,
    shots: tuple[int, ...],
    trials: int,
    seed: int | None,
    num_samples: int,
    query_set_size: int,
    batch_size: int,
    rices: bool,
    rices_vision: str,
    report: Path | None,
    engine: str,
    providers: tuple[str, ...],
    threads: int | None,
    allow_spinning: bool,
    allow_other_device: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Score EXPORT_DIR (and every further export, against the first) on a few-shot benchmark
    with OpenFlamingo's evaluation protocol: per shot count and trial, the same test items and
    demonstrations for every export."""
    from evaluation.report import format_table, report_paths, write_report
    from evaluation.runner import DEFAULT_SEED, EvalOptions, evaluate

    say = progress_printer(quiet)
    if report is not None:  # before the run: a report that cannot be written loses it
        for path in report_paths(report):
            check_output_file(path, "--report")
    if seed is None:
        from demo.task import EVAL_SEED

        seed = EVAL_SEED if task == "demo" else DEFAULT_SEED
    options = EvalOptions(shots, trials, seed, num_samples, query_set_size, rices, batch_size)
    options.validate()

    def opener(export_dir: Path) -> Any:
        return open_pipeline(
            export_dir, engine, providers, threads, allow_other_device, say, allow_spinning
        )

    result = evaluate(exports, task, data, options, opener, rices_vision, say)
    if report is not None:
        md, png = write_report(result, report)
        say(f"report: {md} (plot {png})")
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(format_table(result))


COMMANDS = (eval_,)
