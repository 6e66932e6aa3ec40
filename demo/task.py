"""Synthetic few-shot task of the demo model: which attribute is asked is only known in context.

Every image is a procedural Pillow drawing of 1-4 identical shapes with five attributes
(``ATTRIBUTES``: colour, shape, count, position, size). An episode picks one attribute at random
and shows k demonstrations ``<image>Output:{answer}<|endofchunk|>`` (OpenFlamingo's caption
template, demos joined by ``"\\n"`` as in its evaluate.py), then the query ``<image>Output:``.
The prompt never names the attribute, so with 0 shots the best possible score is about 1/5;
answer words are distinct across attributes, so one demonstration identifies it. Held out for
evaluation: four (colour, shape) pairs (``HELD_OUT_PAIRS``) that no training stage draws, and
images from their own seeded stream. Everything is a pure function of a seed
(``random.Random`` seeded with strings, independent of ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw

from runtime.prompts import Demonstration, build_few_shot_prompt
from runtime.video import sample_indices

IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, so small shapes stay legible

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 25),
    "purple": (140, 50, 175),
}
SHAPES = ("circle", "square", "triangle", "cross")
COUNTS = ("one", "two", "three", "four")
POSITIONS = ("left", "middle", "right")
SIZES = ("small", "large")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNTS,
    "position": POSITIONS,
    "size": SIZES,
}
ANSWERS: tuple[str, ...] = tuple(v for values in ATTRIBUTES.values() for v in values)
# One pair per shape, four different colours: every colour and shape is still seen in training.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square")}
)
EVAL_SEED = 1234  # the seed of the documented accuracy table
_RADIUS = {"small": 4.5, "large": 7.0}  # half-extent in output pixels

Split = Literal["train", "heldout", "any"]


@dataclass(frozen=True)
class Scene:
    """One image: its attributes plus the drawing details (jitter) that make it unique."""

    colour: str
    shape: str
    count: str
    position: str
    size: str
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]
    radius: float
    centres: tuple[tuple[float, float], ...]

    def answer(self, attribute: str) -> str:
        if attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r}; expected one of {list(ATTRIBUTES)}")
        return getattr(self, attribute)

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape

    def caption(self) -> str:
        """All five attributes in words: the text side of CLIP training."""
        noun = self.shape + ("es" if self.shape == "cross" else "s") * (self.count != "one")
        where = "in the middle" if self.position == "middle" else f"on the {self.position}"
        return f"{self.count} {self.size} {self.colour} {noun} {where}"

    def render(self) -> Image.Image:
        """The 64x64 RGB image (what `runtime.images.preprocess` receives, resized 1:1)."""
        s = _SUPERSAMPLE
        im = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), self.background)
        draw = ImageDraw.Draw(im)
        r = self.radius * s
        for cx, cy in self.centres:
            cx, cy = cx * s, cy * s
            if self.shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=self.rgb)
            elif self.shape == "square":
                h = 0.85 * r  # about the circle's area
                draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=self.rgb)
            elif self.shape == "triangle":
                pts = [(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)]
                draw.polygon(pts, fill=self.rgb)
            else:  # cross
                t = 0.35 * r
                draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=self.rgb)
                draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=self.rgb)
        return im.reduce(s)


def _pairs(split: Split) -> list[tuple[str, str]]:
    every = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "train":
        return [p for p in every if p not in HELD_OUT_PAIRS]
    if split == "heldout":
        return sorted(HELD_OUT_PAIRS)
    if split == "any":
        return every
    raise ValueError(f"split must be 'train', 'heldout' or 'any', not {split!r}")


def sample_scene(rng: random.Random, split: Split = "train", **fixed: str) -> Scene:
    """A random scene; `split` restricts the (colour, shape) pair (train never sees held-out);
    `fixed` attributes (e.g. ``shape="circle"``) are taken as given, the rest drawn."""
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; expected {list(ATTRIBUTES)}")
    pairs = [
        p
        for p in _pairs(split)
        if fixed.get("colour", p[0]) == p[0] and fixed.get("shape", p[1]) == p[1]
    ]
    if not pairs:
        raise ValueError(f"no {split} scene has {fixed}")
    colour, shape = rng.choice(pairs)
    count = fixed.get("count") or rng.choice(COUNTS)
    position = fixed.get("position") or rng.choice(POSITIONS)
    size = fixed.get("size") or rng.choice(SIZES)
    n = COUNTS.index(count) + 1
    radius = _RADIUS[size] + rng.uniform(-0.4, 0.4)
    strip = IMAGE_SIZE / len(POSITIONS)
    x_mid = (POSITIONS.index(position) + 0.5) * strip
    x_room = max(0.0, strip / 2 - radius - 1)
    slot = IMAGE_SIZE / n  # one vertical slot per shape: never overlapping
    y_room = max(0.0, slot / 2 - radius - 1)
    centres = tuple(
        (x_mid + rng.uniform(-x_room, x_room), (j + 0.5) * slot + rng.uniform(-y_room, y_room))
        for j in range(n)
    )
    base = rng.randint(205, 255)
    background = tuple(min(255, max(0, base + rng.randint(-15, 15))) for _ in range(3))
    rgb = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in COLOURS[colour])
    return Scene(colour, shape, count, position, size, rgb, background, radius, centres)


def sample_variant(
    rng: random.Random, scene: Scene, split: Split = "train", attribute: str | None = None
) -> Scene:
    """A scene that differs from `scene` in exactly one attribute (random unless given),
    redrawn: the hard negative of contrastive training (colour alone tells most pairs apart)."""
    while True:
        changed = attribute or rng.choice(tuple(ATTRIBUTES))
        value = rng.choice([v for v in ATTRIBUTES[changed] if v != scene.answer(changed)])
        fixed = {a: scene.answer(a) for a in ATTRIBUTES} | {changed: value}
        if (fixed["colour"], fixed["shape"]) in _pairs(split):
            return sample_scene(rng, split, **fixed)


# ---------------------------------------------------------------------------------------------
# Video clips: one shape that moves and changes size, answered only from several frames
# ---------------------------------------------------------------------------------------------

CLIP_FRAMES = 9  # frames rendered per clip: odd, so the middle frame is exactly mid-motion
VIDEO_FRAMES = 4  # frames the video model sees per clip (runtime.video.sample_indices: 1,3,5,7)
MOTIONS = ("left", "right")  # where the shape travels (words the demo LM already knows)
GROWTHS = ("large", "small")  # it grows (ends large) or shrinks (ends small)
VIDEO_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "motion": MOTIONS,
    "growth": GROWTHS,
}
TEMPORAL_ATTRIBUTES = ("motion", "growth")  # need the frames in order; the others any one frame
_TRAVEL = 30.0  # pixels the shape's centre moves over the clip (of IMAGE_SIZE)
_RADII = (3.5, 8.0)  # radius at the small and the large end of a clip


@dataclass(frozen=True)
class ClipScene:
    """A clip: one shape travelling left or right while growing or shrinking, on a still
    background. Its middle frame is the same whatever the direction and the growth (the path
    and the radius range are centred), so one frame cannot tell them; the frames in order can."""

    colour: str
    shape: str
    motion: str
    growth: str
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]
    x_mid: float  # centre x at mid-clip
    y: float
    travel: float  # pixels moved, left to right or right to left
    radius_mid: float
    radius_change: float  # radius at the end minus at the start, in absolute value

    def answer(self, attribute: str) -> str:
        if attribute not in VIDEO_ATTRIBUTES:
            raise ValueError(
                f"unknown attribute {attribute!r}; expected one of {list(VIDEO_ATTRIBUTES)}"
            )
        return getattr(self, attribute)

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape

    def frame(self, t: float) -> Scene:
        """The still at time t in [0, 1]."""
        sign = 1.0 if self.motion == "right" else -1.0
        grow = 1.0 if self.growth == "large" else -1.0
        x = self.x_mid + sign * (t - 0.5) * self.travel
        radius = self.radius_mid + grow * (t - 0.5) * self.radius_change
        position = POSITIONS[min(2, int(x / (IMAGE_SIZE / len(POSITIONS))))]
        size = "large" if radius >= sum(_RADIUS.values()) / 2 else "small"
        return Scene(
            self.colour, self.shape, "one", position, size, self.rgb, self.background, radius,
            ((x, self.y),),
        )  # fmt: skip

    def render(self, frames: int = CLIP_FRAMES) -> list[Image.Image]:
        """`frames` evenly spaced stills from the first to the last instant."""
        return [self.frame(i / (frames - 1)).render() for i in range(frames)]

    def sampled(self, num_frames: int = VIDEO_FRAMES) -> list[Image.Image]:
        """The stills a model sees: `num_frames` of the CLIP_FRAMES frames of `render`, picked
        as the runtime samples a clip (`runtime.video.sample_indices`), rendering only those."""
        picked = sample_indices(CLIP_FRAMES, num_frames)
        return [self.frame(i / (CLIP_FRAMES - 1)).render() for i in picked]


def sample_clip(rng: random.Random, split: Split = "train", **fixed: str) -> ClipScene:
    """A random clip; `split` restricts the (colour, shape) pair like `sample_scene`."""
    unknown = set(fixed) - set(VIDEO_ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; expected {list(VIDEO_ATTRIBUTES)}")
    pairs = [
        p
        for p in _pairs(split)
        if fixed.get("colour", p[0]) == p[0] and fixed.get("shape", p[1]) == p[1]
    ]
    if not pairs:
        raise ValueError(f"no {split} clip has {fixed}")
    colour, shape = rng.choice(pairs)
    motion = fixed.get("motion") or rng.choice(MOTIONS)
    growth = fixed.get("growth") or rng.choice(GROWTHS)
    travel = _TRAVEL + rng.uniform(-4, 4)
    radius_change = _RADII[1] - _RADII[0] + rng.uniform(-0.8, 0.8)
    radius_mid = sum(_RADII) / 2 + rng.uniform(-0.4, 0.4)
    biggest = radius_mid + radius_change / 2
    x_mid = IMAGE_SIZE / 2 + rng.uniform(-4, 4)
    y = rng.uniform(biggest + 2, IMAGE_SIZE - biggest - 2)
    base = rng.randint(205, 255)
    background = tuple(min(255, max(0, base + rng.randint(-15, 15))) for _ in range(3))
    rgb = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in COLOURS[colour])
    return ClipScene(
        colour, shape, motion, growth, rgb, background, x_mid, y, travel, radius_mid, radius_change
    )


@dataclass(frozen=True)
class Episode:
    """k demonstrations and a query that all ask the same (unstated) attribute: images
    (`Scene`) or clips (`ClipScene`)."""

    attribute: str
    demos: tuple[Scene | ClipScene, ...]
    query: Scene | ClipScene

    @property
    def answer(self) -> str:
        return self.query.answer(self.attribute)

    def truncated(self, shots: int) -> Episode:
        """The same query with only the first `shots` demonstrations (nested shot settings)."""
        if not 0 <= shots <= len(self.demos):
            raise ValueError(f"shots must be in 0..{len(self.demos)}, got {shots}")
        return Episode(self.attribute, self.demos[:shots], self.query)

    def prompt(self) -> str:
        """OpenFlamingo caption few-shot prompt, ending at the query's `Output:`."""
        # the image slots only need to be non-None: images are passed separately (`images`)
        demos = [
            Demonstration(image=j, text=s.answer(self.attribute)) for j, s in enumerate(self.demos)
        ]
        return build_few_shot_prompt(demos, task="caption")[0]

    def images(self) -> list[Image.Image]:
        """Demonstration images then the query image, in prompt order (image episodes)."""
        return [s.render() for s in (*self.demos, self.query)]

    @property
    def is_video(self) -> bool:
        return isinstance(self.query, ClipScene)

    def clips(self, frames: int = CLIP_FRAMES) -> list[list[Image.Image]]:
        """Every clip's `frames` stills, demonstrations then the query (video episodes)."""
        return [s.render(frames) for s in (*self.demos, self.query)]  # type: ignore[call-arg]


