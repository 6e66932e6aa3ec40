"""Generation with the PyTorch reference: the shared numpy search over a torch step model.

The search itself (greedy, beam, sampling) lives once in runtime.generation so the exported
runtime and this reference cannot drift apart; this module only supplies logits and the KV cache.
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import torch

from runtime.decoding import BaseStepModel, position_ids
from runtime.generation import GenerationConfig, GenerationResult
from runtime.generation import generate as search
from runtime.spec import cross_attn_names, past_names

from .model import Flamingo


class TorchStepModel(BaseStepModel):
    """DecoderStepModel over Flamingo: cross-attention K/V computed once, explicit KV cache.

    From pixels (`vision_x`, OpenFlamingo's layout) or, with `from_cross_kv`, from the rows'
    K/V computed elsewhere (parity feeds an export's vision outputs to this LM).
    """

    def __init__(self, model: Flamingo, vision_x: torch.Tensor, num_images: np.ndarray) -> None:
        self._start(model, model.encode_vision_x(vision_x), num_images)

    @classmethod
    def from_cross_kv(
        cls, model: Flamingo, cross_kv: dict[str, np.ndarray], num_images: np.ndarray
    ) -> TorchStepModel:
        """Over the rows' cross-attention K/V {cross_attn.{j}.key|value: (B, H, keys, Dh)}
        (runtime.decoding.rows_cross_kv), in their dtype."""
        layers = [
            tuple(torch.from_numpy(np.ascontiguousarray(cross_kv[n])) for n in cross_attn_names(j))
            for j in model.lang_model.cross_attn_layer_indices
        ]
        step_model = cls.__new__(cls)
        step_model._start(model, layers, num_images)
        return step_model

    def _start(self, model: Flamingo, cross_kv: list, num_images: np.ndarray) -> None:
        super().__init__(model.cfg.media_token_id, num_images)
        self.model = model
        self.cross_kv = cross_kv  # per cross-attention layer (B, H, keys, Dh)
        dtype = model.lang_model.embed_tokens.weight.dtype
        self.past = model.lang_model.empty_cache(self.batch, dtype)

    @property
    def past_length(self) -> int:
        return int(self.past[0][0].shape[2]) if self.past else 0

    def past_arrays(self) -> dict[str, np.ndarray]:
        return {
            name: tensor.float().numpy().copy()
            for i, pair in enumerate(self.past)
            for name, tensor in zip(past_names(i), pair)
        }

    @torch.no_grad()
    def _forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, all_positions: bool
    ) -> np.ndarray:
        logits, self.past = self.model.lang_model(
            torch.from_numpy(input_ids),
            torch.from_numpy(attention_mask),
            torch.from_numpy(self.media(input_ids)),
            self.cross_kv,
            self.past,
            torch.from_numpy(position_ids(attention_mask, input_ids.shape[1])),
        )  # all positions' logits, also for the last one (the numbers of a full forward)
        return (logits if all_positions else logits[:, -1:]).float().numpy()

    def _reorder(self, index: np.ndarray) -> None:
        idx = torch.from_numpy(index)
        self.past = [(k[idx], v[idx]) for k, v in self.past]
        self.cross_kv = [(k[idx], v[idx]) for k, v in self.cross_kv]


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

    `overrides` are GenerationConfig fields applied to `config` (a copy; checked like the
    config). Unset eos / pad ids are the model's: it stops at `<|endofchunk|>`, like OpenFlamingo.
    """
    unknown = sorted(set(overrides) - {f.name for f in fields(GenerationConfig)})
    if unknown:
        raise ValueError(f"unknown generation setting(s) {unknown}")
    config = config or GenerationConfig()
    if overrides:
        config = replace(config, **overrides)
    config = config.with_model_defaults((model.cfg.eoc_token_id,), model.cfg.pad_token_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(lang_x)
    # each row's real image count (rows of vision_x are padded to the longest): a generated
    # `<image>` token then keeps attending to the row's last real image
    num_images = (lang_x == model.cfg.media_token_id).sum(-1).numpy()
    step_model = TorchStepModel(model, vision_x, num_images)
    return search(step_model, lang_x.numpy(), attention_mask.numpy(), config)
