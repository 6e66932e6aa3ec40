"""`flamingo-export quantize` and `parity`, and the `--precision` options of `export`.

Thin click wrappers over precision.quantize / precision.parity; heavy imports happen inside the
commands so `flamingo-export run` stays torch-free and fast to start.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

PRECISIONS = ("fp32", "fp16", "int8", "int4")

QUANT_OPTIONS = [
    click.option("--calibration", default="random", show_default=True,
                 help="int8 calibration data: a JSONL of {image, caption} / {image, question, "
                      "answer} (or a folder holding one), 'demo' (the demo task) or 'random'."),
    click.option("--calibration-method", type=click.Choice(["minmax", "percentile", "entropy"]),
                 default="minmax", show_default=True, help="int8 activation range estimator."),
    click.option("--percentile", type=float, default=99.999, show_default=True,
                 help="Percentile kept by --calibration-method percentile."),
    click.option("--calibration-episodes", type=int, default=16, show_default=True,
                 help="Few-shot prompts run for calibration."),
    click.option("--max-shots", type=int, default=2, show_default=True,
                 help="Most demonstrations per calibration prompt."),
    click.option("--decode-steps", type=int, default=8, show_default=True,
                 help="Greedy decode steps calibrated after each prefill (real KV states)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Calibration seed."),
    click.option("--int8-mode", type=click.Choice(["w8a8", "weight-only"]), default="w8a8",
                 show_default=True,
                 help="w8a8: calibrated int8 activations and weights (TensorRT int8 GEMMs); "
                      "weight-only: int8 weights, float activations, no calibration (fast "
                      "memory-bound decode on onnxruntime CPU; TensorRT 10)."),
    click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="128",
                 show_default=True, help="int4 block size (weights per scale)."),
    click.option("--int4-format", type=click.Choice(["qdq", "matmulnbits"]), default="qdq",
                 show_default=True,
                 help="qdq: blocked DequantizeLinear, opset 21 (TensorRT 10+ and onnxruntime); "
                      "matmulnbits: onnxruntime's MatMulNBits contrib op (onnxruntime only)."),
    click.option("--fp16-keep", default="norm", show_default=True,
                 help="What fp16 graphs keep in fp32: comma list of norm, softmax, logits, "
                      "or 'none'."),
    click.option("--keep-node", "keep_nodes", multiple=True,
                 help="Node-name glob kept at fp32 (repeatable): a mixed-precision keep-list."),
    click.option("--no-quantize-embeddings", is_flag=True,
                 help="Keep embedding tables (and a tied LM head) fp32 in int8/int4 graphs."),
    click.option("--calibration-cache", default=None,
                 help="int8 ranges file prefix: written after calibrating, reused when present "
                      "(re-quantize with another keep-list without calibrating again)."),
]  # fmt: skip


def quant_options(f: Any) -> Any:
    for option in reversed(QUANT_OPTIONS):
        f = option(f)
    return f


def export_precision_options(f: Any) -> Any:
    """`export --precision P [--vision-precision P --decoder-precision P]` + quantize options."""
    f = quant_options(f)
    for option in reversed(
        [
            click.option("--precision", type=click.Choice(PRECISIONS), default="fp32",
                         show_default=True,
                         help="Export, then quantize both graphs to this precision."),
            click.option("--vision-precision", type=click.Choice(PRECISIONS), default=None,
                         help="Override --precision for the vision graph."),
            click.option("--decoder-precision", type=click.Choice(PRECISIONS), default=None,
                         help="Override --precision for the decoder graph."),
        ]
    ):  # fmt: skip
        f = option(f)
    return f


def make_options(kw: dict[str, Any], force: bool) -> Any:
    """QuantizeOptions from click values (validated: bad values fail before any slow work)."""
    from precision.quantize import QuantizeError, QuantizeOptions

    precision = kw.get("precision")
    vision = kw.get("vision_precision") or precision
    decoder = kw.get("decoder_precision") or precision
    if vision is None or decoder is None:
        raise click.UsageError(
            "give --precision, or both --vision-precision and --decoder-precision"
        )
    keep = tuple(k.strip() for k in kw["fp16_keep"].split(",") if k.strip())
    options = QuantizeOptions(
        vision=vision,
        decoder=decoder,
        calibration=kw["calibration"],
        method=kw["calibration_method"],
        percentile=kw["percentile"],
        episodes=kw["calibration_episodes"],
        max_shots=kw["max_shots"],
        decode_steps=kw["decode_steps"],
        seed=kw["seed"],
        block_size=int(kw["block_size"]),
        int4_format=kw["int4_format"],
        int8_mode=kw["int8_mode"],
        fp16_keep=() if keep == ("none",) else keep,
        keep_nodes=tuple(kw["keep_nodes"]),
        quantize_embeddings=not kw["no_quantize_embeddings"],
        calibration_cache=kw["calibration_cache"],
        force=force,
    )
    try:
        options.validate()
    except QuantizeError as e:
        raise click.UsageError(str(e)) from e
    return options


def _slow_on_cpu(manifest: Any) -> list[str]:
    from runtime.engine import slow_on_cpu

    return slow_on_cpu(manifest)


def _progress(message: str) -> None:
    click.echo(f"[flamingo-export] {message}", err=True)


def run_quantize(src: Path, out: Path, options: Any) -> Any:
    """quantize_export with every expected failure turned into a clean CLI error."""
    from exporter.export import ExportError
    from precision.data import CalibrationError
    from precision.quantize import quantize_export
    from runtime.images import ImageError
    from runtime.manifest import ManifestError

    try:
        return quantize_export(src, out, options, progress=_progress)
    except (ExportError, CalibrationError, ManifestError, ImageError) as e:
        raise click.ClickException(str(e)) from e


def export_and_quantize(model: Any, tokenizer: Any, output: Path, options: Any, kw: dict) -> Any:
    """`export --precision`: fp32 export into a scratch folder beside OUT, then quantize into
    OUT (atomically, like every export); plain export when everything is fp32."""
    from exporter.export import export_model, prepare_output

    quant = make_options(kw, options.force)
    if quant.vision == quant.decoder == "fp32":
        return export_model(model, tokenizer, output, options)
    shutil.rmtree(prepare_output(output, options.force))  # OUT replaceable: fail before exporting
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.fp32-", dir=output.absolute().parent))
    try:
        export_model(model, tokenizer, scratch / "fp32", options, progress=_progress)
        return run_quantize(scratch / "fp32", output, quant)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Precision of both graphs (fp16, int8, int4; fp32 copies).",
)
@click.option(
    "--vision-precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Override --precision for the vision graph.",
)
@click.option(
    "--decoder-precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Override --precision for the decoder graph.",
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="New export folder (written atomically).",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result summary as JSON.")
@quant_options
def quantize(export_dir: Path, output: Path, force: bool, as_json: bool, **kw: Any) -> None:
    """Quantize the fp32 export EXPORT_DIR into a new export folder OUTPUT."""
    import json

    options = make_options(kw, force)
    manifest = run_quantize(export_dir, output, options)
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
        "notes": _slow_on_cpu(manifest),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for name, g in summary["graphs"].items():
        click.echo(
            f"{name:<8} {g['precision']:<5} opset {g['opset']:<3} {g['bytes'] / 2**20:>9.2f} MiB"
            f"  {'+'.join(g['backends'])}"
        )  # fmt: skip
    for note in summary["notes"]:
        _progress(f"note: {note}")


PARITY_MODEL_OPTIONS = [
    click.option("--lm", "lm_dir", type=click.Path(path_type=Path), default=None,
                 help="Reference = the PyTorch model: HF LM directory (as for export)."),
    click.option("--vision", "vision_path", type=click.Path(path_type=Path), default=None),
    click.option("--checkpoint", "checkpoint_path", type=click.Path(path_type=Path), default=None),
    click.option("--cross-attn-every-n-layers", type=int, default=None),
    click.option("--preset", default=None),
    click.option("--vision-heads", type=int, default=None),
    click.option("--vision-act", type=click.Choice(["quick_gelu", "gelu"]), default=None),
    click.option("--vision-tokens-after-ln-post", is_flag=True, default=False),
]  # fmt: skip


def _parity_model_options(f: Any) -> Any:
    for option in reversed(PARITY_MODEL_OPTIONS):
        f = option(f)
    return f


@click.command()
@click.argument(
    "exports",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@_parity_model_options
@click.option(
    "--data",
    default="random",
    show_default=True,
    help="Evaluation prompts: a JSONL/folder (as --calibration), 'demo-eval' (the demo "
    "task's held-out set, --max-shots shots each; task accuracy), 'demo' or 'random'.",
)
@click.option("--episodes", type=int, default=8, show_default=True)
@click.option("--max-shots", type=int, default=2, show_default=True)
@click.option(
    "--decode-steps",
    type=int,
    default=16,
    show_default=True,
    help="Teacher-forced decode steps per episode (also the greedy length).",
)
@click.option(
    "--seed",
    type=int,
    default=1234,
    show_default=True,
    help="Episode seed (differs from the calibration default on purpose).",
)
@click.option(
    "--thresholds",
    default=None,
    help="Overrides, e.g. 'top1=0.99,int8.greedy=0.5' (metrics: vision_cosine, "
    "decoder_cosine, pipeline_cosine, top1, greedy, task_delta = candidate minus reference "
    "task accuracy).",
)
@click.option("--json", "as_json", is_flag=True, help="Print every number as JSON.")
@click.option(
    "--report",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a Markdown report (and a PNG plot beside it if matplotlib is installed).",
)
def parity(
    exports: tuple[Path, ...],
    data: str,
    episodes: int,
    max_shots: int,
    decode_steps: int,
    seed: int,
    thresholds: str | None,
    as_json: bool,
    report: Path | None,
    **model_kw: Any,
) -> None:
    """Compare export OUT with REFERENCE: `parity REFERENCE OUT`, or `parity OUT --lm ...
    --vision ... --checkpoint ...` against the PyTorch model. Exits 1 when a threshold is missed.
    """
    from tokenizers import Tokenizer

    from precision.data import CalibrationError, calibration_set
    from precision.parity import OnnxBackend, ParityError, TorchBackend, dumps, run_parity
    from precision.parity import write_report as write_md
    from runtime.images import ImageError
    from runtime.manifest import ManifestError

    torch_ref = any(model_kw[k] is not None for k in ("lm_dir", "vision_path", "checkpoint_path"))
    if torch_ref and len(exports) != 1:
        raise click.UsageError("with --lm/--vision/--checkpoint give only OUT (the candidate)")
    if not torch_ref and len(exports) != 2:
        raise click.UsageError("give REFERENCE and OUT (export folders), or OUT with --lm ...")
    try:
        overrides = _thresholds(thresholds)
        candidate = OnnxBackend(exports[-1])
        if torch_ref:
            missing = [k for k in ("lm_dir", "vision_path", "checkpoint_path") if not model_kw[k]]
            if missing:
                raise click.UsageError(
                    "the PyTorch reference needs --lm, --vision and --checkpoint"
                )
            from cli.main import load_model

            model, _, _ = load_model(**model_kw)
            reference: Any = TorchBackend(model, f"pytorch:{model_kw['lm_dir']}")
        else:
            reference = OnnxBackend(exports[0])
        tokenizer = Tokenizer.from_file(str(exports[-1] / "tokenizer" / "tokenizer.json"))
        episodes_ = calibration_set(
            data, episodes=episodes, max_shots=max_shots, seed=seed, progress=_progress
        ).episodes
        result = run_parity(
            reference, candidate, episodes_, tokenizer, decode_steps=decode_steps,
            overrides=overrides, progress=_progress,
        )  # fmt: skip
    except (ParityError, CalibrationError, ManifestError, ImageError) as e:
        raise click.ClickException(str(e)) from e
    if report is not None:
        write_md(result, report)
        if "plot_note" in result:
            _progress(f"{result['plot_note']}")
    if as_json:
        click.echo(dumps(result))
    else:
        _print_summary(result)
    if result["failures"]:
        _progress("parity FAILED: " + "; ".join(result["failures"]))
        sys.exit(1)


def _thresholds(text: str | None) -> dict[str, dict[str, float]]:
    from precision.parity import parse_thresholds

    return parse_thresholds(text)


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
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--precision", type=click.Choice(["fp16", "int8", "int4"]), required=True)
@click.option(
    "--graph", type=click.Choice(["decoder", "vision"]), default="decoder", show_default=True
)
@click.option(
    "--data", default="random", show_default=True, help="Evaluation prompts (as parity --data)."
)
@click.option("--episodes", type=int, default=4, show_default=True)
@click.option("--eval-decode-steps", type=int, default=4, show_default=True)
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
    help="Automatic mix: the accuracy budget as parity thresholds, e.g. 'top1=0.99' or "
    "'task_delta=-0.01' (with labelled --data); keeps the fewest most-sensitive groups at fp32 "
    "that meet it.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="With --budget: write the chosen mixed-precision export here.",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True)
@quant_options
def sensitivity(
    export_dir: Path,
    precision: str,
    graph: str,
    data: str,
    episodes: int,
    eval_decode_steps: int,
    top: int,
    budget: str | None,
    output: Path | None,
    force: bool,
    as_json: bool,
    **kw: Any,
) -> None:
    """Rank EXPORT_DIR's layers by how much quantizing each alone costs; suggest a keep-list,
    or with --budget pick the cheapest mix that meets it (and write it with -o)."""
    import json

    from exporter.export import ExportError
    from precision.data import CalibrationError
    from precision.sensitivity import Evaluation, auto_mix, keep_list, run_sensitivity
    from runtime.manifest import ManifestError

    if output is not None and budget is None:
        raise click.UsageError("-o/--output needs --budget (the mix it writes is chosen by it)")
    bounds = _thresholds(budget).get(precision, {}) if budget else {}
    if budget and not bounds:
        raise click.UsageError(f"--budget {budget!r} sets no bound for {precision}")
    base = make_options({**kw, "precision": precision}, force=True)
    try:
        evaluation = Evaluation(export_dir, data, episodes, eval_decode_steps)
        result = run_sensitivity(evaluation, graph, precision, base, progress=_progress)
        if bounds:
            result["auto"] = auto_mix(
                evaluation, graph, precision, base, bounds, result, output=output,
                force=force, progress=_progress,
            )  # fmt: skip
    except (ExportError, CalibrationError, ManifestError) as e:
        raise click.ClickException(str(e)) from e
    result["keep_nodes"] = result["auto"]["keep_nodes"] if bounds else keep_list(result, top)
    if as_json:
        click.echo(json.dumps(result, indent=2))
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


def register(main: click.Group) -> None:
    """Add `quantize`, `parity` and `sensitivity` to the `flamingo-export` group."""
    main.add_command(quantize)
    main.add_command(parity)
    main.add_command(sensitivity)
