"""Option groups shared by the `flamingo-export` commands, each flag declared once.

A command composes the groups it needs (as Polygraphy composes argument groups), so a flag
name means the same thing in every command: the README's flag glossary lists them. Library
code never sees click: commands turn the parsed values into the libraries' option objects.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from runtime.errors import FlamingoExportError
from runtime.manifest import PRECISIONS

Decorator = Callable[[Any], Any]


def compose(*options: Decorator) -> Decorator:
    """One decorator applying `options` in the order they are listed (first = first in help)."""

    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


# ------------------------------------------------------------------ output


def output_options(f: Any) -> Any:
    """`--json` (machine-readable stdout) and `-q/--quiet` (no progress on stderr)."""
    f = click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")(f)
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


def progress_printer(quiet: bool, prefix: str = "flamingo-export") -> Callable[[str], None]:
    """A progress callback for the libraries: one line on stderr per message (none if quiet)."""

    def say(message: str) -> None:
        if not quiet:
            click.echo(f"[{prefix}] {message}", err=True)

    return say


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) as None: JSON has no such numbers, and
    Python's bare `NaN` / `Infinity` literals break strict parsers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def echo_json(value: Any) -> None:
    """`value` as strict JSON (never NaN or Infinity) on stdout."""
    click.echo(json.dumps(json_safe(value), indent=2, allow_nan=False))


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (NaN passes every range comparison):
    the type of every float option."""

    def _describe_range(self) -> str:
        """What --help shows in brackets: the bounds, or "finite" when there are none."""
        if self.min is None and self.max is None:
            return "finite"
        return super()._describe_range()

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def check_output_file(path: Path, option: str) -> Path:
    """Refuse, before any slow work, an output file `path` given by `option` that could not be
    written at the end: no file name, an existing folder or other non-regular file, a missing
    parent folder, or one this process may not write. click.BadParameter naming the option."""
    import os

    def bad(why: str) -> click.BadParameter:
        return click.BadParameter(f"{str(path)!r}: {why}", param_hint=option)

    if not str(path) or not path.name or path.name in (".", ".."):
        raise bad("expected a file name")
    if path.is_dir():
        raise bad("is a folder; expected a file name")
    if path.exists() and not path.is_file():
        raise bad("exists and is not a regular file")
    parent = path.parent
    if not parent.is_dir():
        raise bad(f"its folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise bad(f"its folder {str(parent)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise bad("exists and is not writable")
    return path


def user_errors(*also: type[Exception]) -> Decorator:
    """Print every user-facing error (runtime.errors.FlamingoExportError, and the `also`
    types) as one line and exit 1, instead of a traceback."""

    def decorate(f: Any) -> Any:
        caught = (FlamingoExportError, *also)

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return f(*args, **kwargs)
            except caught as e:
                raise click.ClickException(str(e)) from e

        return wrapper

    return decorate


def parse_shots(_ctx: Any, _param: Any, value: str) -> tuple[int, ...]:
    """`--shots` callback: comma-separated non-negative demonstration counts."""
    try:
        shots = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not shots or any(k < 0 for k in shots):
        raise click.BadParameter(f"expected non-negative integers, got {value!r}")
    return shots


# What each extra brings that commands import (pyproject.toml [project.optional-dependencies]).
EXTRA_MODULES = {
    "export": ("torch", "transformers", "safetensors", "onnx"),
    "check": ("onnx",),
}


# Flags renamed in the restructure (README, "Flags"): command -> old flag -> new flag. click's
# own "Did you mean" finds only close spellings (parity --seed -> --episode-seed), not these.
_CALIBRATION_RENAMES = {
    "--seed": "--calibration-seed",
    "--max-shots": "--calibration-max-shots",
    "--decode-steps": "--calibration-decode-steps",
}
RENAMED_FLAGS: dict[str, dict[str, str]] = {
    "quantize": _CALIBRATION_RENAMES,
    "export": _CALIBRATION_RENAMES,
    "sensitivity": {"--seed": "--calibration-seed", "--eval-decode-steps": "--decode-steps"},
    "parity": {"--seed": "--episode-seed"},
    "bench": {"--new-tokens": "--max-new-tokens"},
}


def suggest_renamed_flag(error: click.NoSuchOption) -> None:
    """Point a refused old flag name to its new name (click prints "Did you mean ...?")."""
    command = error.ctx.info_name if error.ctx is not None else None
    new = RENAMED_FLAGS.get(command or "", {}).get(error.option_name)
    if new is not None:
        error.possibilities = [new]


class MissingExtraError(FlamingoExportError):
    """A command needs modules of an extra that is not installed."""


def require_extra(extra: str, command: str, modules: Sequence[str] | None = None) -> None:
    """MissingExtraError saying which extra to install when any of its modules (or `modules`)
    cannot be imported here (absent, or broken, e.g. built for another numpy)."""
    missing = []
    for name in modules if modules is not None else EXTRA_MODULES[extra]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"`flamingo-export {command}` needs the '{extra}' extra, which is not installed "
            f"here (cannot import {', '.join(missing)}): pip install 'flamingo-export[{extra}]'"
        )


def needs_extra(extra: str) -> Decorator:
    """Check `extra` is installed before the command runs (place under `user_errors`)."""

    def decorate(f: Any) -> Any:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            require_extra(extra, click.get_current_context().info_name or f.__name__)
            return f(*args, **kwargs)

        return wrapper

    return decorate


class DerivedHelpOption(click.Option):
    """An option whose help text is computed when --help asks for it (`help_from`), so it can
    come from a table whose module needs an extra (an ImportError: `help` stays as given)."""

    def __init__(self, *args: Any, help_from: Callable[[], str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help_from = help_from

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        with contextlib.suppress(ImportError):
            self.help = self.help_from()
        return super().get_help_record(ctx)


EXPORT_DIR = click.argument(
    "export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path)
)


# ------------------------------------------------------------------ model files


def model_options(required: bool = True) -> Decorator:
    """The files of a Flamingo model and what the loader cannot read from them: an
    OpenFlamingo model is --lm, --vision and --checkpoint; an HF IDEFICS folder is --model.
    `required`: one of the two must be given (checked by `load_model`)."""
    what = "" if required else " (the PyTorch model, for a reference)"
    return compose(
        click.option("--model", "model_dir", default=None, type=click.Path(path_type=Path),
                     help=f"HF IDEFICS folder (config.json model_type idefics, weights, "
                          f"tokenizer, preprocessor_config.json){what}."),
        click.option("--lm", "lm_dir", default=None,
                     type=click.Path(path_type=Path),
                     help=f"HF language model directory (config.json, weights, tokenizer){what}."),
        click.option("--vision", "vision_path", default=None,
                     type=click.Path(path_type=Path),
                     help="open_clip CLIP state dict (.safetensors/.pt) or an HF CLIP directory."),
        click.option("--checkpoint", "checkpoint_path", default=None,
                     type=click.Path(path_type=Path),
                     help="OpenFlamingo checkpoint.pt (or .safetensors)."),
        click.option("--cross-attn-every-n-layers", type=int, default=None,
                     help="Cross-attention interval (default: inferred from the checkpoint)."),
        click.option("--preset", default=None,
                     help="A released OpenFlamingo model (see `presets`)."),
        click.option("--vision-heads", type=int, default=None,
                     help="Vision attention heads (open_clip files have no config; default "
                          "width/64)."),
        click.option("--vision-act", type=click.Choice(["quick_gelu", "gelu"]), default=None,
                     help="Vision MLP activation (default quick_gelu: OpenAI CLIP weights)."),
        click.option("--vision-tokens-after-ln-post", is_flag=True, default=False,
                     help="Apply ln_post to the patch tokens (open_clip >= 2.23); default: "
                          "before ln_post, as the released checkpoints were trained."),
    )  # fmt: skip


MODEL_KEYS = (
    "model_dir",
    "lm_dir",
    "vision_path",
    "checkpoint_path",
    "cross_attn_every_n_layers",
    "preset",
    "vision_heads",
    "vision_act",
    "vision_tokens_after_ln_post",
)
MODEL_FILE_KEYS = ("model_dir", "lm_dir", "vision_path", "checkpoint_path")
OPENFLAMINGO_FILE_KEYS = ("lm_dir", "vision_path", "checkpoint_path")
# options that describe OpenFlamingo files only (an IDEFICS config.json says all of it)
OPENFLAMINGO_ONLY = ("cross_attn_every_n_layers", "vision_heads", "vision_act",
                     "vision_tokens_after_ln_post")  # fmt: skip


def pop_model_args(kw: dict[str, Any]) -> dict[str, Any]:
    """Take the model options out of a command's keyword arguments."""
    return {k: kw.pop(k) for k in MODEL_KEYS}


def model_named(model: dict[str, Any]) -> bool:
    """Whether any model file was named."""
    return any(model[k] is not None for k in MODEL_FILE_KEYS)


def require_model_files(model: dict[str, Any]) -> None:
    """Either --model (IDEFICS) alone, or all of --lm, --vision and --checkpoint."""
    named = [k for k in OPENFLAMINGO_FILE_KEYS if model[k] is not None]
    if model.get("model_dir") is not None:
        extra = named + [k for k in OPENFLAMINGO_ONLY if model.get(k)]
        if extra:
            flags = ", ".join("--" + k.removesuffix("_dir").removesuffix("_path")
                              .replace("_", "-") for k in extra)  # fmt: skip
            raise click.UsageError(f"--model (an IDEFICS folder) does not take {flags}")
        return
    if len(named) != len(OPENFLAMINGO_FILE_KEYS):
        raise click.UsageError(
            "the PyTorch model needs --lm, --vision and --checkpoint (or --model DIR, IDEFICS)"
        )


def load_model(
    model: dict[str, Any], say: Callable[[str], None] | None = None
) -> tuple[Any, Any, Any]:
    """`flamingo.loaders.load_flamingo` on the model options: (model, tokenizer, report);
    `say` gets each value the files did not say and the loader assumed (with its flag)."""
    require_extra("export", click.get_current_context().info_name or "export")
    require_model_files(model)
    if model.get("model_dir") is not None:
        from flamingo.idefics import load_idefics

        loaded = load_idefics(model["model_dir"], preset=model["preset"])
    else:
        from flamingo.loaders import load_flamingo

        loaded = load_flamingo(
            model["lm_dir"],
            model["vision_path"],
            model["checkpoint_path"],
            cross_attn_every_n_layers=model["cross_attn_every_n_layers"],
            preset=model["preset"],
            vision_heads=model["vision_heads"],
            vision_act=model["vision_act"],
            vision_tokens_after_ln_post=model["vision_tokens_after_ln_post"],
        )
    for line in loaded[2].lines() if say is not None else ():
        say(line)
    return loaded


# ------------------------------------------------------------------ limits


def limit_options(
    *, batch: bool, lowered: bool, seq_default: str = "2048", frames: bool = True
) -> Decorator:
    """`--max-images`, `--max-seq-len` (and `--max-batch`, `--max-frames`): the shapes graphs
    or engines are made for. `lowered`: the default is the export's own, and values may only
    lower it."""
    suffix = " (default: the export's; may only be lowered)" if lowered else ""
    options = [
        click.option("--max-images", type=click.IntRange(min=1), default=None,
                     help=f"Most media items (images or clips) per prompt"
                          f"{suffix or ' (default 32)'}."),
        click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
                     help=f"Most tokens per row, prompt + generated"
                          f"{suffix or f' (default {seq_default})'}."),
    ]  # fmt: skip
    if frames:
        options.append(
            click.option("--max-frames", type=click.IntRange(min=1), default=None,
                         help="Most frames per video clip" + (suffix or " (default: the "
                              "checkpoint's frame embeddings, max_num_frames; 1 without "
                              "them: images only)") + "."),
        )  # fmt: skip
    if batch:
        options.insert(
            0,
            click.option(
                "--max-batch",
                type=click.IntRange(min=1),
                default=None,
                help="Most rows per decoder step (default 1; beam search: the beam count).",
            ),
        )
    return compose(*options)


# ------------------------------------------------------------------ precision


def precision_options(default: str | None) -> Decorator:
    """`--precision` for both graphs, with per-graph overrides."""
    return compose(
        click.option("--precision", type=click.Choice(PRECISIONS), default=default,
                     show_default=default is not None,
                     help="Precision of both graphs (fp32, fp16, int8, int4)."),
        click.option("--vision-precision", type=click.Choice(PRECISIONS), default=None,
                     help="Override --precision for the vision graph."),
        click.option("--decoder-precision", type=click.Choice(PRECISIONS), default=None,
                     help="Override --precision for the decoder graph."),
    )  # fmt: skip


def quantize_options(f: Any) -> Any:
    """How a graph is quantized, and the int8 calibration data (all `--calibration-*`)."""
    return compose(
        click.option("--calibration", default="random", show_default=True,
                     help="int8 calibration data: a JSONL of {image, caption} / {image, "
                          "question, answer} (or a folder holding one), 'demo' (the demo task), "
                          "'demo-video' (its clips) or 'random'."),
        click.option("--calibration-method",
                     type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
                     show_default=True, help="int8 activation range estimator."),
        click.option("--percentile", type=FiniteFloatRange(50, 100, min_open=True),
                     default=99.999, show_default=True,
                     help="Percentile kept by --calibration-method percentile."),
        click.option("--calibration-episodes", type=int, default=16, show_default=True,
                     help="Few-shot prompts run for calibration."),
        click.option("--calibration-max-shots", type=int, default=2, show_default=True,
                     help="Most demonstrations per calibration prompt."),
        click.option("--calibration-decode-steps", type=int, default=8, show_default=True,
                     help="Greedy decode steps calibrated after each prefill (real KV states)."),
        click.option("--calibration-seed", type=int, default=0, show_default=True,
                     help="Seed of the calibration episodes."),
        click.option("--calibration-cache", default=None,
                     help="int8 ranges file prefix: written after calibrating, reused when "
                          "present (re-quantize with another keep-list without calibrating)."),
        click.option("--int8-mode", type=click.Choice(["w8a8", "weight-only", "dynamic"]),
                     default="w8a8",
                     show_default=True,
                     help="w8a8: calibrated int8 activations and weights (TensorRT int8 GEMMs); "
                          "weight-only: int8 weights, float activations, no calibration (fast "
                          "memory-bound decode on onnxruntime CPU; TensorRT 10); dynamic: "
                          "onnxruntime's dynamic quantization, activations quantized at run "
                          "time (int8 GEMMs for vision and prefill on CPU; onnxruntime only)."),
        click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="128",
                     show_default=True, help="int4 block size (weights per scale)."),
        click.option("--int4-format", type=click.Choice(["qdq", "matmulnbits"]), default="qdq",
                     show_default=True,
                     help="qdq: blocked DequantizeLinear, opset 21 (TensorRT 10+ and "
                          "onnxruntime); matmulnbits: onnxruntime's MatMulNBits contrib op "
                          "(onnxruntime only)."),
        click.option("--fp16-keep", default="norm", show_default=True,
                     help="What fp16 graphs keep in fp32: comma list of norm, softmax, logits, "
                          "or 'none'."),
        click.option("--keep-node", "keep_nodes", multiple=True,
                     help="Node-name glob kept at fp32 (repeatable): a mixed-precision "
                          "keep-list."),
        click.option("--no-quantize-embeddings", is_flag=True,
                     help="Keep embedding tables (and a tied LM head) fp32 in int8/int4 graphs."),
    )(f)  # fmt: skip


def make_quantize_options(kw: dict[str, Any], force: bool = False) -> Any:
    """`precision.quantize.QuantizeOptions` from the precision and quantize options (validated,
    so bad values fail before any slow work). Pops the values it uses from `kw`."""
    from precision.quantize import QuantizeError, QuantizeOptions

    precision = kw.pop("precision", None)
    vision = kw.pop("vision_precision", None) or precision
    decoder = kw.pop("decoder_precision", None) or precision
    if vision is None or decoder is None:
        raise click.UsageError(
            "give --precision, or both --vision-precision and --decoder-precision"
        )
    keep = tuple(k.strip() for k in kw.pop("fp16_keep").split(",") if k.strip())
    options = QuantizeOptions(
        vision=vision,
        decoder=decoder,
        calibration=kw.pop("calibration"),
        method=kw.pop("calibration_method"),
        percentile=kw.pop("percentile"),
        episodes=kw.pop("calibration_episodes"),
        max_shots=kw.pop("calibration_max_shots"),
        decode_steps=kw.pop("calibration_decode_steps"),
        seed=kw.pop("calibration_seed"),
        block_size=int(kw.pop("block_size")),
        int4_format=kw.pop("int4_format"),
        int8_mode=kw.pop("int8_mode"),
        fp16_keep=() if keep == ("none",) else keep,
        keep_nodes=tuple(kw.pop("keep_nodes")),
        quantize_embeddings=not kw.pop("no_quantize_embeddings"),
        calibration_cache=kw.pop("calibration_cache"),
        force=force,
    )
    try:
        options.validate()
    except QuantizeError as e:
        raise click.UsageError(str(e)) from e
    return options


# ------------------------------------------------------------------ evaluation data


def evaluation_options(episodes: int, decode_steps: int) -> Decorator:
    """The prompts a quantized export is judged on (parity, sensitivity)."""
    return compose(
        click.option("--data", default="random", show_default=True,
                     help="Evaluation prompts: a JSONL/folder (as --calibration), 'demo-eval' "
                          "(the demo task's held-out set, --max-shots shots each; task "
                          "accuracy), 'demo-video-eval' (the same with clips), 'demo', "
                          "'demo-video' or 'random'."),
        click.option("--episodes", type=int, default=episodes, show_default=True,
                     help="Evaluation episodes."),
        click.option("--max-shots", type=int, default=2, show_default=True,
                     help="Most demonstrations per evaluation prompt (demo-eval, "
                     "demo-video-eval: exactly)."),
        click.option("--decode-steps", type=int, default=decode_steps, show_default=True,
                     help="Teacher-forced decode steps per evaluation episode (also the greedy "
                          "length)."),
        click.option("--episode-seed", type=int, default=1234, show_default=True,
                     help="Seed of the evaluation episodes (differs from the calibration "
                          "default on purpose)."),
    )  # fmt: skip


# ------------------------------------------------------------------ generation and engines


def generation_options(f: Any) -> Any:
    """The search: HF `generate`'s names and meanings."""
    return compose(
        click.option("--max-new-tokens", type=int, default=20, show_default=True,
                     help="Most tokens generated per answer."),
        click.option("--num-beams", type=int, default=1, show_default=True,
                     help="Beam search width (HF's num_beams); 1 = greedy or sampling."),
        click.option("--length-penalty", type=FiniteFloatRange(), default=1.0, show_default=True,
                     help="Beam scores divided by length ** this (HF's length_penalty)."),
        click.option("--do-sample", is_flag=True, help="Sample instead of greedy/beam argmax."),
        click.option("--temperature", type=FiniteFloatRange(0), default=1.0,
                     show_default=True),
        click.option("--top-k", type=int, default=50, show_default=True, help="0 = off."),
        click.option("--top-p", type=FiniteFloatRange(0, 1), default=1.0,
                     show_default=True),
        click.option("--seed", type=int, default=None,
                     help="Sampling seed (the same seed gives the same answer)."),
        click.option("--no-repeat-ngram-size", type=int, default=0, show_default=True),
    )(f)  # fmt: skip


GENERATION_KEYS = (
    "max_new_tokens",
    "num_beams",
    "length_penalty",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "no_repeat_ngram_size",
)

ENGINES = ("onnxruntime", "tensorrt")
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def spinning_option(f: Any) -> Any:
    """`--allow-spinning/--no-allow-spinning`: onnxruntime's `session.intra_op.allow_spinning`
    for every graph's session (the vision graph never spins: runtime.engine.NO_SPIN_GRAPHS)."""
    return click.option(
        "--allow-spinning/--no-allow-spinning", "allow_spinning", default=True, show_default=True,
        help="onnxruntime's intra-op workers spin between parallel regions while idle (its "
             "session.intra_op.allow_spinning): fastest on cores of your own; "
             "--no-allow-spinning on a loaded or shared machine, where a spinning worker burns "
             "the time slices the next step needs.",
    )(f)  # fmt: skip


def engine_options(f: Any) -> Any:
    """Which runtime executes the graphs, and how."""
    return compose(
        click.option("--engine", type=click.Choice(ENGINES), default="onnxruntime",
                     show_default=True,
                     help="The runtime that executes the graphs: onnxruntime (the ONNX files) "
                          "or tensorrt (the engines `build` wrote; needs the tensorrt extra and "
                          "a GPU)."),
        click.option("--provider", "providers", multiple=True,
                     help="onnxruntime execution provider, in priority order (repeatable; cpu, "
                          "cuda, tensorrt or a full name; default cpu). Only with --engine "
                          "onnxruntime."),
        click.option("--threads", type=click.IntRange(min=0), default=None,
                     help="Intra-op threads (default or 0: onnxruntime's, all cores)."),
        spinning_option,
        click.option("--allow-other-device", is_flag=True,
                     help="--engine tensorrt: accept engines built on another GPU of the same "
                          "compute capability."),
    )(f)  # fmt: skip


def provider_names(providers: Sequence[str]) -> list[str]:
    return [PROVIDER_ALIASES.get(p.lower(), p) for p in providers] or ["CPUExecutionProvider"]


def open_pipeline(
    export_dir: Path,
    engine: str,
    providers: Sequence[str],
    threads: int | None,
    allow_other_device: bool,
    say: Callable[[str], None],
    allow_spinning: bool = True,
    **pipeline_kw: Any,
) -> Any:
    """A `runtime.pipeline.FlamingoPipeline` on the chosen engine; runtime warnings (e.g. an
    export made for TensorRT that is slow on this provider) go to `say`. `allow_spinning`:
    onnxruntime's (`spinning_option`); TensorRT has no such setting."""
    import warnings

    from runtime.pipeline import FlamingoPipeline

    if engine == "tensorrt" and providers:
        raise click.UsageError(
            "--provider is onnxruntime's: it does not apply to --engine tensorrt"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        if engine == "tensorrt":
            from trt.engine import TrtFlamingo

            trt_engine = TrtFlamingo(export_dir, strict_device=not allow_other_device)
            pipe = FlamingoPipeline(export_dir, engine=trt_engine, **pipeline_kw)
        else:
            pipe = FlamingoPipeline(
                export_dir,
                providers=provider_names(providers),
                threads=threads,
                allow_spinning=allow_spinning,
                **pipeline_kw,
            )
    for w in caught:
        say(f"note: {w.message}")
    return pipe


def trt_version_option(f: Any) -> Any:
    from trt.targets import TRT_VERSIONS

    return click.option(
        "--trt-version",
        type=click.Choice(list(TRT_VERSIONS)),
        default=TRT_VERSIONS[-1],
        show_default=True,
        help="TensorRT whose ONNX parser to check against (8.5: JetPack 5.1, 8.6: JetPack 6.0, "
        "10: JetPack 6.1/6.2).",
    )(f)


def target_option(default: str | None) -> Decorator:
    from trt.targets import TARGETS

    return click.option(
        "--target",
        type=click.Choice(list(TARGETS)),
        default=default,
        show_default=default is not None,
        help="Device the engines are for (memory, compute capability, workspace).",
    )
