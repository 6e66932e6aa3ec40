"""The demo's video task (clips only several frames answer), its trainer (demo.train_video) and
the shipped video checkpoint (models/demo-video)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from demo import train as td
from demo import train_video as tv
from demo.task import (
    CLIP_FRAMES,
    VIDEO_ATTRIBUTES,
    VIDEO_FRAMES,
    sample_clip,
    video_eval_episodes,
    write_episode,
)
from runtime.prompts import build_few_shot_prompt, load_demos_jsonl
from runtime.video import Video, read_frames, sample_indices

MODELS = Path(__file__).resolve().parents[2] / "models"
VIDEO_DIR = MODELS / "demo-video"


def _shape_pixels(frame) -> np.ndarray:
    """(row, col) of pixels far from the (light, near-grey) background."""
    a = np.asarray(frame, dtype=np.int32)
    return np.argwhere(np.abs(a - np.median(a.reshape(-1, 3), axis=0)).sum(-1) > 120)


def test_one_frame_cannot_tell_motion_or_growth_but_the_frames_can() -> None:
    clip = sample_clip(random.Random(3), motion="right", growth="large")
    mid = CLIP_FRAMES // 2
    middles = {
        (m, g): np.asarray(replace(clip, motion=m, growth=g).render()[mid])
        for m in VIDEO_ATTRIBUTES["motion"]
        for g in VIDEO_ATTRIBUTES["growth"]
    }
    first = next(iter(middles.values()))
    assert all(np.array_equal(first, m) for m in middles.values())
    for motion, growth in [("right", "large"), ("left", "small")]:
        frames = replace(clip, motion=motion, growth=growth).render()
        start, end = _shape_pixels(frames[0]), _shape_pixels(frames[-1])
        moved = end[:, 1].mean() - start[:, 1].mean()
        assert (moved > 10) if motion == "right" else (moved < -10), moved
        assert (len(end) > len(start)) == (growth == "large"), (len(start), len(end))


def test_sampled_frames_are_what_the_runtime_samples_from_the_clip() -> None:
    clip = sample_clip(random.Random(5))
    rendered = clip.render()
    assert len(rendered) == CLIP_FRAMES
    for f in (1, 2, VIDEO_FRAMES):
        picked = [rendered[i] for i in sample_indices(CLIP_FRAMES, f)]
        assert all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(clip.sampled(f), picked)
        )


def test_written_video_episode_is_what_the_runtime_reads(tmp_path: Path) -> None:
    ep = video_eval_episodes(1, seed=0, shots=2)[0]
    folder = write_episode(ep, tmp_path / "ep")
    demos = load_demos_jsonl(folder / "demos.jsonl")
    assert all(isinstance(d.image, Video) for d in demos)
    prompt, media = build_few_shot_prompt(
        demos, task="caption", query_image=Video(str(folder / "query.gif"))
    )
    assert prompt == ep.prompt() == json.loads((folder / "episode.json").read_text())["prompt"]
    for item, scene in zip(media, (*ep.demos, ep.query)):
        got = read_frames(item, VIDEO_FRAMES)  # GIF frames: one shared palette, no dithering
        for frame, want in zip(got, scene.sampled(VIDEO_FRAMES)):
            diff = np.abs(np.asarray(frame.convert("RGB"), np.int32) - np.asarray(want, np.int32))
            assert diff.mean() < 3, diff.mean()


@pytest.fixture(scope="module")
def video_model():
    cfg = tv.VideoConfig()
    return tv.build_video_model(MODELS / "demo", cfg)


def test_video_model_is_the_image_model_plus_seeded_frame_embeddings(video_model) -> None:
    """Every tensor of the shipped image model unchanged; the one new tensor, the frame
    embeddings, drawn N(0, frame_init_std^2) from the seed (distinct frames from the start)."""
    model, _ = video_model
    image_model, _ = td.load_demo(MODELS / "demo")
    state, image_state = model.state_dict(), image_model.state_dict()
    assert set(state) - set(image_state) == {"perceiver.frame_embs"}
    assert all(torch.equal(state[k], v) for k, v in image_state.items())
    cfg = tv.VideoConfig()
    frame_embs = model.perceiver.frame_embs.detach()
    assert frame_embs.shape == (VIDEO_FRAMES, model.perceiver.dim)
    assert 0.8 < frame_embs.std().item() / cfg.frame_init_std < 1.2
    again, _ = tv.build_video_model(MODELS / "demo", cfg)
    assert torch.equal(again.perceiver.frame_embs, model.perceiver.frame_embs)


def test_video_steps_train_only_resampler_and_cross_attention(tmp_path: Path) -> None:
    cfg = replace(
        tv.VideoConfig(), steps=3, pool_clips=9, clip_episodes=2, pool_images=9, image_episodes=1
    )
    model, tok = tv.build_video_model(MODELS / "demo", cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = tv.train_video(model, tok, cfg, log=lambda _: None)
    assert all(np.isfinite(losses))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "perceiver.frame_embs" in changed
    assert any(".cross_attn" in k or "gated" in k for k in changed)
    assert all(k.startswith("perceiver.") or "cross_attn" in k for k in changed), sorted(changed)
    tv.save_video_checkpoint(model, tmp_path)
    loaded, _ = tv.load_video_model(MODELS / "demo", tmp_path)
    assert loaded.cfg.resampler.max_num_frames == VIDEO_FRAMES
    pixels = torch.randn(1, VIDEO_FRAMES, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the trained tensors are stored as fp16
        torch.testing.assert_close(
            loaded.encode_media(pixels), model.encode_media(pixels), atol=2e-2, rtol=2e-2
        )


@pytest.mark.skipif(not VIDEO_DIR.is_dir(), reason="models/demo-video not trained")
def test_shipped_video_checkpoint_is_only_what_is_new_and_models_stay_small() -> None:
    assert sorted(p.name for p in VIDEO_DIR.iterdir()) == ["checkpoint.safetensors", "demo.json"]
    assert sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file()) <= 25 * 2**20
    model, _ = tv.load_video_model(MODELS / "demo", VIDEO_DIR)
    assert model.cfg.resampler.max_num_frames == VIDEO_FRAMES


def test_table_shows_no_accuracy_for_an_attribute_without_queries() -> None:
    """A small sample may hold no motion query: '-', not 0.0% (newcomer pass)."""
    from demo.train_video import format_table

    line = format_table({"ordered": {"1": {"all": 1.0, "colour": 1.0}}}).splitlines()[1]
    assert line.split()[2:] == ["100.0%", "100.0%", "-", "-", "-"]
