"""Calibration sets: few-shot prompts shaped like real use, with their images.

Quantization ranges are only as good as the activations they are measured on, so calibration
prompts look like what the runtime will see: OpenFlamingo few-shot prompts (demonstrations
``<image>Output:{caption}<|endofchunk|>`` or the VQA template, then an open query), 0 to
``max_shots`` demonstrations each, from a JSONL ``DATA`` file, ``random`` synthetic images or
the demo task (``demo`` to calibrate, ``demo-eval`` to measure; with clips instead of images,
``demo-video`` and ``demo-video-eval``): see ``calibration_set``. Every episode carries its
query's label (caption, VQA answer, demo answer) for task accuracy.
Everything is a pure function of ``seed`` (``random.Random`` seeded with strings).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from demo import task as demo_task
from runtime.errors import FlamingoExportError
from runtime.images import ImageError, load_image
from runtime.prompts import Demonstration, build_few_shot_prompt, load_demos_jsonl
from runtime.video import Video

Progress = Callable[[str], None]

SOURCES = ("random", "demo", "demo-eval", "demo-video", "demo-video-eval")  # or a DATA path
_COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 25),
    "black": (20, 20, 20),
    "orange": (240, 130, 20),
}
_SHAPES = ("circle", "square", "bar")
_COUNTS = ("one", "two", "three")


class CalibrationError(FlamingoExportError, ValueError):
    """The calibration data cannot be used (empty, unreadable, nothing decodes, ...)."""


@dataclass(frozen=True)
class Item:
    """One decoded image with its caption or question/answer."""

    image: Image.Image
    caption: str | None = None
    question: str | None = None
    answer: str | None = None

    @property
    def task(self) -> str:
        return "caption" if self.caption is not None else "vqa"

    def demonstration(self) -> Demonstration:
        return Demonstration(self.image, self.caption, self.question, self.answer)


@dataclass(frozen=True)
class Episode:
    """A few-shot prompt (demonstrations + open query) and its images in prompt order."""

    prompt: str
    images: tuple[Any, ...]  # media items: images or clips (runtime.video.Video)
    task: str
    shots: int
    answer: str | None = None  # the query's label (caption or VQA answer), for task accuracy


@dataclass
class CalibrationSet:
    """Episodes plus where they came from (recorded in the quantized export's manifest)."""

    source: str
    episodes: list[Episode]
    seed: int
    items: int = 0  # usable records (DATA / random); 0 for demo
    skipped: int = 0  # records whose image failed to decode
    skipped_examples: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "episodes": len(self.episodes),
            "images": sum(len(e.images) for e in self.episodes),
            "max_shots": max((e.shots for e in self.episodes), default=0),
            "seed": self.seed,
            "items": self.items,
            "skipped_images": self.skipped,
        }


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def find_jsonl(path: Path) -> Path:
    """DATA as given: a JSONL file, or a folder holding exactly one `*.jsonl`."""
    if not path.exists():
        raise CalibrationError(f"calibration data {path} does not exist")
    if path.is_file():
        return path
    found = sorted(path.glob("*.jsonl"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise CalibrationError(
            f"calibration folder {path} holds {what} *.jsonl files; it needs exactly one "
            "(records {image, caption} or {image, question, answer}), or pass the file itself"
        )
    return found[0]


def load_items(path: str | Path, progress: Progress | None = None) -> tuple[list[Item], int, list]:
    """Decode every record's image; returns (items, skipped count, first skip reasons)."""
    file = find_jsonl(Path(path))
    try:
        demos = load_demos_jsonl(file, check_exists=False)
    except ValueError as e:
        raise CalibrationError(str(e)) from e
    if not demos:
        raise CalibrationError(f"calibration set {file} is empty (no records)")
    items: list[Item] = []
    reasons: list[str] = []
    for i, demo in enumerate(demos):
        try:
            image = load_image(demo.image)
        except ImageError as e:
            reasons.append(str(e))
            continue
        items.append(Item(image, demo.text, demo.question, demo.answer))
        if (i + 1) % 100 == 0:
            _say(progress, f"calibration: decoded {i + 1}/{len(demos)} images")
    skipped = len(demos) - len(items)
    if not items:
        raise CalibrationError(
            f"calibration set {file}: none of its {len(demos)} images could be decoded "
            f"(first: {reasons[0]})"
        )
    if skipped:
        _say(progress, f"calibration: skipped {skipped}/{len(demos)} images that failed to decode")
    return items, skipped, reasons[:5]


def _random_image(rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    """A few same-coloured shapes on a noisy background (a natural-ish pixel distribution)."""
    size = 64
    base = np.random.default_rng(rng.getrandbits(32)).integers(150, 256, (size, size, 3))
    im = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    colour, shape, count = rng.choice(list(_COLOURS)), rng.choice(_SHAPES), rng.choice(_COUNTS)
    for _ in range(_COUNTS.index(count) + 1):
        x, y, r = rng.uniform(8, 56), rng.uniform(8, 56), rng.uniform(3, 9)
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=_COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=_COLOURS[colour])
        else:
            draw.rectangle((x - r, y - r / 3, x + r, y + r / 3), fill=_COLOURS[colour])
    return im, {"colour": colour, "shape": shape, "count": count}


def random_items(n: int, seed: int) -> list[Item]:
    """Synthetic captioned / question-answered images (a third are VQA)."""
    rng = random.Random(f"flamingo-calibration/random/{seed}")
    items = []
    for i in range(n):
        im, a = _random_image(rng)
        noun = a["shape"] + ("s" if a["count"] != "one" else "")
        if i % 3 == 2:
            attr = rng.choice(("colour", "shape", "count"))
            q = {
                "colour": f"What color is the {a['shape']}?",
                "shape": "What shape is in the image?",
                "count": f"How many {a['shape']}s are there?",
            }[attr]
            items.append(Item(im, question=q, answer=a[attr]))
        else:
            items.append(Item(im, caption=f"{a['count']} {a['colour']} {noun}"))
    return items


def build_episodes(items: Sequence[Item], n: int, max_shots: int, seed: int) -> list[Episode]:
    """n few-shot prompts: each item is a query in turn (shuffled), with 0..max_shots
    demonstrations of the same task drawn from the other items."""
    rng = random.Random(f"flamingo-calibration/episodes/{seed}")
    order = list(range(len(items)))
    rng.shuffle(order)
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    episodes = []
    for e in range(n):
        q = order[e % len(order)]
        query = items[q]
        others = [i for i in by_task[query.task] if i != q]
        shots = rng.randint(0, min(max_shots, len(others)))
        demos = [items[i].demonstration() for i in rng.sample(others, shots)]
        prompt, images = build_few_shot_prompt(
            demos, query.question, query.task, query_image=query.image
        )
        label = query.caption if query.task == "caption" else query.answer
        episodes.append(Episode(prompt, tuple(images), query.task, shots, label))
    return episodes


def demo_episodes(n: int, max_shots: int, seed: int, video: bool = False) -> list[Episode]:
    """Episodes of the demo model's own task (demo.task), 1..max_shots shots; `video`: its
    clip episodes."""
    stream = "demo-video" if video else "demo"
    draw = demo_task.sample_video_episode if video else demo_task.sample_episode
    episodes = []
    for i in range(n):
        rng = random.Random(f"flamingo-calibration/{stream}/{seed}/{i}")
        ep = draw(rng, rng.randint(min(1, max_shots), max_shots))
        episodes.append(_from_demo(ep))
    return episodes


def demo_eval_episodes(n: int, shots: int, seed: int, video: bool = False) -> list[Episode]:
    """The demo task's held-out evaluation episodes (`demo_task.eval_episodes`, or
    `video_eval_episodes` for clips), `shots` each."""
    if not 0 <= shots <= 8:
        name = "demo-video-eval" if video else "demo-eval"
        raise CalibrationError(f"{name} episodes have 0..8 shots, got max_shots={shots}")
    draw = demo_task.video_eval_episodes if video else demo_task.eval_episodes
    return [_from_demo(ep) for ep in draw(n, seed, shots)]


def _from_demo(ep: Any) -> Episode:
    """A demo-task episode as prompt + media: images, or each clip's VIDEO_FRAMES sampled
    frames (the frames the runtime samples from its CLIP_FRAMES, rendered alone)."""
    if ep.is_video:
        frames = demo_task.VIDEO_FRAMES
        media = tuple(Video(c.sampled(frames), frames) for c in (*ep.demos, ep.query))
    else:
        media = tuple(ep.images())
    return Episode(ep.prompt(), media, "caption", len(ep.demos), ep.answer)


def calibration_set(
    source: str | Path,
    *,
    episodes: int = 16,
    max_shots: int = 2,
    seed: int = 0,
    progress: Progress | None = None,
) -> CalibrationSet:
    """The calibration episodes for `source`: a DATA path, 'random', 'demo', 'demo-eval',
    'demo-video' or 'demo-video-eval'.

    * DATA: a JSONL file (or a folder holding exactly one) of ``{image, caption}`` or
      ``{image, question, answer}`` records, image paths relative to the file. Images that fail
      to decode are skipped and counted; if none decodes it is an error.
    * ``random``: synthetic images (random shapes on random backgrounds) with random captions
      and questions, for smoke tests and models without data at hand.
    * ``demo``: episodes of the demo model's task (``demo.task``, training split);
      ``demo-eval``: its held-out evaluation set (held-out colour-shape pairs as queries,
      exactly ``max_shots`` shots, episode i the same as in the README's accuracy table when
      ``seed`` is ``demo_task.EVAL_SEED``). ``demo-video`` and ``demo-video-eval``: the same
      with clips (the demo video model's task, `demo_task.video_eval_episodes`).

    Raises ``CalibrationError`` for an empty request or unusable data.
    """
    if episodes < 1:
        raise CalibrationError(f"the calibration set is empty: {episodes} episodes asked")
    if max_shots < 0:
        raise CalibrationError(f"max_shots must be >= 0, got {max_shots}")
    if str(source) == "random":
        items = random_items(max(episodes, max_shots + 1), seed)
        # no labels: random captions and answers are no task a model learned, so accuracy on
        # them would be a meaningless 0% (parity prints and gates task accuracy on labels)
        eps = [replace(e, answer=None) for e in build_episodes(items, episodes, max_shots, seed)]
        return CalibrationSet("random", eps, seed, items=len(items))
    if str(source) == "demo":
        return CalibrationSet("demo", demo_episodes(episodes, max_shots, seed), seed)
    if str(source) == "demo-eval":
        return CalibrationSet("demo-eval", demo_eval_episodes(episodes, max_shots, seed), seed)
    if str(source) == "demo-video":
        return CalibrationSet("demo-video", demo_episodes(episodes, max_shots, seed, True), seed)
    if str(source) == "demo-video-eval":
        eps = demo_eval_episodes(episodes, max_shots, seed, video=True)
        return CalibrationSet("demo-video-eval", eps, seed)
    items, skipped, reasons = load_items(Path(source), progress)
    eps = build_episodes(items, episodes, max_shots, seed)
    return CalibrationSet(str(source), eps, seed, len(items), skipped, reasons)
