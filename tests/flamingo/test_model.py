"""The re-implemented decoder families equal transformers' own models when all gates are zero,
including left padding and KV-cache decoding; media-index rule; vision tower vs HF CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MptConfig,
    MptForCausalLM,
)

from flamingo.config import CrossAttentionConfig, FlamingoConfig, VisionConfig
from flamingo.loaders import clip_hf_to_open_clip, lm_config_from_hf, map_lm_key
from flamingo.model import (
    Flamingo,
    FlamingoLM,
    VisionTransformer,
    media_index_from_ids,
    position_ids_from_mask,
)

VOCAB = 101


def hf_lm(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500.0,
        )
        model = LlamaForCausalLM(cfg)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            rotary_pct=0.25,
            use_parallel_residual=True,
        )
        model = GPTNeoXForCausalLM(cfg)
    else:
        cfg = MptConfig(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=3, max_seq_len=64)
        model = MptForCausalLM(cfg)
    cfg._attn_implementation = "eager"
    return model.eval()


def our_lm(hf: torch.nn.Module) -> FlamingoLM:
    lm_cfg = lm_config_from_hf(hf.config.to_dict(), Path("config.json"))
    cfg = FlamingoConfig(
        vision=VisionConfig(width=32),
        lm=lm_cfg,
        cross_attn=CrossAttentionConfig(every_n_layers=2),
        media_token_id=VOCAB - 1,
        eoc_token_id=VOCAB - 2,
    )
    lm = FlamingoLM(cfg)
    sd = {}
    for k, v in hf.state_dict().items():
        mapped = map_lm_key(lm_cfg.family, k)
        if mapped is not None:
            sd[mapped] = v
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    assert not unexpected
    # everything except the (zero-gated) cross-attention blocks must come from HF
    assert all(k.startswith("cross_attn_layers.") for k in missing), missing
    for block in lm.cross_attn_layers.values():
        torch.nn.init.normal_(block.attn.to_out.weight)  # non-trivial, but gated off
    return lm.eval()


def random_cross_kv(lm: FlamingoLM, batch: int, images: int) -> list:
    xa = lm.cfg.cross_attn
    keys = images * lm.cfg.resampler.num_latents
    shape = (batch, xa.heads, keys, xa.dim_head)
    return [(torch.randn(shape), torch.randn(shape)) for _ in lm.cross_attn_layer_indices]


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "mpt"])
@torch.no_grad()
def test_zero_gates_equal_plain_lm_with_padding_and_cache(family: str) -> None:
    hf = hf_lm(family)
    lm = our_lm(hf)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB - 2, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    media_index = torch.ones_like(ids)
    cross_kv = random_cross_kv(lm, 2, 1)

    ref = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask, 9))
    ours, present = lm(
        ids, mask, media_index, cross_kv, lm.empty_cache(2, torch.float32),
        position_ids_from_mask(mask, 9),
    )  # fmt: skip
    real = mask.bool()
    assert (ours[real] - ref.logits[real]).abs().max() < 1e-5

    # decode 4 tokens one at a time through the explicit cache, against a full HF forward
    full_ids, full_mask = ids, mask
    for _ in range(4):
        nxt = torch.randint(0, VOCAB - 2, (2, 1))
        full_ids = torch.cat([full_ids, nxt], 1)
        full_mask = torch.cat([full_mask, torch.ones_like(nxt)], 1)
        step, present = lm(
            nxt, full_mask, media_index[:, :1], cross_kv, present,
            position_ids_from_mask(full_mask, 1),
        )  # fmt: skip
        ref = hf(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=position_ids_from_mask(full_mask, full_ids.shape[1]),
        )
        assert (step[:, -1] - ref.logits[:, -1]).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llama", "mpt"])
@torch.no_grad()
def test_nonzero_gates_change_logits(family: str) -> None:
    """The cross-attention path is live: opening a gate changes logits after the first image."""
    lm = our_lm(hf_lm(family))
    ids = torch.randint(0, VOCAB - 2, (1, 6))
    mask = torch.ones_like(ids)
    media_index = torch.tensor([[0, 0, 1, 1, 1, 1]])
    kv = random_cross_kv(lm, 1, 1)
    cache = lm.empty_cache(1, torch.float32)
    args = (ids, mask, media_index, kv, cache, position_ids_from_mask(mask, 6))
    before, _ = lm(*args)
    for block in lm.cross_attn_layers.values():
        block.attn_gate.fill_(0.7)
    after, _ = lm(*args)
    # text before the first image gets no cross-attention (only the gated FF, still 0 here)
    assert torch.allclose(before[0, :2], after[0, :2], atol=1e-6)
    assert (before[0, 2:] - after[0, 2:]).abs().max() > 1e-3


def test_media_index_is_latest_preceding_image() -> None:
    media = 7
    ids = torch.tensor([[3, 3, 7, 4, 5, 7, 7, 2], [0, 0, 0, 7, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3], [0, 0, 0, 1, 1, 1, 1, 1]])
    assert torch.equal(media_index_from_ids(ids, media), expected)


@pytest.mark.parametrize("after_ln_post", [False, True])
@torch.no_grad()
def test_vision_tower_matches_hf_clip(after_ln_post: bool) -> None:
    torch.manual_seed(0)
    hf = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=16,
            hidden_act="quick_gelu",
        )
    ).eval()
    sd = clip_hf_to_open_clip(hf.state_dict())
    vt = VisionTransformer(
        VisionConfig(
            image_size=32,
            patch_size=8,
            width=64,
            layers=2,
            heads=4,
            embed_dim=16,
            tokens_after_ln_post=after_ln_post,
        )
    )
    vt.load_state_dict(sd, strict=True)
    pixels = torch.randn(3, 3, 32, 32)
    out = hf(pixel_values=pixels, output_hidden_states=True)
    pooled, tokens = vt.eval()(pixels)
    hidden = out.last_hidden_state  # before post_layernorm, like open_clip <= 2.22
    if after_ln_post:
        hidden = hf.vision_model.post_layernorm(hidden)
    assert (tokens - hidden[:, 1:]).abs().max() < 1e-5
    assert (pooled - out.image_embeds).abs().max() < 1e-5


def test_flamingo_forward_shapes() -> None:
    hf = hf_lm("llama")
    lm_cfg = lm_config_from_hf(hf.config.to_dict(), Path("config.json"))
    cfg = FlamingoConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=1, heads=4, embed_dim=16),
        lm=lm_cfg,
        media_token_id=VOCAB - 1,
        eoc_token_id=VOCAB - 2,
    )
    model = Flamingo(cfg).eval()
    vision_x = torch.randn(2, 3, 1, 3, 32, 32)
    ids = torch.randint(0, VOCAB - 2, (2, 10))
    ids[:, 0] = VOCAB - 1
    with torch.no_grad():
        logits = model(vision_x, ids)
    assert logits.shape == (2, 10, VOCAB)
    assert torch.isfinite(logits).all()
