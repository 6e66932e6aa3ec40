"""OpenFlamingo prompt templates and few-shot prompt building (pure Python, no torch).

The templates are those of OpenFlamingo's evaluation code
(``open_flamingo/eval/models/open_flamingo.py`` and ``open_flamingo/eval/evaluate.py``)::

    caption demo  <image>Output:{caption}<|endofchunk|>
    caption query <image>Output:
    VQA demo      <image>Question:{question} Short answer:{answer}<|endofchunk|>
    VQA query     <image>Question:{question} Short answer:

Like ``evaluate.py``, demonstrations are concatenated each followed by ``"\\n"`` (the
``demo_separator`` argument), captions are ``.strip()``-ed and VQA text is used as given.
A demonstration whose ``image`` is ``None`` is a text-only demonstration: its ``<image>``
marker is dropped (OpenFlamingo's zero-shot setting keeps demo text without images).

Demonstration and question text must be valid Unicode and must not contain the template's own
markers (``<image>``, ``<|endofchunk|>``): the tokenizer would read them as the special tokens
and one record would silently change the few-shot template's shape. A raw prompt given to the
pipeline is the user's own and keeps its special tokens (it is only checked to be valid Unicode).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .files import read_regular
from .schema import parse_json

__all__ = [
    "EOC_TOKEN",
    "MEDIA_TOKEN",
    "PAD_TOKEN",
    "Demonstration",
    "build_few_shot_prompt",
    "caption_prompt",
    "check_images_match",
    "check_text",
    "count_media",
    "load_demos_jsonl",
    "vqa_prompt",
]

# OpenFlamingo's special tokens (open_flamingo/src/factory.py adds them in the order EOC, media,
# and <PAD> when the LM tokenizer has no pad token).
MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"

Task = Literal["caption", "vqa", "raw"]
_TASKS = ("caption", "vqa", "raw")


@dataclass
class Demonstration:
    """One in-context example: an image (or a clip, ``runtime.video.Video``) plus its caption
    (``text``) or question/answer."""

    image: Any
    text: str | None = None
    question: str | None = None
    answer: str | None = None


def caption_prompt(caption: str | None = None, end_of_chunk: str = EOC_TOKEN) -> str:
    """Caption template; with ``caption=None`` it is the open query the model completes."""
    if caption is None:
        return f"{MEDIA_TOKEN}Output:"
    return f"{MEDIA_TOKEN}Output:{caption}{end_of_chunk}"


def vqa_prompt(question: str, answer: str | None = None, end_of_chunk: str = EOC_TOKEN) -> str:
    """VQA template; with ``answer=None`` it is the open query the model completes."""
    if answer is None:
        return f"{MEDIA_TOKEN}Question:{question} Short answer:"
    return f"{MEDIA_TOKEN}Question:{question} Short answer:{answer}{end_of_chunk}"


# What the templates write around demonstration text, OpenFlamingo's and IDEFICS' (the
# defaults of runtime.idefics.IdeficsPromptFormat): text that holds one would be read as the
# special token and silently change the prompt's structure. BOS/EOS are not among them: an
# EOS inside a demonstration is meaningful (IDEFICS: no image attention until the next image)
# and tokenized as IdeficsProcessor does (tests/runtime/test_idefics.py).
TEMPLATE_MARKERS = (MEDIA_TOKEN, EOC_TOKEN, "<fake_token_around_image>", "<end_of_utterance>")


def check_text(text: Any, what: str, *, markers: bool = True) -> str:
    """`text` if it is a str of valid Unicode, else ValueError naming `what`. With
    ``markers=False`` it must not contain any of TEMPLATE_MARKERS either.

    Valid Unicode means encodable as UTF-8: a lone surrogate (from undecodable bytes in a
    command-line argument, or a ``"\\ud800"`` JSON escape) is refused before tokenizing.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid UTF-8 text: character {e.start} ({text[e.start]!r}) is a lone "
            "surrogate (undecodable bytes, e.g. a non-UTF-8 command-line argument, or a "
            "'\\ud800' escape in JSON)"
        ) from None
    if not markers:
        for marker in TEMPLATE_MARKERS:
            if marker in text:
                raise ValueError(
                    f"{what} must not contain {marker!r}: the template adds the markers "
                    "(the tokenizer would read it as the special token)"
                )
    return text


def _demo_text(demo: Demonstration, index: int, task: str, end_of_chunk: str) -> str:
    where = f"demonstration #{index}"
    if not isinstance(demo, Demonstration):
        raise ValueError(f"{where}: expected a Demonstration, got {type(demo).__name__}")
    fields = {"caption": ("text",), "vqa": ("question", "answer"), "raw": ("text",)}[task]
    missing = [f for f in fields if getattr(demo, f) is None]
    if missing:
        needs = {"caption": "text (the caption)", "vqa": "both question and answer"}
        raise ValueError(f"{where}: task {task!r} needs {needs.get(task, 'text')}")
    for name in fields:
        check_text(getattr(demo, name), f"{where}: {name}", markers=False)
    if task == "caption":
        piece = caption_prompt(demo.text.strip(), end_of_chunk)  # type: ignore[union-attr]
    elif task == "vqa":
        piece = vqa_prompt(demo.question, demo.answer, end_of_chunk)  # type: ignore[arg-type]
    else:  # raw
        piece = f"{MEDIA_TOKEN}{demo.text}{end_of_chunk}"
    if demo.image is None:
        piece = piece.replace(MEDIA_TOKEN, "")
    return piece