def sample_episode(
    rng: random.Random,
    shots: int,
    *,
    demo_split: Split = "train",
    query_split: Split = "train",
    attribute: str | None = None,
    video: bool = False,
) -> Episode:
    """An episode with a random attribute (uniform over the five; `video`: a clip episode,
    uniform over VIDEO_ATTRIBUTES) unless one is given."""
    attributes, draw = (VIDEO_ATTRIBUTES, sample_clip) if video else (ATTRIBUTES, sample_scene)
    attribute = attribute or rng.choice(tuple(attributes))
    demos = tuple(draw(rng, demo_split) for _ in range(shots))
    return Episode(attribute, demos, draw(rng, query_split))


def sample_video_episode(rng: random.Random, shots: int, **kw: Any) -> Episode:
    """`sample_episode` of clips."""
    return sample_episode(rng, shots, video=True, **kw)


def eval_episodes(n: int, seed: int, shots: int = 8, video: bool = False) -> list[Episode]:
    """The held-out evaluation set: its own seed stream, demos from any pair, held-out queries
    (`video`: the clip set, from a stream of its own).

    Episode i is the same for every `shots` (drawn with 8 demonstrations, then truncated), so
    a shot/accuracy table compares the same queries.
    """
    stream = "video-eval" if video else "eval"
    out = []
    for i in range(n):
        rng = random.Random(f"flamingo-demo/{stream}/{seed}/{i}")
        full = sample_episode(rng, 8, demo_split="any", query_split="heldout", video=video)
        out.append(full.truncated(shots))
    return out


