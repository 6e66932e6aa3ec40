"""MosaicGPT (mpt-1b-redpajama-200b's remote code) -> transformers-native MPT.

The reference forward below is written from the MosaicGPT semantics documented in
flamingo/mosaic_gpt.py (mosaicml/examples@eee3b25: attention.py, gpt_blocks.py, mosaic_gpt.py),
not from transformers, so agreement with MptForCausalLM on the renamed weights is evidence that
the rename table and the config translation are right.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flamingo.mosaic_gpt import (
    MOSAIC_GPT_TO_MPT,
    MPT_1B_REDPAJAMA_200B_CONFIG,
    is_mosaic_gpt,
    map_mosaic_gpt_state_dict,
    mosaic_gpt_hf_config_to_mpt,
    mosaic_gpt_tensor_shapes,
    parameter_count,
)

transformers = pytest.importorskip("transformers")

EPS = 1e-5


def tiny_config(**overrides) -> dict:
    cfg = dict(MPT_1B_REDPAJAMA_200B_CONFIG)
    cfg.update(d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=16, attn_qk_ln=False)
    cfg.update(overrides)
    return json.loads(json.dumps(cfg))  # as read back from a config.json


def random_mosaic_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in mosaic_gpt_tensor_shapes(cfg).items():
        if len(shape) == 1:  # LayerNorm gains: around 1 so they matter but stay well-conditioned
            sd[key] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    return sd


def mosaic_gpt_reference(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor):
    """MosaicGPT's forward, float32, eval mode, no padding (examples@eee3b25 semantics)."""
    d, h = cfg["d_model"], cfg["n_heads"]
    dh = d // h
    s = ids.shape[1]

    def ln(x, w):  # LPLayerNorm == F.layer_norm outside autocast; no_bias removed the bias
        return F.layer_norm(x, (d,), w, None, EPS)

    # ALiBi of this revision: slope_h = 2^-(h * alibi_bias_max / n_heads), bias slope*(j - s + 1)
    slopes = 2.0 ** (-torch.arange(1, h + 1) * (cfg["alibi_bias_max"] / h))
    bias = torch.arange(1 - s, 1).float().view(1, 1, 1, s) * slopes.view(1, h, 1, 1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scale = cfg["softmax_scale"] or 1 / math.sqrt(dh)

    x = sd["transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}."
        qkv = ln(x, sd[p + "ln_1.weight"]) @ sd[p + "attn.Wqkv.weight"].T
        if cfg["attn_clip_qkv"]:
            qkv = qkv.clamp(-cfg["attn_clip_qkv"], cfg["attn_clip_qkv"])
        q, k, v = qkv.chunk(3, dim=-1)
        if cfg["attn_qk_ln"]:
            q, k = ln(q, sd[p + "attn.q_ln.weight"]), ln(k, sd[p + "attn.k_ln.weight"])
        q, k, v = (t.reshape(1, s, h, dh).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) * scale + bias
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, s, d)
        x = x + ctx @ sd[p + "attn.out_proj.weight"].T
        up = ln(x, sd[p + "ln_2.weight"]) @ sd[p + "mlp.mlp_up.weight"].T
        x = x + F.gelu(up) @ sd[p + "mlp.mlp_down.weight"].T
    x = ln(x, sd["transformer.ln_f.weight"])
    return x @ sd["transformer.wte.weight"].T


def native_mpt(mapped_cfg: dict):
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(1)
    return MptForCausalLM(MptConfig(**mapped_cfg)).eval()


def load_strict(model, mapped_sd: dict[str, torch.Tensor]) -> None:
    """Every model tensor comes from the checkpoint; lm_head.weight is the tied wte."""
    missing, unexpected = model.load_state_dict(mapped_sd, strict=False)
    assert unexpected == []
    assert missing == ["lm_head.weight"]
    assert model.lm_head.weight is model.transformer.wte.weight
    assert set(model.state_dict()) - {"lm_head.weight"} == set(mapped_sd)


IDS = torch.tensor([[3, 17, 5, 60, 0, 9, 9, 41, 2, 33, 12]])


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attn_clip_qkv": 0.5}, {"softmax_scale": 0.3}, {"n_heads": 8}, {"n_heads": 1}],
    ids=["plain", "clip_qkv", "softmax_scale", "8_heads", "1_head"],
)
def test_native_mpt_matches_mosaic_gpt(overrides):
    cfg = tiny_config(**overrides)
    sd = random_mosaic_state_dict(cfg)
    mapped_cfg = mosaic_gpt_hf_config_to_mpt(cfg)
    model = native_mpt(mapped_cfg)
    load_strict(model, map_mosaic_gpt_state_dict(sd))
    with torch.no_grad():
        got = model(IDS).logits
        want = mosaic_gpt_reference(sd, cfg, IDS)
    assert got.shape == (1, IDS.shape[1], cfg["vocab_size"])
    assert (got - want).abs().max().item() <= 1e-5


