"""Unusual but valid model shapes export and match the PyTorch reference: a vocabulary of a
few dozen tokens, one layer, one head, odd widths, several cross-attention intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.export import export_model
from flamingo.config import (
    CrossAttentionConfig,
    FlamingoConfig,
    LMConfig,
    ResamplerConfig,
    VisionConfig,
)
from flamingo.generate import TorchStepModel
from flamingo.model import Flamingo
from runtime.engine import OnnxFlamingo
from runtime.pipeline import FlamingoPipeline

WORDS = ["<unk>", "</s>", "a", "red", "blue", "circle", "square", "Output:", " "]
SPECIALS = ["<|endofchunk|>", "<image>", "<pad>"]

# name: (family, vocabulary, layers, heads, kv heads, head dim, every n, vision width/heads)
SHAPES = {
    "vocab-12-one-layer-one-head": ("llama", 12, 1, 1, 1, 8, 1, (8, 1)),
    "odd-widths-gqa": ("llama", 41, 3, 3, 1, 6, 1, (21, 3)),
    "every-2-of-5": ("gpt_neox", 23, 5, 2, 2, 10, 2, (12, 2)),
    "every-3-of-3": ("mpt", 17, 3, 4, 4, 5, 3, (10, 5)),
}


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS + [f"w{i}" for i in range(vocab_size - len(WORDS) - len(SPECIALS))]
    vocab = {w: i for i, w in enumerate(words + SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[:2]})
    return fast


def _model(family, vocab, layers, heads, kv_heads, head_dim, every, vision) -> Flamingo:
    width, vision_heads = vision
    hidden = heads * head_dim
    rotary = head_dim - head_dim % 2 if family != "mpt" else 0
    inv = (1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / max(rotary, 1))).tolist()
    lm = LMConfig(
        family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=3 * hidden + 1,
        norm_eps=1e-5, act="silu" if family == "llama" else "gelu",
        tie_word_embeddings=family == "mpt", rotary_dim=rotary, rope_inv_freq=inv,
        parallel_residual=family == "gpt_neox", max_position_embeddings=64,
    )  # fmt: skip
    cfg = FlamingoConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=width, layers=1,
                            heads=vision_heads, embed_dim=4),
        lm=lm,
        resampler=ResamplerConfig(depth=1, heads=2, dim_head=3, num_latents=3, ff_mult=2),
        cross_attn=CrossAttentionConfig(every_n_layers=every, heads=2, dim_head=3, ff_mult=2),
        media_token_id=vocab - 2, eoc_token_id=vocab - 3, pad_token_id=vocab - 1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Flamingo(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.7)  # cross-attention on (zero gates would hide it)
    return model


@pytest.mark.parametrize("name", list(SHAPES))
@torch.no_grad()
def test_small_and_odd_shapes_export_and_match(name, tmp_path) -> None:
    family, vocab, *rest = SHAPES[name]
    model = _model(family, vocab, *rest)
    tok = _tokenizer(vocab)
    assert len(tok) == vocab
    out = tmp_path / "export"
    export_model(model, tok, out, progress=None)
    engine = OnnxFlamingo(out)
    m, e = model.cfg.media_token_id, model.cfg.eoc_token_id
    ids = np.array([[m, 2, 3, 5, e, m, 2, 4]], dtype=np.int64)
    mask = np.ones_like(ids)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    features = engine.encode_images(pixels.numpy())
    step = engine.step_model(engine.rows_cross_kv(features, [[0, 1]]), np.array([2]))
    ref = TorchStepModel(model, pixels[None, :, None], np.array([2]))
    assert np.abs(step.step(ids, mask) - ref.step(ids, mask)).max() <= 1e-4
    for token in (3, 6):  # decode steps
        nxt = np.array([[token]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        assert np.abs(step.step(nxt, mask) - ref.step(nxt, mask)).max() <= 1e-4
    # the torch-free pipeline runs it end to end
    image = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
    text = FlamingoPipeline(out).generate("<image> a red", [image])
    assert len(text.token_ids) >= 1
