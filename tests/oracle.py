"""The reference: the published OpenFlamingo ``Flamingo`` (open-flamingo 2.0.1), built from files.

:func:`load_oracle` assembles it the way ``open_flamingo/src/factory.py`` does, minus open_clip:

- ``open_flamingo/__init__`` imports ``open_clip`` (which needs torchvision); an empty module
  stands in, since only ``create_model_and_transforms`` uses it and we do not call that;
- the vision encoder is transformers' ``CLIPVisionModelWithProjection`` (``root/vision_hf``)
  behind a ``.visual`` whose forward returns ``(pooled, patch_tokens)`` as open_clip's
  ``VisionTransformer(output_tokens=True)`` did in open_clip <= 2.22: patch tokens are
  ``last_hidden_state[:, 1:]``, taken before ``post_layernorm`` (open_clip's ``ln_post``);
- the LM is ``AutoModelForCausalLM.from_pretrained(lm_dir)`` without ``trust_remote_code``,
  extended with ``FlamingoLMMixin``; the decoder-layer attribute comes from the package's own
  ``_infer_decoder_layers_attr_name``; the tokenizer gets ``<|endofchunk|>``, ``<image>`` and
  ``<PAD>`` (when it has no pad token) and the embeddings are resized, as in factory.py;
- the checkpoint (plain ``.pt``, DDP ``{"model_state_dict": {"module.*"}}`` or ``.safetensors``)
  is loaded with ``strict=False``; unexpected keys are an error.

Nothing here comes from our ``flamingo/`` package except the :class:`TinyPaths` record.

Compatibility with transformers 4.57.6 (the package targets 4.28-4.33). Checked for LLaMA,
GPT-NeoX, MPT (transformers' native ``MptForCausalLM``) and OPT, with forward, greedy and
3-beam ``generate`` on left-padded batches of interleaved multi-image prompts
(``tests/test_oracle_fixture.py`` keeps checking it). **Nothing breaks, so there is no shim**:

- decoder layers now return a tensor (LLaMA) or a tuple (GPT-NeoX, MPT, OPT); ``FlamingoLayer``
  passes the layer's return value through untouched, so either works;
- every model calls its layers as ``layer(hidden_states, attention_mask=..., **kwargs)`` with
  the hidden states positional, which ``FlamingoLayer.forward(lang_x, attention_mask, **kw)``
  accepts, MPT's ``position_bias`` / ``layer_past`` included. (GPT-2 passes its cache and mask
  positionally and would break; it is not a family OpenFlamingo supports.)
- ``DynamicCache`` replaces tuple caches; the mixin never touches the cache, and generation with
  the cache equals generation without it (where every step re-derives media locations).
- One silent difference, numerically harmless: ``generate()`` now builds ``position_ids`` from
  the attention mask only if ``"position_ids"`` appears in ``inspect.signature(model.forward)``,
  and the mixin's ``forward(input_ids, attention_mask, **kwargs)`` hides it. LLaMA and GPT-NeoX
  therefore number left-padded rows from the first pad (``cache_position``) instead of the first
  real token. Rotary attention depends only on position differences and pads are masked, so the
  logits agree with an unpadded run to ~1e-6; OPT derives positions from the mask internally and
  MPT uses ALiBi. A shim exposing ``position_ids`` would change nothing but float rounding.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from torch import nn

EOC_TOKEN = "<|endofchunk|>"
MEDIA_TOKEN = "<image>"


def import_open_flamingo():
    """The published package's ``Flamingo``, mixin, ``extend_instance`` and layer-name lookup."""
    sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))
    from open_flamingo.src.factory import _infer_decoder_layers_attr_name
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    return Flamingo, FlamingoLMMixin, extend_instance, _infer_decoder_layers_attr_name


class HFCLIPVisual(nn.Module):
    """open_clip ``visual`` with ``output_tokens=True`` (open_clip <= 2.22 semantics)."""

    def __init__(self, clip_vision: nn.Module):
        super().__init__()
        self.clip = clip_vision

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.clip(pixel_values=pixels)
        pooled = out.image_embeds  # ln_post(CLS) @ proj
        patch_tokens = out.last_hidden_state[:, 1:]  # (B, grid*grid, width), before ln_post
        return pooled, patch_tokens


class _VisionEncoder(nn.Module):
    """What Flamingo expects as ``vision_encoder``: it keeps ``vision_encoder.visual``."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``checkpoint.pt`` (plain or DDP-wrapped) or ``.safetensors``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_oracle(paths):
    """``(Flamingo, tokenizer)`` for a :class:`flamingo.tiny.TinyPaths` fixture, in eval mode.

    The tokenizer pads on the left, as OpenFlamingo's evaluation does.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModelWithProjection

    Flamingo, FlamingoLMMixin, extend_instance, infer_layers_attr = import_open_flamingo()

    tokenizer = AutoTokenizer.from_pretrained(paths.lm_dir, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    tokenizer.padding_side = "left"

    lang_encoder = AutoModelForCausalLM.from_pretrained(paths.lm_dir, local_files_only=True)
    extend_instance(lang_encoder, FlamingoLMMixin)
    lang_encoder.set_decoder_layers_attr_name(infer_layers_attr(lang_encoder))
    lang_encoder.resize_token_embeddings(len(tokenizer))

    vision_hf_dir = paths.vision_hf_dir or Path(paths.root) / "vision_hf"
    clip = CLIPVisionModelWithProjection.from_pretrained(vision_hf_dir, local_files_only=True)
    model = Flamingo(
        _VisionEncoder(HFCLIPVisual(clip)),
        lang_encoder,
        tokenizer.encode(EOC_TOKEN)[-1],
        tokenizer.encode(MEDIA_TOKEN)[-1],
        vis_dim=clip.config.hidden_size,
        cross_attn_every_n_layers=paths.cross_attn_every_n_layers,
    )
    result = model.load_state_dict(load_checkpoint(paths.checkpoint_path), strict=False)
    assert not result.unexpected_keys, f"unexpected checkpoint keys: {result.unexpected_keys}"
    # Flamingo's own weights exist only in the checkpoint ("gated_cross_attn_layers." aliases
    # of the loaded ".gated_cross_attn_layer." tensors are reported missing; they are not).
    unloaded = [k for k in result.missing_keys if "perceiver." in k or "_attn_layer." in k]
    assert not unloaded, f"checkpoint lacks Flamingo weights: {unloaded}"
    model.eval()
    return model, tokenizer