def test_qk_ln_needs_an_extended_mpt_layer():
    """The real 1B model's flavour: native MPT refuses the q_ln/k_ln tensors; adding them is
    exactly what is missing (LayerNorm of the d_model-wide q and k before the head split)."""
    cfg = tiny_config(attn_qk_ln=True)
    sd = random_mosaic_state_dict(cfg)
    with pytest.raises(ValueError, match="attn_qk_ln"):
        mosaic_gpt_hf_config_to_mpt(cfg)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_ln\.weight.*QK LayerNorm"):
        map_mosaic_gpt_state_dict(sd)

    mapped_cfg = mosaic_gpt_hf_config_to_mpt(cfg, allow_qk_ln=True)
    assert mapped_cfg["attn_config"]["qk_ln"] is True
    mapped_sd = map_mosaic_gpt_state_dict(sd, allow_qk_ln=True)
    model = native_mpt(mapped_cfg)
    _, unexpected = model.load_state_dict(mapped_sd, strict=False)
    assert sorted(unexpected) == sorted(
        f"transformer.blocks.{i}.attn.{n}_ln.weight" for i in range(2) for n in "qk"
    )
    with torch.no_grad():
        want = mosaic_gpt_reference(sd, cfg, IDS)
        plain = model(IDS).logits
    assert (plain - want).abs().max().item() > 1e-3  # ignoring q_ln/k_ln is wrong

    # Test-side extension: q_ln/k_ln applied to Wqkv's output (valid without clip_qkv).
    d = cfg["d_model"]
    for block in model.transformer.blocks:
        block.attn.q_ln = nn.LayerNorm(d, eps=EPS, bias=False)
        block.attn.k_ln = nn.LayerNorm(d, eps=EPS, bias=False)

        def hook(attn, _inputs, qkv):
            q, k, v = qkv.chunk(3, dim=-1)
            return torch.cat([attn.q_ln(q), attn.k_ln(k), v], dim=-1)

        block.attn.Wqkv.register_forward_hook(lambda m, i, o, a=block.attn: hook(a, i, o))
    load_strict(model, mapped_sd)
    with torch.no_grad():
        got = model(IDS).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_real_config_translation():
    cfg = MPT_1B_REDPAJAMA_200B_CONFIG
    assert is_mosaic_gpt(cfg)
    assert not is_mosaic_gpt({"model_type": "mpt", "architectures": ["MPTForCausalLM"]})
    with pytest.raises(ValueError, match="attn_qk_ln=True"):
        mosaic_gpt_hf_config_to_mpt(cfg)
    m = mosaic_gpt_hf_config_to_mpt(cfg, allow_qk_ln=True)
    assert (m["model_type"], m["d_model"], m["n_heads"], m["n_layers"]) == ("mpt", 2048, 16, 24)
    assert (m["vocab_size"], m["max_seq_len"], m["expansion_ratio"]) == (50432, 2048, 4)
    assert m["layer_norm_epsilon"] == 1e-5 and m["tie_word_embeddings"] is True
    assert m["attn_config"] == {
        "attn_type": "multihead_attention",
        "attn_pdrop": 0.0,
        "attn_impl": "torch",
        "clip_qkv": None,
        "softmax_scale": None,
        "prefix_lm": False,
        "qk_ln": True,
        "attn_uses_sequence_id": False,
        "alibi": True,
        "alibi_bias_max": 8,
    }
    from transformers import MptConfig

    assert MptConfig(**m).attn_config.alibi_bias_max == 8

    shapes = mosaic_gpt_tensor_shapes(cfg)
    assert len(shapes) == 24 * 8 + 2
    assert shapes["transformer.wte.weight"] == (50432, 2048)
    assert shapes["transformer.blocks.23.attn.Wqkv.weight"] == (6144, 2048)
    assert shapes["transformer.blocks.0.mlp.mlp_up.weight"] == (8192, 2048)
    assert shapes["transformer.blocks.0.attn.q_ln.weight"] == (2048,)
    assert parameter_count(shapes) == 1_311_442_944  # x 4 bytes = 5.25 GB, the Hub's .bin
    renamed = map_mosaic_gpt_state_dict(dict.fromkeys(shapes, 0), allow_qk_ln=True)
    assert "transformer.blocks.23.ffn.down_proj.weight" in renamed
    assert "transformer.norm_f.weight" in renamed and len(renamed) == len(shapes)


