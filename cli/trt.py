"""TensorRT commands of `flamingo-export`: check, plan, build, trt-run.

Registered on the main group by cli/main.py. TensorRT (and cuda-python) are imported only
inside `build` and `trt-run`; `check` and `plan` need neither (nor torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

LIMIT_OPTIONS = [
    click.option("--max-batch", type=int, default=None,
                 help="Rows per step the engines take (default 1; beam search: the beam count)."),
    click.option("--max-images", type=int, default=None,
                 help="Images per prompt (default: the export's limit; may only be lowered)."),
    click.option("--max-seq-len", type=int, default=None,
                 help="Tokens per row (default: the export's limit; may only be lowered)."),
]  # fmt: skip


def limit_options(f: Any) -> Any:
    for option in reversed(LIMIT_OPTIONS):
        f = option(f)
    return f


EXPORT_DIR = click.argument(
    "export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path)
)


@click.command()
@EXPORT_DIR
@click.option(
    "--trt-version",
    type=click.Choice(["8.5", "8.6", "10"]),
    default="10",
    show_default=True,
    help="TensorRT whose ONNX parser to check against (8.5: JetPack 5.1, 8.6: JetPack 6.0, "
    "10: JetPack 6.1/6.2).",
)
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def check(
    export_dir: Path,
    trt_version: str,
    max_batch: int | None,
    max_images: int | None,
    max_seq_len: int | None,
    as_json: bool,
) -> None:
    """Statically check an export's graphs against TensorRT's ONNX parser (no TensorRT needed).

    Exits 1 when any rule is violated; warnings do not fail.
    """
    from runtime.manifest import ManifestError
    from trt.profiles import ProfileError
    from trt.rules import check_export

    try:
        report = check_export(
            export_dir,
            trt_version,
            max_batch=max_batch,
            max_images=max_images,
            max_seq_len=max_seq_len,
        )
    except (ManifestError, ProfileError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    if not report.ok:
        raise SystemExit(1)


@click.command()
@click.option(
    "--target",
    type=click.Choice(["orin-nano-8gb", "orin-agx-64gb", "x86-gpu"]),
    default="orin-nano-8gb",
    show_default=True,
)
@click.option("--preset", default=None, help="A released OpenFlamingo model (see `presets`).")
@click.option(
    "--export",
    "export_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="An export folder (its manifest's model config).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8", "int4"]),
    default=None,
    help="Weight precision (default: fp16 for a preset, the export's own for --export).",
)
@click.option("--max-batch", type=int, default=None, help="Rows per step (default 1).")
@click.option("--max-images", type=int, default=None, help="Images per prompt (default 32).")
@click.option("--max-seq-len", type=int, default=None, help="Tokens per row (default 2048).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable plan.")
def plan(
    target: str,
    preset: str | None,
    export_dir: Path | None,
    precision: str | None,
    max_batch: int | None,
    max_images: int | None,
    max_seq_len: int | None,
    as_json: bool,
) -> None:
    """Memory plan of a model on a target: weights, KV cache, activations vs usable memory."""
    from trt.plan import PlanError, PlanInputs, plan_export, plan_preset
    from trt.profiles import DEFAULT_MAX_BATCH
    from trt.targets import get_target

    if (preset is None) == (export_dir is None):
        raise click.UsageError("give exactly one of --preset NAME or --export OUT")
    spec = get_target(target)
    try:
        if preset is not None:
            inputs = PlanInputs(
                max_batch or DEFAULT_MAX_BATCH,
                max_images or 32,
                max_seq_len or 2048,
                precision or "fp16",
            )
            result = plan_preset(preset, spec, inputs)
        else:
            from runtime.manifest import ManifestError, load_manifest

            try:
                manifest = load_manifest(export_dir, verify_hashes=False)
            except ManifestError as e:
                raise click.ClickException(str(e)) from e
            own = sorted({g.precision for g in manifest.graphs.values()})[-1]
            inputs = PlanInputs(
                max_batch or DEFAULT_MAX_BATCH,
                max_images or manifest.limits["max_images"],
                max_seq_len or manifest.limits["max_seq_len"],
                precision or own,
            )
            result = plan_export(manifest, str(export_dir), spec, inputs)
    except PlanError as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.format())


@click.command()
@EXPORT_DIR
@click.option(
    "--target",
    type=click.Choice(["orin-nano-8gb", "orin-agx-64gb", "x86-gpu"]),
    default=None,
    help="Workspace limit and expected compute capability (default: 1 GiB workspace).",
)
@limit_options
def build(
    export_dir: Path,
    target: str | None,
    max_batch: int | None,
    max_images: int | None,
    max_seq_len: int | None,
) -> None:
    """Build vision.engine, decoder.engine and engines.json in OUT with TensorRT (on the GPU
    that will run them)."""
    from runtime.manifest import ManifestError
    from trt.build import BuildError, build_engines
    from trt.device import TensorRTUnavailableError
    from trt.profiles import ProfileError

    try:
        build_engines(
            export_dir,
            target=target,
            max_batch=max_batch,
            max_images=max_images,
            max_seq_len=max_seq_len,
            progress=click.echo,
        )
    except (TensorRTUnavailableError, BuildError, ManifestError, ProfileError) as e:
        raise click.ClickException(str(e)) from e


@click.command("trt-run")
@EXPORT_DIR
@click.option("--prompt", required=True, help="Text with one <image> marker per image.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path))
@click.option("--max-new-tokens", type=int, default=20, show_default=True)
@click.option("--num-beams", type=int, default=1, show_default=True)
@click.option(
    "--compare-ort",
    is_flag=True,
    help="Also generate with onnxruntime (CPU) and report token equality and log-prob drift.",
)
@click.option(
    "--allow-other-device",
    is_flag=True,
    help="Accept engines built on another GPU of the same compute capability.",
)
@click.option("--json", "as_json", is_flag=True)
def trt_run(
    export_dir: Path,
    prompt: str,
    images: tuple[Path, ...],
    max_new_tokens: int,
    num_beams: int,
    compare_ort: bool,
    allow_other_device: bool,
    as_json: bool,
) -> None:
    """Generate with the TensorRT engines of OUT (after `build`)."""
    import numpy as np

    from runtime.engines import EngineMismatchError
    from runtime.generation import GenerationConfig
    from runtime.images import ImageError
    from runtime.manifest import ManifestError
    from runtime.pipeline import FlamingoPipeline
    from trt.device import TensorRTUnavailableError
    from trt.engine import TrtFlamingo

    try:
        engine = TrtFlamingo(export_dir, strict_device=not allow_other_device)
        pipe = FlamingoPipeline(export_dir, engine=engine)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            eos_token_ids=(pipe.engine.eoc_token_id,),
            pad_token_id=pipe.engine.pad_token_id,
        )
        out = pipe.generate(prompt, [str(p) for p in images], config)
        result: dict[str, Any] = {"tensorrt": out.to_dict()}
        if compare_ort:
            ref = FlamingoPipeline(export_dir).generate(prompt, [str(p) for p in images], config)
            n = min(len(ref.logprobs), len(out.logprobs))
            drift = np.abs(np.array(ref.logprobs[:n]) - np.array(out.logprobs[:n]))
            result["onnxruntime"] = ref.to_dict()
            result["parity"] = {
                "same_tokens": ref.token_ids == out.token_ids,
                "max_abs_logprob_diff": float(drift.max(initial=0.0)),
            }
    except (
        EngineMismatchError,
        TensorRTUnavailableError,
        ManifestError,
        ImageError,
        ValueError,
    ) as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(out.text)
    if "parity" in result:
        p = result["parity"]
        click.echo(
            f"parity vs onnxruntime: same tokens {p['same_tokens']}, "
            f"max |logprob diff| {p['max_abs_logprob_diff']:.2e}"
        )


COMMANDS = (check, plan, build, trt_run)


def register(group: click.Group) -> click.Group:
    for command in COMMANDS:
        group.add_command(command)
    return group
