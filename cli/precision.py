"""`quantize`, `parity` and `sensitivity`: reduced-precision exports and what they cost."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .options import (
    EXPORT_DIR,
    echo_json,
    evaluation_options,
    load_model,
    make_quantize_options,
    model_named,
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


def output_option(required: bool, what: str = "New export folder (written atomically).") -> Any:
    return click.option(
        "--output", "-o", "output", type=click.Path(path_type=Path), required=required,
        default=None, help=what,
    )  # fmt: skip


FORCE = click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")


@click.command()
@EXPORT_DIR
@precision_options(default=None)
@output_option(required=True)
@FORCE
@quantize_options
@output_options
@user_errors()
@needs_extra("export")
def quantize(
    export_dir: Path, output: Path, force: bool, as_json: bool, quiet: bool, **kw: Any
) -> None:
    """Quantize the fp32 export EXPORT_DIR into a new export folder OUTPUT."""
    from precision.quantize import quantize_export
    from runtime.engine import slow_on_cpu

    options = make_quantize_options(kw, force)
    say = progress_printer(quiet)
    manifest = quantize_export(export_dir, output, options, progress=say)
    summary = {
        "output": str(output),
        "graphs": {
            name: {
                "precision": g.precision,
                "opset": g.opset,
                "bytes": sum((output / f).stat().st_size for f in (g.file, *g.external_data)),
                "backends": manifest.quantization.get(name, {}).get("backends", []),
            }
            for name, g in manifest.graphs.items()
        },
        "quantization": manifest.quantization,
        "notes": slow_on_cpu(manifest),
    }
    if as_json:
        echo_json(summary)
        return
    for name, g in summary["graphs"].items():
        click.echo(
            f"{name:<8} {g['precision']:<5} opset {g['opset']:<3} {g['bytes'] / 2**20:>9.2f} MiB"
            f"  {'+'.join(g['backends'])}"
        )  # fmt: skip
    for note in summary["notes"]:
        say(f"note: {note}")


@click.command()
@click.argument(
    "exports", nargs=-1, required=True, metavar="[REFERENCE] CANDIDATE",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)  # fmt: skip
@model_options(required=False)
@evaluation_options(episodes=8, decode_steps=16)
@click.option(
    "--thresholds",
    default=None,
    help="Overrides, e.g. 'top1=0.99,int8.greedy=0.5' (metrics: vision_cosine, "
    "decoder_cosine, pipeline_cosine, top1, greedy, task_delta = candidate minus "
    "reference task accuracy).",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a Markdown report (and a PNG plot beside it).",
)
@output_options
@user_errors()
def parity(
    exports: tuple[Path, ...],
    data: str,
    episodes: int,
    max_shots: int,
    decode_steps: int,
    episode_seed: int,
    thresholds: str | None,
    report: Path | None,
    as_json: bool,
    quiet: bool,
    **kw: Any,
) -> None:
    """Compare the export CANDIDATE with a reference: `parity REFERENCE CANDIDATE` (two export
    folders), or `parity CANDIDATE --lm ... --vision ... --checkpoint ...` (the PyTorch model).
    Exits 1 when a threshold is missed."""
    from precision.data import calibration_set
    from precision.parity import OnnxBackend, TorchBackend, dumps, parse_thresholds, run_parity
    from precision.parity import write_report as write_md
    from runtime.tokenizer import load_export_tokenizer

    model = pop_model_args(kw)
    torch_ref = model_named(model)
    if torch_ref and len(exports) != 1:
        raise click.UsageError("with --lm/--vision/--checkpoint give only CANDIDATE")
    if not torch_ref and len(exports) != 2:
        raise click.UsageError(
            "give REFERENCE and CANDIDATE (export folders), or CANDIDATE with --lm ..."
        )
    if torch_ref:
        require_model_files(model)
    say = progress_printer(quiet)
    overrides = parse_thresholds(thresholds)
    candidate = OnnxBackend(exports[-1])
    if torch_ref:
        loaded, _, _ = load_model(model, say)
        reference: Any = TorchBackend(loaded, f"pytorch:{model['lm_dir']}")
    else:
        reference = OnnxBackend(exports[0])
    tokenizer = load_export_tokenizer(candidate.root, candidate.manifest)
    episodes_ = calibration_set(
        data, episodes=episodes, max_shots=max_shots, seed=episode_seed, progress=say
    ).episodes
    result = run_parity(
        reference, candidate, episodes_, tokenizer, decode_steps=decode_steps,
        overrides=overrides, progress=say,
    )  # fmt: skip
    if report is not None:
        write_md(result, report)
        if "plot_note" in result:
            say(result["plot_note"])
    if as_json:
        click.echo(dumps(result))
    else:
        _print_summary(result)
    if result["failures"]:
        say("parity FAILED: " + "; ".join(result["failures"]))
        sys.exit(1)


def _print_summary(result: dict[str, Any]) -> None:
    m = result["metrics"]
    p = result["precisions"]
    click.echo(f"candidate {result['candidate']} (vision {p['vision']}, decoder {p['decoder']})")
    click.echo(f"reference {result['reference']}")
    for name, s in m["vision"].items():
        click.echo(
            f"  vision   {name:<24} cosine {s['cosine']:.6f}  max abs {s['max_abs']:.3g}"
            f"  mean abs {s['mean_abs']:.3g}"
        )
    for graph in ("decoder", "pipeline"):
        s = m[graph]
        extra = f"  greedy exact {s['greedy_exact_match']:.3f}" if graph == "pipeline" else ""
        click.echo(
            f"  {graph:<8} {'logits':<24} cosine {s['cosine']:.6f}  max abs {s['max_abs']:.3g}"
            f"  mean abs {s['mean_abs']:.3g}  top-1 {s['top1']:.4f}{extra}"
        )
    task = m.get("task")
    if task:
        click.echo(
            f"  task     accuracy ({task['episodes']} labelled episodes)  reference "
            f"{task['reference']:.1%}  candidate {task['candidate']:.1%}  "
            f"({100 * task['delta']:+.1f} points; lost {task['lost']}, gained {task['gained']})"
        )
    for name, s in result["sizes"].items():
        ratio = f"  ({s['ratio']:.3f} of reference)" if "ratio" in s else ""
        click.echo(f"  size     {name:<24} {s['bytes'] / 2**20:.2f} MiB{ratio}")
    click.echo("PASS" if not result["failures"] else "FAIL: " + "; ".join(result["failures"]))


@click.command()
@EXPORT_DIR
@click.option(
    "--precision",
    type=click.Choice(["fp16", "int8", "int4"]),
    required=True,
    help="The precision whose cost is ranked.",
)
@click.option(
    "--graph", type=click.Choice(["decoder", "vision"]), default="decoder", show_default=True
)
@evaluation_options(episodes=4, decode_steps=4)
@click.option(
    "--top",
    type=int,
    default=3,
    show_default=True,
    help="How many of the most sensitive groups to suggest keeping.",
)
@click.option(
    "--budget",
    default=None,
    help="Automatic mix: the accuracy budget as parity thresholds, e.g. 'top1=0.99' "
    "or 'task_delta=-0.01' (with labelled --data); keeps the fewest "
    "most-sensitive groups at fp32 that meet it.",
)
@output_option(required=False, what="With --budget: write the chosen mixed-precision export here.")
@FORCE
@quantize_options
@output_options
@user_errors()
@needs_extra("export")
def sensitivity(
    export_dir: Path,
    precision: str,
    graph: str,
    data: str,
    episodes: int,
    max_shots: int,
    decode_steps: int,
    episode_seed: int,
    top: int,
    budget: str | None,
    output: Path | None,
    force: bool,
    as_json: bool,
    quiet: bool,
    **kw: Any,
) -> None:
    """Rank EXPORT_DIR's layers by how much quantizing each alone costs; suggest a keep-list,
    or with --budget pick the cheapest mix that meets it (and write it with -o)."""
    from precision.parity import parse_thresholds
    from precision.sensitivity import Evaluation, auto_mix, keep_list, run_sensitivity

    if output is not None and budget is None:
        raise click.UsageError("-o/--output needs --budget (the mix it writes is chosen by it)")
    bounds = parse_thresholds(budget).get(precision, {}) if budget else {}
    if budget and not bounds:
        raise click.UsageError(f"--budget {budget!r} sets no bound for {precision}")
    base = make_quantize_options({**kw, "precision": precision}, force=True)
    say = progress_printer(quiet)
    evaluation = Evaluation(
        export_dir, data, episodes, decode_steps, max_shots=max_shots, seed=episode_seed
    )
    result = run_sensitivity(evaluation, graph, precision, base, progress=say)
    if bounds:
        result["auto"] = auto_mix(
            evaluation, graph, precision, base, bounds, result, output=output, force=force,
            progress=say,
        )  # fmt: skip
    result["keep_nodes"] = result["auto"]["keep_nodes"] if bounds else keep_list(result, top)
    if as_json:
        echo_json(result)
        return
    click.echo(f"{graph} at {precision}, one group at a time (most sensitive first):")
    for r in result["groups"]:
        click.echo(
            f"  {r['group']:<44} {r['nodes']:>3} nodes  cosine {r['cosine']:.6f}  "
            f"top-1 {r['top1']:.4f}"
        )
    if bounds:
        auto = result["auto"]
        click.echo(f"budget {budget}: keep {len(auto['keep_groups'])} of {len(result['groups'])}")
        for row in auto["evaluated"]:
            verdict = "; ".join(row["failures"]) or "meets the budget"
            click.echo(
                f"  keep {row['keep_groups']:>3}: {row['bytes'] / 2**20:8.2f} MiB  {verdict}"
            )
        if output is not None:
            click.echo(f"wrote {output}")
    flags = " ".join(f"--keep-node '{k}'" for k in result["keep_nodes"])
    click.echo(f"keep-list: {flags}")


COMMANDS = (quantize, parity, sensitivity)
