"""Generation with the PyTorch reference: the shared numpy search over a torch step model.

The search itself (greedy, beam, sampling) lives once in runtime.generation so the exported
runtime and this reference cannot drift apart; this module only supplies logits and the KV cache.
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.decoding import MediaCounter, position_ids
from runtime.generation import GenerationConfig, GenerationResult
from runtime.generation import generate as search

from .model import Flamingo


class TorchStepModel:
    """StepModel over Flamingo: cross-attention K/V computed once, explicit self-attention cache."""

    def __init__(self, model: Flamingo, vision_x: torch.Tensor, num_images: np.ndarray) -> None:
        self.model = model
        self.cross_kv = model.encode_vision_x(vision_x)
        self.media = MediaCounter(model.cfg.media_token_id, num_images)
        dtype = model.lang_model.embed_tokens.weight.dtype
        self.past = model.lang_model.empty_cache(vision_x.shape[0], dtype)

    @torch.no_grad()
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        media_index = self.media(input_ids)
        logits, self.past = self.model.lang_model(
            torch.from_numpy(input_ids),
            torch.from_numpy(attention_mask),
            torch.from_numpy(media_index),
            self.cross_kv,
            self.past,
            torch.from_numpy(position_ids(attention_mask, input_ids.shape[1])),
        )
        return logits[:, -1].float().numpy()

    def reorder_cache(self, index: np.ndarray) -> None:
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        self.past = [(k[idx], v[idx]) for k, v in self.past]
        self.cross_kv = [(k[idx], v[idx]) for k, v in self.cross_kv]
        self.media.reorder(idx.numpy())


@torch.no_grad()
def generate(
    model: Flamingo,
    vision_x: torch.Tensor,
    lang_x: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    **overrides: object,
) -> GenerationResult:
    """OpenFlamingo's `generate`: vision_x (B, T_img, 1, C, H, W), left-padded lang_x (B, T).

    Stops at `<|endofchunk|>` by default, like OpenFlamingo.
    """
    config = config or GenerationConfig(
        eos_token_ids=(model.cfg.eoc_token_id,), pad_token_id=model.cfg.pad_token_id
    )
    for k, v in overrides.items():
        setattr(config, k, v)
    if attention_mask is None:
        attention_mask = torch.ones_like(lang_x)
    # each row's real image count (rows of vision_x are padded to the longest): a generated
    # `<image>` token then keeps attending to the row's last real image
    num_images = (lang_x == model.cfg.media_token_id).sum(-1).numpy()
    step_model = TorchStepModel(model, vision_x, num_images)
    return search(step_model, lang_x.numpy(), attention_mask.numpy(), config)