def build_few_shot_prompt(
    demos: Sequence[Demonstration],
    query_question: str | None = None,
    task: Task = "caption",
    *,
    query_image: Any = None,
    demo_separator: str = "\n",
    end_of_chunk: str = EOC_TOKEN,
) -> tuple[str, list[Any]]:
    """Build an OpenFlamingo few-shot prompt.

    Returns ``(prompt, images)`` where ``images`` are the demonstration images in prompt
    order, followed by ``query_image`` when given.  The prompt always ends with the query's
    ``<image>`` marker, so without ``query_image`` the caller appends the query image itself
    (``count_media(prompt) == len(images) + 1``).  ``query_question`` is required for
    ``"vqa"``; for ``"raw"`` it is the text after the query's ``<image>`` marker.
    ``end_of_chunk`` ends each demonstration: the export's marker (``FlamingoPipeline.
    end_of_chunk``: ``<|endofchunk|>`` for OpenFlamingo, IDEFICS' own in ``runtime.idefics``).
    """
    if task not in _TASKS:
        raise ValueError(f"task must be one of {list(_TASKS)}, got {task!r}")
    if isinstance(demos, (str, os.PathLike, Demonstration)):
        raise ValueError(
            f"demos must be a list of Demonstration, got {type(demos).__name__} "
            "(load_demos_jsonl reads a JSONL file; wrap a single demonstration in a list)"
        )
    demos = list(demos)
    pieces = [_demo_text(d, i, task, end_of_chunk) + demo_separator for i, d in enumerate(demos)]
    images = [d.image for d in demos if d.image is not None]
    if task == "caption":
        if query_question is not None:
            raise ValueError("query_question is only used with task 'vqa' or 'raw'")
        query = caption_prompt()
    elif task == "vqa":
        if query_question is None:
            raise ValueError("task 'vqa' needs query_question")
        query = vqa_prompt(check_text(query_question, "query_question", markers=False))
    else:
        if query_question is not None:
            check_text(query_question, "query_question", markers=False)
        query = MEDIA_TOKEN + (query_question or "")
    if query_image is not None:
        images.append(query_image)
    return "".join(pieces) + query, images


def count_media(prompt: str) -> int:
    """Number of ``<image>`` markers in ``prompt``."""
    return prompt.count(MEDIA_TOKEN)


def check_images_match(prompt: str, n_images: int) -> None:
    """Raise ValueError unless the prompt has exactly one ``<image>`` marker per image."""
    n_markers = count_media(prompt)
    if n_markers != n_images:
        raise ValueError(
            f"prompt has {n_markers} {MEDIA_TOKEN} marker{'s' if n_markers != 1 else ''} "
            f"but {n_images} image{'s' if n_images != 1 else ''} "
            f"{'was' if n_images == 1 else 'were'} given"
        )


def _opt_str(record: dict[str, Any], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is not None:
        check_text(value, f"{where}: {key!r}", markers=key in ("image", "video"))
    return value


def load_demos_jsonl(path: str | os.PathLike, *, check_exists: bool = True) -> list[Demonstration]:
    """Read demonstrations from a JSONL file, one JSON object per line.

    Each object has ``image`` (a path) or ``video`` (a clip: a video file, an animated image
    or a folder of frame images, read as ``runtime.video.Video`` with the export's frame
    count); relative paths are resolved against the JSONL file's folder, absolute ones are
    kept. And either ``caption`` or ``question`` + ``answer`` (``answers``, a list whose first
    item is used, is accepted as in VQA annotations). Blank lines are skipped.  Errors are
    ValueErrors naming ``file:line``.
    """
    from .video import Video

    file = Path(path)
    try:
        text = read_regular(file).decode("utf-8")
    except OSError as e:
        raise ValueError(f"{file}: cannot read demonstrations file ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e})") from e
    base = file.parent
    demos: list[Demonstration] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        record = parse_json(line, where)
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "image" in record and "video" in record:
            raise ValueError(f"{where}: give 'image' or 'video', not both")
        key = "video" if "video" in record else "image"
        image = _opt_str(record, key, where)
        if not image:
            raise ValueError(f"{where}: missing or empty 'image' (or 'video') path")
        image_path = Path(image)
        if not image_path.is_absolute():
            image_path = base / image_path
        exists = image_path.exists() if key == "video" else image_path.is_file()
        if check_exists and not exists:
            raise ValueError(f"{where}: {key} file not found: {image_path}")
        caption = _opt_str(record, "caption", where)
        question = _opt_str(record, "question", where)
        answer = _opt_str(record, "answer", where)
        if answer is None and "answers" in record:
            answers = record["answers"]
            if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
                raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
            answer = check_text(answers[0], f"{where}: 'answers'[0]", markers=False)
        if caption is None and (question is None or answer is None):
            raise ValueError(f"{where}: needs 'caption' or both 'question' and 'answer'")
        media = Video(str(image_path)) if key == "video" else str(image_path)
        demos.append(Demonstration(image=media, text=caption, question=question, answer=answer))
    return demos