def test_rename_table_targets_native_mpt_names():
    from transformers import MptConfig, MptForCausalLM

    mapped = mosaic_gpt_hf_config_to_mpt(tiny_config())
    with torch.device("meta"):
        names = set(MptForCausalLM(MptConfig(**mapped)).state_dict())
    targets = {t.format(0) for _, t in MOSAIC_GPT_TO_MPT}
    assert targets <= names


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"alibi": False}, "alibi"),
        ({"no_bias": False}, "no_bias"),
        ({"logit_scale": "inv_sqrt_d_model"}, "logit_scale"),
        ({"prefix_lm": True}, "prefix_lm"),
        ({"mlp_ratio": 2}, "mlp_ratio"),
        ({"alibi_bias_max": 4}, "alibi_bias_max"),  # transformers' MptModel ignores it
        ({"n_heads": 6, "d_model": 36}, "n_heads"),  # not a power of two: ALiBi slopes differ
        ({"d_model": 30}, "d_model"),
        ({"multiquery_attention": True}, "multiquery_attention"),
        ({"norm_type": "rmsnorm"}, "norm_type"),
        ({"attn_config": {"qk_ln": False}}, "attn_config"),
        ({"rope": True}, "rope"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_config_refusals_name_the_key(overrides, key):
    cfg = tiny_config(**overrides)
    with pytest.raises(ValueError, match=rf"config key {key}="):
        mosaic_gpt_hf_config_to_mpt(cfg, allow_qk_ln=True)


def test_power_of_two_heads_and_inert_keys_accepted():
    cfg = tiny_config(n_heads=2, d_model=24, attn_impl="triton", low_precision_layernorm=False)
    assert mosaic_gpt_hf_config_to_mpt(cfg)["n_heads"] == 2
    with pytest.raises(ValueError, match="not a MosaicGPT config"):
        mosaic_gpt_hf_config_to_mpt({"model_type": "mpt"})


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("transformer.blocks.0.attn.Wqkv.bias", "bias tensor"),
        ("transformer.ln_f.bias", "bias tensor"),
        ("transformer.wpe.weight", "learned position embedding"),
        ("lm_head.weight", "not a tensor"),
        ("transformer.blocks.0.norm_1.weight", "not a tensor"),
        ("transformer.blocks.x.ln_1.weight", "not a tensor"),
    ],
)
def test_state_dict_refusals_name_the_tensor(key, why):
    sd = random_mosaic_state_dict(tiny_config())
    sd[key] = torch.zeros(1)
    with pytest.raises(ValueError, match=re.escape(f"{key}': {why}")):
        map_mosaic_gpt_state_dict(sd)


@torch.no_grad()
def test_our_mpt_layer_with_qk_ln_matches_mosaic_gpt() -> None:
    """OpenFlamingo-3B's LM: our MPT layer with qk_ln reproduces MosaicGPT through the loader's
    config translation and rename table (gates zero, so the Flamingo LM is the plain LM)."""
    from pathlib import Path

    from flamingo.config import FlamingoConfig, VisionConfig
    from flamingo.loaders import lm_config_from_hf, map_lm_key
    from flamingo.model import FlamingoLM

    cfg = tiny_config(attn_qk_ln=True)
    sd = random_mosaic_state_dict(cfg)
    lm_cfg = lm_config_from_hf(cfg, Path("config.json"))
    assert lm_cfg.family == "mpt" and lm_cfg.qk_ln
    lm = FlamingoLM(FlamingoConfig(vision=VisionConfig(width=32), lm=lm_cfg))
    mapped = {
        map_lm_key("mpt", k): v for k, v in map_mosaic_gpt_state_dict(sd, allow_qk_ln=True).items()
    }
    missing, unexpected = lm.load_state_dict(mapped, strict=False)
    assert not unexpected
    assert all(k.startswith("cross_attn_layers.") or k == "lm_head.weight" for k in missing)
    ids = torch.randint(0, cfg["vocab_size"], (1, 7))
    mask = torch.ones_like(ids)
    logits, _ = lm.eval()(ids, mask, torch.zeros_like(ids), [], lm.empty_cache(1, torch.float32))
    assert (logits - mosaic_gpt_reference(sd, cfg, ids)).abs().max() < 1e-5
