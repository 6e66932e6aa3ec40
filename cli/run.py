"""`run`: generate from an export folder, on onnxruntime (base install, no torch) or TensorRT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .options import (
    EXPORT_DIR,
    GENERATION_KEYS,
    echo_json,
    engine_options,
    generation_options,
    open_pipeline,
    output_options,
    progress_printer,
    user_errors,
)

MEDIA_OPTIONS = ("images", "videos")


class MediaOrderCommand(click.Command):
    """A command that records the command-line order of its --image and --video values
    (click collects each option's values separately) in `ctx.meta["media_order"]`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _, _, order = self.make_parser(ctx).parse_args(args=list(args))
        ctx.meta["media_order"] = [p.name for p in order if p.name in MEDIA_OPTIONS]
        return super().parse_args(ctx, args)


def media_in_order(images: tuple[Path, ...], videos: list[Any]) -> list[Any]:
    """--image and --video values merged in the order they were given on the command line."""
    order = click.get_current_context().meta.get("media_order")
    if order is None or len(order) != len(images) + len(videos):  # called outside click
        order = ["images"] * len(images) + ["videos"] * len(videos)
    sources = {"images": iter(str(p) for p in images), "videos": iter(videos)}
    return [next(sources[name]) for name in order]


@click.command(cls=MediaOrderCommand)
@EXPORT_DIR
@click.option(
    "--prompt",
    default=None,
    help="Text with one <image> marker per image or clip (instead of --demos/--task).",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Image file, once per <image> marker; images and clips (--video) fill the markers "
    "in command-line order; with --demos or --task: the one query image.",
)
@click.option(
    "--video",
    "videos",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Video clip, once per <image> marker like --image: a video file (the 'video' extra, "
    "PyAV), an animated GIF or a folder of frame images (sorted by name); with --demos or "
    "--task: the one query clip.",
)
@click.option(
    "--num-frames",
    type=click.IntRange(min=1),
    default=None,
    help="Frames sampled uniformly from every clip (default: the export's max_frames).",
)
@click.option(
    "--demos",
    type=click.Path(path_type=Path),
    default=None,
    help="Few-shot demonstrations, JSONL: {image, caption} or {image, question, "
    "answer} per line, {video, ...} for a clip (paths relative to the file).",
)
@click.option(
    "--task",
    type=click.Choice(["caption", "vqa"]),
    default=None,
    help="Few-shot template (default caption).",
)
@click.option("--question", default=None, help="The query's question (--task vqa).")
@generation_options
@engine_options
@click.option(
    "--compare-ort",
    is_flag=True,
    help="--engine tensorrt: also generate with onnxruntime (CPU) and report token "
    "equality and log-prob drift.",
)
@click.option(
    "--stream",
    is_flag=True,
    help="Print text as tokens are chosen (beam search: at the end; with --json: to stderr).",
)
@output_options
@user_errors(ValueError)  # the runtime's prompt and setting checks
def run(
    export_dir: Path,
    prompt: str | None,
    images: tuple[Path, ...],
    videos: tuple[Path, ...],
    num_frames: int | None,
    demos: Path | None,
    task: str | None,
    question: str | None,
    engine: str,
    providers: tuple[str, ...],
    threads: int | None,
    allow_spinning: bool,
    allow_other_device: bool,
    compare_ort: bool,
    stream: bool,
    as_json: bool,
    quiet: bool,
    **kw: Any,
) -> None:
    """Generate from EXPORT_DIR: --prompt with its images and clips, or a few-shot query
    ([--demos FILE] [--task caption|vqa] [--question Q] --image QUERY | --video QUERY).

    --engine says which runtime executes the graphs (onnxruntime, or the TensorRT engines of
    `build`); --provider picks onnxruntime's execution provider.
    """
    import warnings

    from runtime.pipeline import TextStream
    from runtime.prompts import check_text, load_demos_jsonl
    from runtime.video import Video

    for flag, text in (("--prompt", prompt), ("--question", question)):
        if text is not None:  # argv bytes that are not UTF-8 arrive as lone surrogates
            check_text(text, flag)
    if prompt is not None and (demos is not None or task is not None or question is not None):
        raise click.UsageError("--prompt cannot be combined with --demos, --task or --question")
    if task == "vqa" and question is None:
        raise click.UsageError("--task vqa needs --question (the query's question)")
    if question is not None and prompt is None and task != "vqa":
        raise click.UsageError("--question is only used with --task vqa")
    if prompt is None and len(images) + len(videos) != 1:
        raise click.UsageError(
            "a few-shot query needs exactly one --image or --video (the query), got "
            f"{len(images) + len(videos)}; or give --prompt"
        )
    if num_frames is not None and not videos and demos is None:
        raise click.UsageError("--num-frames samples the frames of clips; no --video given")
    if compare_ort and engine != "tensorrt":
        raise click.UsageError("--compare-ort compares --engine tensorrt with onnxruntime")
    say = progress_printer(quiet)
    search = {k: kw.pop(k) for k in GENERATION_KEYS}
    pipe = open_pipeline(
        export_dir, engine, providers, threads, allow_other_device, say, allow_spinning
    )
    with warnings.catch_warnings(record=True) as caught:  # e.g. --temperature without sampling
        warnings.simplefilter("always", UserWarning)
        config = pipe.default_config(**search)
    for w in caught:
        say(f"note: {w.message}")
    streamer = TextStream(pipe.tokenizer, config.eos_token_ids) if stream else None

    def on_token(row: int, token_id: int) -> None:
        if streamer is not None and row == 0:
            click.echo(streamer.push(token_id), nl=False, err=as_json)

    few_shot = prompt is None
    media = media_in_order(images, [Video(str(p), num_frames) for p in videos])
    if few_shot:
        examples = load_demos_jsonl(demos) if demos is not None else []
        clips = [d for d in examples if isinstance(d.image, Video)]
        if num_frames is not None and not videos and not clips:
            raise click.UsageError(
                f"--num-frames samples the frames of clips; neither --video nor {demos} gives one"
            )
        for d in clips:
            d.image = Video(d.image.source, num_frames)
        if not as_json and not quiet:  # what the answer is conditioned on (stdout = answer)
            _echo_few_shot(examples, media[0], question)
        prompt, media = pipe.few_shot_prompt(examples, question, task or "caption", media[0])
    out = pipe.generate(prompt, media, config, on_token if stream else None)
    if streamer is not None:
        click.echo(streamer.flush(), err=as_json)
    result = out.to_dict()
    if few_shot:
        result["demonstrations"] = [_demo_dict(d) for d in examples]
        result["query_video" if videos else "query_image"] = str(media[-1])
    if compare_ort:
        compared = _compare_with_onnxruntime(export_dir, prompt, media, config, out)
        result = {"tensorrt": result, **compared}
    if as_json:
        echo_json(result)
        return
    if streamer is None:
        click.echo(out.text)
    if compare_ort:
        p = result["parity"]
        click.echo(
            f"parity vs onnxruntime: same tokens {p['same_tokens']}, "
            f"max |logprob diff| {p['max_abs_logprob_diff']:.2e}"
        )


def _compare_with_onnxruntime(
    export_dir: Path, prompt: str, media: list[Any], config: Any, out: Any
) -> dict[str, Any]:
    """The same request on onnxruntime (CPU): its generation, and how far TensorRT's is."""
    import numpy as np

    from runtime.pipeline import FlamingoPipeline

    ref = FlamingoPipeline(export_dir).generate(prompt, media, config)
    n = min(len(ref.logprobs), len(out.logprobs))
    drift = np.abs(np.array(ref.logprobs[:n]) - np.array(out.logprobs[:n]))
    return {
        "onnxruntime": ref.to_dict(),
        "parity": {
            "same_tokens": ref.token_ids == out.token_ids,
            "max_abs_logprob_diff": float(drift.max(initial=0.0)),
        },
    }


def _demo_dict(demo: Any) -> dict[str, str]:
    from runtime.video import Video

    fields = {"text": demo.text, "question": demo.question, "answer": demo.answer}
    kind = "video" if isinstance(demo.image, Video) else "image"
    return {kind: str(demo.image), **{k: v for k, v in fields.items() if v is not None}}


def _echo_few_shot(examples: list[Any], query: Any, question: str | None) -> None:
    click.echo(f"{len(examples)} demonstration(s):", err=True)
    for d in examples:
        said = d.text if d.text is not None else f"Q: {d.question} A: {d.answer}"
        click.echo(f"  {d.image} -> {said}", err=True)
    click.echo(f"query: {query}" + (f"  Q: {question}" if question else ""), err=True)
    click.echo("answer:", err=True)


@click.command("trt-run", hidden=True, context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def trt_run(args: tuple[str, ...]) -> None:
    """Replaced by `run --engine tensorrt`."""
    raise click.UsageError(
        "`trt-run` is now `run --engine tensorrt` (same options; --compare-ort and "
        "--allow-other-device included)"
    )


COMMANDS = (run, trt_run)
