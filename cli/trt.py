"""`check`, `plan` and `build`: the TensorRT side. `check` needs only onnx, `plan` nothing
heavy; `build` imports TensorRT and cuda-python (the tensorrt extra)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .options import (
    EXPORT_DIR,
    echo_json,
    limit_options,
    needs_extra,
    output_options,
    progress_printer,
    target_option,
    trt_version_option,
    user_errors,
)


@click.command()
@EXPORT_DIR
@trt_version_option
@limit_options(batch=True, lowered=True)
@output_options
@user_errors()
@needs_extra("check")
def check(
    export_dir: Path,
    trt_version: str,
    max_batch: int | None,
    max_images: int | None,
    max_seq_len: int | None,
    max_frames: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Statically check EXPORT_DIR's graphs against TensorRT's ONNX parser (no TensorRT
    needed). Exits 1 when any rule is violated; warnings do not fail."""
    from trt.rules import check_export

    report = check_export(
        export_dir, trt_version, max_batch=max_batch, max_images=max_images,
        max_seq_len=max_seq_len, max_frames=max_frames,
    )  # fmt: skip
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(report.format())
    if not report.ok:
        sys.exit(1)


@click.command()
@target_option(default="orin-nano-8gb")
@click.option("--preset", default=None, help="A released OpenFlamingo model (see `presets`).")
@click.option(
    "--export",
    "export_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="An export folder (its manifest's model config).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8", "int4"]),
    default=None,
    help="Weight precision (default: fp16 for a preset, the export's own for --export).",
)
@limit_options(batch=True, lowered=False, frames=False)
@output_options
@user_errors()
def plan(
    target: str,
    preset: str | None,
    export_dir: Path | None,
    precision: str | None,
    max_batch: int | None,
    max_images: int | None,
    max_seq_len: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Memory plan of a model on a target: weights, KV cache, activations vs usable memory."""
    from runtime.manifest import load_manifest
    from trt.plan import PlanInputs, plan_export, plan_preset
    from trt.profiles import DEFAULT_MAX_BATCH
    from trt.targets import get_target

    if (preset is None) == (export_dir is None):
        raise click.UsageError("give exactly one of --preset NAME or --export EXPORT_DIR")
    spec = get_target(target)
    if preset is not None:
        inputs = PlanInputs(
            max_batch or DEFAULT_MAX_BATCH,
            max_images or 32,
            max_seq_len or 2048,
            precision or "fp16",
        )
        result = plan_preset(preset, spec, inputs)
    else:
        manifest = load_manifest(export_dir, verify_hashes=False)
        own = sorted({g.precision for g in manifest.graphs.values()})[-1]
        inputs = PlanInputs(
            max_batch or DEFAULT_MAX_BATCH,
            max_images or manifest.limits["max_images"],
            max_seq_len or manifest.limits["max_seq_len"],
            precision or own,
        )
        result = plan_export(manifest, str(export_dir), spec, inputs)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(result.format())


@click.command()
@EXPORT_DIR
@target_option(default=None)
@limit_options(batch=True, lowered=True)
@output_options
@user_errors()
def build(
    export_dir: Path,
    target: str | None,
    max_batch: int | None,
    max_images: int | None,
    max_seq_len: int | None,
    max_frames: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Build vision.engine, decoder.engine and engines.json in EXPORT_DIR with TensorRT, on the
    GPU that will run them (default target: 1 GiB workspace, this GPU)."""
    from trt.build import build_engines

    engines = build_engines(
        export_dir, target=target, max_batch=max_batch, max_images=max_images,
        max_seq_len=max_seq_len, max_frames=max_frames, progress=progress_printer(quiet),
    )  # fmt: skip
    if as_json:
        echo_json(engines.to_dict())
    else:
        for name, entry in engines.engines.items():
            click.echo(f"{name:<8} {entry.file}")


COMMANDS = (check, plan, build)
