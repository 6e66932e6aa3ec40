"""Train the demo video model: frame embeddings, resampler and cross-attention on top of the
shipped demo model, so that clips (``demo.task`` ``ClipScene``) are answered from their frames.

``python -m demo.train_video --base models/demo --out models/demo-video [--steps-scale F]
[--json]`` loads ``models/demo`` (LM, CLIP ViT, Flamingo checkpoint), adds learned frame
embeddings (OpenFlamingo's ``perceiver.frame_embs``, ``VIDEO_FRAMES`` rows, drawn N(0, 1) from
the seed as open_flamingo initialises them, trained 20x faster than the rest), freezes the LM
(token embeddings included) and the vision tower, and trains the resampler with its frame
embeddings and the gated cross-attention on clip episodes mixed with image episodes (so images
keep working: an image is a one-frame clip). Seeded and deterministic like ``demo.train``. It
writes only what is new: ``checkpoint.safetensors`` (OpenFlamingo layout; the trained tensors
stored as fp16, the unchanged embeddings as they are) and ``demo.json``; the LM and vision files
stay those of ``--base``. ``--eval-only --model DIR`` prints the accuracy table: held-out clips
at 0/1/2/4 shots with the frames in order, shuffled, and a single (middle) frame. Recipe and
reasons: docs/demo.md ("The video model").
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from demo.task import (
    CLIP_FRAMES,
    EVAL_SEED,
    VIDEO_ATTRIBUTES,
    VIDEO_FRAMES,
    Episode,
    sample_clip,
    video_eval_episodes,
)
from demo.train import (
    MAX_SHOTS,
    FlamingoBatch,
    StageRecord,
    _record,
    episode_batch,
    evaluate,
    flamingo_loss,
    flamingo_optimizer,
    lr_at,
    make_batch,
    model_paths,
    openflamingo_state_dict,
    predict,
    set_lr,
    to_pixels,
)
from flamingo.config import FlamingoConfig
from flamingo.loaders import load_flamingo
from flamingo.model import Flamingo

SHOTS = (0, 1, 2, 4)
# How a clip reaches the model in the evaluation: its VIDEO_FRAMES sampled frames in order (what
# the runtime feeds), the same frames in a random order, or its middle frame alone (F = 1)
CONDITIONS = ("ordered", "shuffled", "single")


@dataclass
class VideoConfig:
    """Every size and step count of the video stage (the defaults are what ships)."""

    seed: int = 0
    max_num_frames: int = VIDEO_FRAMES
    steps: int = 150
    pool_clips: int = 24  # clips encoded per step, shared by the clip episodes of the step
    clip_episodes: int = 12
    pool_images: int = 24
    image_episodes: int = 4  # image episodes per step: images keep working
    lr: float = 5e-4
    gate_lr_scale: float = 1.0  # the gates are open already
    # frame embeddings: their own AdamW group, `frame_lr_scale` times the peak lr and no weight
    # decay (Adam moves a parameter about lr per step: at 5e-4 they stay near their start, small
    # beside patch tokens of std ~2.5), started as N(0, frame_init_std^2) so frames differ at once
    frame_lr_scale: float = 20.0
    frame_init_std: float = 1.0
    eval_n: int = 200
    eval_seed: int = EVAL_SEED

    def scaled(self, factor: float) -> VideoConfig:
        """Steps times `factor` (at least 2): `--steps-scale 0.01` is a CI smoke run."""
        return replace(self, steps=max(2, round(self.steps * factor)))


# ---------------------------------------------------------------------------------------------
# The model: the image model plus frame embeddings
# ---------------------------------------------------------------------------------------------


def build_video_model(base: Path, cfg: VideoConfig) -> tuple[Flamingo, Any]:
    """The shipped image model with `cfg.max_num_frames` frame embeddings (N(0,
    cfg.frame_init_std^2), seeded; every other tensor as shipped); LM, token embeddings and
    vision tower frozen; resampler (with the frame embeddings) and gated cross-attention
    trainable."""
    image_model, tok, _ = load_flamingo(*model_paths(base))
    config = FlamingoConfig.from_dict(image_model.cfg.to_dict())
    config.resampler.max_num_frames = cfg.max_num_frames
    model = Flamingo(config)
    missing, unexpected = model.load_state_dict(image_model.state_dict(), strict=False)
    assert missing == ["perceiver.frame_embs"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(cfg.seed)
        model.perceiver.frame_embs.copy_(
            torch.randn(model.perceiver.frame_embs.shape, generator=generator) * cfg.frame_init_std
        )
    model.lang_model._init_buffers()
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_model.cross_attn_layers.requires_grad_(True)
    model.eval()  # no dropout anywhere; frozen parts stay as loaded
    return model, tok


def make_clip_batch(rng: random.Random, tok, pool: int, episodes: int, shots: int) -> FlamingoBatch:
    """Clip episodes over a pool of clips (each VIDEO_FRAMES sampled frames, in order)."""
    clips = [sample_clip(rng, "train") for _ in range(pool)]
    rows, eps = [], []
    for _ in range(episodes):
        index = rng.sample(range(pool), shots + 1)
        attribute = rng.choice(tuple(VIDEO_ATTRIBUTES))
        eps.append(Episode(attribute, tuple(clips[i] for i in index[:-1]), clips[index[-1]]))
        rows.append(index)
    frames = to_pixels([im for c in clips for im in c.sampled(VIDEO_FRAMES)])
    return episode_batch(tok, eps, rows, frames.view(pool, VIDEO_FRAMES, *frames.shape[1:]))


def train_video(model: Flamingo, tok, cfg: VideoConfig, log: Callable[[str], None]) -> list[float]:
    """Next-token loss of the clip episodes plus that of the image episodes, every step."""
    rng = random.Random(f"flamingo-demo/video/{cfg.seed}")
    opt = flamingo_optimizer(model, cfg.lr, cfg.gate_lr_scale, cfg.frame_lr_scale)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step in range(cfg.steps):
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr))
        clips = make_clip_batch(rng, tok, cfg.pool_clips, cfg.clip_episodes, MAX_SHOTS)
        images = make_batch(rng, tok, cfg.pool_images, cfg.image_episodes, MAX_SHOTS)
        clip_loss, image_loss = flamingo_loss(model, clips), flamingo_loss(model, images)
        share = cfg.clip_episodes / (cfg.clip_episodes + cfg.image_episodes)
        loss = share * clip_loss + (1 - share) * image_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == cfg.steps - 1:
            log(
                f"video step {step:4d} loss {loss.item():.4f} (clips {clip_loss.item():.4f}, "
                f"images {image_loss.item():.4f})"
            )
    return losses


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def clip_frames(episode: Episode, condition: str, seed: int, index: int) -> list[list[Any]]:
    """Each clip of the episode as the model gets it under `condition` (CONDITIONS)."""
    if condition == "single":
        return [c.sampled(1) for c in (*episode.demos, episode.query)]  # type: ignore[union-attr]
    clips = [c.sampled(VIDEO_FRAMES) for c in (*episode.demos, episode.query)]  # type: ignore[union-attr]
    if condition == "shuffled":
        rng = random.Random(f"flamingo-demo/video-shuffle/{seed}/{index}")
        clips = [rng.sample(frames, len(frames)) for frames in clips]
    elif condition != "ordered":
        raise ValueError(f"condition must be one of {list(CONDITIONS)}, got {condition!r}")
    return clips


def evaluate_clips(
    model: Flamingo,
    tokenizer,
    shots: int,
    condition: str,
    n: int,
    seed: int,
    batch_size: int = 50,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on `n` held-out clip episodes: "all" and per
    asked attribute."""
    episodes = video_eval_episodes(n, seed, shots)
    hits: dict[str, list[bool]] = {"all": [], **{a: [] for a in VIDEO_ATTRIBUTES}}
    for start in range(0, n, batch_size):
        chunk = episodes[start : start + batch_size]
        clips = [clip_frames(e, condition, seed, start + k) for k, e in enumerate(chunk)]
        frames = len(clips[0][0])
        pixels = to_pixels([im for episode in clips for clip in episode for im in clip])
        vision_x = pixels.view(len(chunk), shots + 1, frames, *pixels.shape[1:])
        for pred, ep in zip(predict(model, tokenizer, chunk, vision_x=vision_x), chunk):
            hits["all"].append(pred == ep.answer)
            hits[ep.attribute].append(pred == ep.answer)
    return {k: round(sum(v) / len(v), 4) for k, v in hits.items() if v}


