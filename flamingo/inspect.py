"""A plain-data description of a loaded model (what `flamingo-export inspect` prints)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .loaders import LoadReport
from .model import Flamingo


def count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: Flamingo, tokenizer: Any, report: LoadReport) -> dict[str, Any]:
    cfg = model.cfg
    lm = model.lang_model
    xattn = count(lm.cross_attn_layers)
    lm_total = count(lm) - xattn  # tied weights counted once
    return {
        "lm_family": cfg.lm.family,
        "media_token_id": cfg.media_token_id,
        "eoc_token_id": cfg.eoc_token_id,
        "pad_token_id": cfg.pad_token_id,
        "cross_attn_every_n_layers": cfg.cross_attn.every_n_layers,
        "cross_attn_layer_indices": lm.cross_attn_layer_indices,
        "cross_attn": asdict(cfg.cross_attn),
        "media_rule": cfg.media_rule,
        "image_tokens": cfg.image_tokens,
        # frames a clip may have (learned frame embeddings); None: no frame embeddings
        "max_num_frames": cfg.resampler.max_num_frames,
        "num_parameters": {
            "vision_encoder": count(model.vision_encoder),
            "perceiver": count(model.perceiver) if model.perceiver is not None else 0,
            "cross_attention": xattn,
            "language_model": lm_total,
            "total": count(model),
        },
        "tokenizer_size": len(tokenizer),
        "lm": {k: v for k, v in asdict(cfg.lm).items() if k != "rope_inv_freq"},
        "vision": asdict(cfg.vision),
        "resampler": asdict(cfg.resampler),
        "files": {
            "lm": report.lm_dir,
            "vision": report.vision_path,
            "checkpoint": report.checkpoint_path,
        },
        "unexpected_keys": report.unexpected,
        "filled": report.filled,
        "assumptions": report.assumptions,
    }