def video_eval_episodes(n: int, seed: int, shots: int = 8) -> list[Episode]:
    """`eval_episodes` of clips."""
    return eval_episodes(n, seed, shots, video=True)


def save_clip(frames: list[Image.Image], path: str | Path) -> Path:
    """Frames as an animated GIF (what `flamingo-export run --video` reads through Pillow).
    One global palette built from all frames keeps every frame's colours the same."""
    path = Path(path)
    strip = Image.new("RGB", (frames[0].width, frames[0].height * len(frames)))
    for i, im in enumerate(frames):
        strip.paste(im, (0, i * im.height))
    palette = strip.quantize(256, method=Image.Quantize.MEDIANCUT)
    quantized = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in frames]
    quantized[0].save(
        path, save_all=True, append_images=quantized[1:], duration=100, loop=0, optimize=False
    )
    return path


def write_episode(episode: Episode, folder: str | Path) -> Path:
    """Write an episode as files the `flamingo-export run` command reads: the demonstrations as
    `demos.jsonl` (`{image, caption}` lines, clips: `{video, caption}`) beside their PNGs
    (clips: animated GIFs of CLIP_FRAMES frames), `query.png` (`query.gif`), and
    `episode.json` (attribute, expected answer, the full prompt and its media in order)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key, suffix = ("video", "gif") if episode.is_video else ("image", "png")
    names = []
    lines = []
    for i, scene in enumerate((*episode.demos, episode.query)):
        names.append(f"demo_{i}.{suffix}" if i < len(episode.demos) else f"query.{suffix}")
        if episode.is_video:
            save_clip(scene.render(), folder / names[-1])  # type: ignore[arg-type]
        else:
            scene.render().save(folder / names[-1])  # type: ignore[union-attr]
        if i < len(episode.demos):
            lines.append(json.dumps({key: names[-1], "caption": scene.answer(episode.attribute)}))
    (folder / "demos.jsonl").write_text("".join(line + "\n" for line in lines))
    meta = {
        "attribute": episode.attribute,
        "answer": episode.answer,
        "prompt": episode.prompt(),
        "media": key,
        "images": names,
    }
    (folder / "episode.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    """``python -m demo.task OUT [--video]``: write held-out evaluation episode INDEX as files."""
    parser = argparse.ArgumentParser(prog="python -m demo.task", description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="evaluation seed")
    parser.add_argument("--index", type=int, default=0, help="episode number in that stream")
    parser.add_argument("--video", action="store_true", help="a clip episode (animated GIFs)")
    args = parser.parse_args(argv)
    draw = video_eval_episodes if args.video else eval_episodes
    episode = draw(args.index + 1, args.seed, args.shots)[args.index]
    write_episode(episode, args.out)
    kind = "clip" if args.video else "image"
    print(
        f"{args.out}: {args.shots}-shot {kind} '{episode.attribute}' episode, "
        f"answer {episode.answer!r}"
    )


if __name__ == "__main__":
    main()