def accuracy_table(
    model: Flamingo, tokenizer, n: int, seed: int
) -> dict[str, dict[str, dict[str, float]]]:
    """{condition: {shots: {"all": accuracy, attribute: accuracy}}} on held-out clips."""
    return {
        condition: {str(k): evaluate_clips(model, tokenizer, k, condition, n, seed) for k in SHOTS}
        for condition in CONDITIONS
    }


def image_accuracy(model: Flamingo, tokenizer, n: int, seed: int, shots: int = 4) -> float:
    """The image task's held-out accuracy (images are one-frame clips of the video model)."""
    return evaluate(model, tokenizer, shots, n, seed)


def format_table(table: dict[str, dict[str, dict[str, float]]]) -> str:
    columns = ["all", *VIDEO_ATTRIBUTES]
    lines = ["frames    shots  " + "  ".join(f"{c:>8}" for c in columns)]
    for condition, rows in table.items():
        for shots, row in rows.items():
            # an attribute with no query in the sample has no accuracy (not 0%)
            cells = "  ".join(f"{row[c]:8.1%}" if c in row else f"{'-':>8}" for c in columns)
            lines.append(f"{condition:<8}  {shots:>5}  {cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Saving: only what is new
# ---------------------------------------------------------------------------------------------


def save_video_checkpoint(model: Flamingo, out: Path) -> Path:
    """OpenFlamingo-layout checkpoint; the tensors this stage trained (perceiver.*, gated
    cross-attention) as fp16 (half the bytes; `load_flamingo` reads them into fp32), the
    frozen token embeddings unchanged."""
    from safetensors.torch import save_file

    state = {
        k: v.half() if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k else v
        for k, v in openflamingo_state_dict(model).items()
    }
    path = out / "checkpoint.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def load_video_model(base: Path, model_dir: Path) -> tuple[Flamingo, Any]:
    """The video model as users load it: base LM + vision, the video checkpoint."""
    lm_dir, vision_path, _ = model_paths(base)
    model, tok, _ = load_flamingo(lm_dir, vision_path, model_dir / "checkpoint.safetensors")
    return model, tok


def run(
    base: Path, out: Path, cfg: VideoConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train into `out`, evaluate the files read back, write and return demo.json's record.
    Deterministic algorithms are on while it runs (see demo.train.run)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _run(base, out, cfg, log)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _run(base: Path, out: Path, cfg: VideoConfig, log: Callable[[str], None]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    model, tok = build_video_model(base, cfg)
    losses = train_video(model, tok, cfg, log)
    save_video_checkpoint(model, out)
    stage: StageRecord = _record(t0, c0, losses)
    t = time.perf_counter()
    loaded, tok = load_video_model(base, out)
    table = accuracy_table(loaded, tok, cfg.eval_n, cfg.eval_seed)
    images = image_accuracy(loaded, tok, cfg.eval_n, cfg.eval_seed)
    log(f"held-out clips, {cfg.eval_n} episodes per row:\n{format_table(table)}")
    log(f"held-out images, 4 shots: {images:.1%}")
    sizes = {
        str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()
    }
    record = {
        "config": asdict(cfg),
        "base": str(base),
        "clip_frames": CLIP_FRAMES,
        "torch_threads": torch.get_num_threads(),
        "train_seconds": stage.seconds,
        "train_cpu_seconds": stage.cpu_seconds,
        "eval_seconds": round(time.perf_counter() - t, 1),
        "stage": asdict(stage),
        "accuracy": {
            "n": cfg.eval_n,
            "seed": cfg.eval_seed,
            "clips": table,
            "images_4shot": images,
        },
        "bytes": sum(sizes.values()),
    }
    (out / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """Train the video model (`--out`) or print the accuracy table of one (`--eval-only`)."""
    parser = argparse.ArgumentParser(prog="python -m demo.train_video", description=main.__doc__)
    parser.add_argument("--base", type=Path, default=Path("models/demo"), help="the image model")
    parser.add_argument("--out", type=Path, help="folder to write the video checkpoint to")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="0.01: CI smoke run")
    parser.add_argument(
        "--eval-only", action="store_true", help="only evaluate --model (no training)"
    )
    parser.add_argument(
        "--model", type=Path, default=Path("models/demo-video"), help="video checkpoint to evaluate"
    )
    parser.add_argument("--n", type=int, default=None, help="evaluation episodes per row")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    if args.eval_only:
        model, tok = load_video_model(args.base, args.model)
        n = args.n or VideoConfig.eval_n
        t = time.perf_counter()
        table = accuracy_table(model, tok, n, VideoConfig.eval_seed)
        result = {
            "model": str(args.model),
            "n": n,
            "seed": VideoConfig.eval_seed,
            "clips": table,
            "images_4shot": image_accuracy(model, tok, n, VideoConfig.eval_seed),
            "seconds": round(time.perf_counter() - t, 1),
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"held-out clips, {n} episodes per row (greedy, exact match)")
            print(format_table(table))
            print(f"held-out images, 4 shots: {result['images_4shot']:.1%}")
        return 0
    if args.out is None:
        parser.error("--out is required unless --eval-only")
    cfg = VideoConfig(seed=args.seed).scaled(args.steps_scale)
    if args.n is not None:
        cfg = replace(cfg, eval_n=args.n)
    elif args.steps_scale < 1:
        cfg = replace(cfg, eval_n=20)
    record = run(args.base, args.out, cfg, log)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"trained in {record['train_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
