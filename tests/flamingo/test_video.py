"""Clips through the reference model: the resampler with frame embeddings against open_flamingo's
own `PerceiverResampler(max_num_frames=F)`, the whole video path against the published Flamingo
(its one-frame assert lifted), the loader reading `perceiver.frame_embs`, `inspect`."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flamingo.config import ResamplerConfig
from flamingo.inspect import describe
from flamingo.loaders import LoadError, load_flamingo
from flamingo.model import PerceiverResampler
from flamingo.oracle import import_open_flamingo
from tests.oracle import load_oracle
from tests.prompts_fixture import batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _their_resampler(dim: int, cfg: ResamplerConfig):
    import_open_flamingo()
    from open_flamingo.src.helpers import PerceiverResampler as OpenFlamingoResampler

    return OpenFlamingoResampler(
        dim=dim, depth=cfg.depth, dim_head=cfg.dim_head, heads=cfg.heads,
        num_latents=cfg.num_latents, max_num_frames=cfg.max_num_frames, ff_mult=cfg.ff_mult,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("max_num_frames", [None, 4])
@pytest.mark.parametrize("frames", [1, 2, 3, 4])
@torch.no_grad()
def test_resampler_equals_open_flamingo(max_num_frames: int | None, frames: int) -> None:
    """(N, F, V, D) -> (N, L, D), equal to open_flamingo's resampler on (b, T, F, v, D) with the
    same weights; frame embeddings (when present) are random, so they matter."""
    dim = 48
    cfg = ResamplerConfig(
        depth=2, heads=4, dim_head=16, num_latents=6, ff_mult=2, max_num_frames=max_num_frames
    )
    torch.manual_seed(frames)
    ours = PerceiverResampler(dim, cfg).eval()
    theirs = _their_resampler(dim, cfg)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    media = torch.randn(3, frames, 7, dim)
    got = ours(media)
    want = theirs(media.view(1, 3, frames, 7, dim))[0]  # b = 1, T = 3 media items
    assert got.shape == (3, cfg.num_latents, dim)
    assert (got - want).abs().max() <= 1e-5
    if max_num_frames is not None and frames > 1:  # the embeddings tell the frames apart
        swapped = ours(media.flip(1))
        assert (swapped - got).abs().max() > 1e-3


def test_resampler_refuses_more_frames_than_embeddings() -> None:
    cfg = ResamplerConfig(depth=1, heads=2, dim_head=8, num_latents=4, max_num_frames=2)
    resampler = PerceiverResampler(16, cfg)
    with pytest.raises(ValueError, match=r"3 frames per media item.*at most 2"):
        resampler(torch.randn(1, 3, 5, 16))
    with pytest.raises(ValueError, match=r"\(N, F, V, D\)"):
        resampler(torch.randn(1, 5, 16))


@torch.no_grad()
def test_video_logits_equal_open_flamingo(tiny_model, tiny_paths) -> None:
    """A batch of 3-frame clips through our model = open_flamingo's Flamingo with its own
    `PerceiverResampler(max_num_frames=4)` and its `_encode_vision_x` minus the `F == 1`
    assert (the rest of its body unchanged). The video fixture differs from the image one
    only by `perceiver.frame_embs`."""
    video = tiny_paths("llama", max_num_frames=4)
    ours, tok, _ = load_flamingo(video.lm_dir, video.vision_path, video.checkpoint_path)
    oracle, _ = load_oracle(tiny_model("llama")[3])
    cfg = ours.cfg.resampler
    perceiver = _their_resampler(ours.cfg.vision.width, cfg)
    state = oracle.perceiver.state_dict() | {"frame_embs": ours.perceiver.frame_embs}
    perceiver.load_state_dict(state)
    oracle.perceiver = perceiver
    oracle._encode_vision_x = types.MethodType(_encode_vision_x_any_frames, oracle)

    images, ids, mask, _ = batch(tok, ours.cfg.vision.image_size)
    g = torch.Generator().manual_seed(1)
    vision_x = torch.randn(*images.shape[:2], 3, *images.shape[3:], generator=g)  # F = 3
    got = ours(vision_x, ids, mask)
    want = oracle(vision_x, ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() <= 1e-5
    reordered = ours(vision_x.flip(2), ids, mask)  # frame order matters
    assert (reordered[:, -1] - got[:, -1]).abs().max() > 1e-3


def _encode_vision_x_any_frames(self, vision_x: torch.Tensor) -> None:
    """open_flamingo 2.0.1's `Flamingo._encode_vision_x` without `assert F == 1`."""
    from einops import rearrange

    b, T, F = vision_x.shape[:3]
    vision_x = rearrange(vision_x, "b T F c h w -> (b T F) c h w")
    with torch.no_grad():
        vision_x = self.vision_encoder(vision_x)[1]
    vision_x = rearrange(vision_x, "(b T F) v d -> b T F v d", b=b, T=T, F=F)
    vision_x = self.perceiver(vision_x)
    for layer in self.lang_encoder._get_decoder_layers():
        layer.condition_vis_x(vision_x)


def test_loader_reads_frame_embeddings_and_inspect_shows_them(tiny_paths) -> None:
    video = tiny_paths("llama", max_num_frames=4)
    model, tok, report = load_flamingo(video.lm_dir, video.vision_path, video.checkpoint_path)
    assert model.cfg.resampler.max_num_frames == 4
    stored = torch.load(video.checkpoint_path, weights_only=True)["perceiver.frame_embs"]
    assert torch.equal(model.perceiver.frame_embs.detach(), stored)
    assert not report.unexpected
    info = describe(model, tok, report)
    assert info["max_num_frames"] == 4 and info["resampler"]["max_num_frames"] == 4
    image = tiny_paths("llama")
    plain, tok, report = load_flamingo(image.lm_dir, image.vision_path, image.checkpoint_path)
    assert plain.cfg.resampler.max_num_frames is None and plain.perceiver.frame_embs is None
    assert describe(plain, tok, report)["max_num_frames"] is None


@pytest.mark.parametrize(
    ("key", "shape", "match"),
    [
        ("perceiver.frame_embs", (4, 7), r"'perceiver\.frame_embs' has shape \(4, 7\)"),
        ("perceiver.frame_embs", (0, 48), r"max_num_frames >= 1"),
        ("perceiver.media_time_embs", (4, 1, 48), r"media_time_embs.*not supported"),
    ],
)
def test_loader_refuses_bad_time_embeddings(
    tiny_paths, tmp_path: Path, key: str, shape: tuple, match: str
) -> None:
    paths = tiny_paths("llama", checkpoint_format="safetensors")
    state = load_file(str(paths.checkpoint_path))
    state[key] = torch.zeros(shape)
    bad = tmp_path / "checkpoint.safetensors"
    save_file(state, str(bad))
    with pytest.raises(LoadError, match=match):
        load_flamingo(paths.lm_dir, paths.vision_path, bad)
