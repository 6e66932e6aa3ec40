"""The independent oracle: the published OpenFlamingo ``Flamingo`` (open-flamingo 2.0.1) built
from local files, the way ``open_flamingo/src/factory.py`` does, minus open_clip.

It is the reference of the parity tests and the open_flamingo peer of ``flamingo-export bench``,
so it uses nothing of our reference model or loaders (``flamingo.model``, ``flamingo.loaders``):
only the published package and transformers (how it is assembled: ``load_open_flamingo``).

Install: ``pip install --no-deps open-flamingo==2.0.1`` (its own requirements pin torch 2.0.1).
Compatibility with transformers 4.57 is checked by ``tests/flamingo/test_oracle_fixture.py``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn

from runtime.prompts import EOC_TOKEN, MEDIA_TOKEN, PAD_TOKEN


def import_open_flamingo():
    """``(Flamingo, FlamingoLMMixin, extend_instance)`` from the published package.

    ``open_flamingo/__init__`` imports ``open_clip`` (which needs torchvision) only for
    ``create_model_and_transforms``; when open_clip is not installed an empty module stands in.
    """
    if "open_clip" not in sys.modules and importlib.util.find_spec("open_clip") is None:
        sys.modules["open_clip"] = types.ModuleType("open_clip")
    try:
        from open_flamingo.src.flamingo import Flamingo
        from open_flamingo.src.flamingo_lm import FlamingoLMMixin
        from open_flamingo.src.utils import extend_instance
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "building a tiny OpenFlamingo checkpoint needs the published package: "
            "pip install --no-deps open-flamingo==2.0.1 einops einops-exts"
        ) from err
    return Flamingo, FlamingoLMMixin, extend_instance


class HFVisionTokens(nn.Module):
    """open_clip ``visual`` stand-in: ``forward(pixels) -> (pooled, patch_tokens)``."""

    def __init__(self, clip_vision: nn.Module):
        super().__init__()
        self.clip = clip_vision

    def forward(self, pixels: torch.Tensor):
        out = self.clip(pixel_values=pixels)
        return out.image_embeds, out.last_hidden_state[:, 1:]


def add_flamingo_tokens(tokenizer) -> None:
    """Extend a tokenizer in place exactly like open_flamingo/src/factory.py."""
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def read_flamingo_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``checkpoint.pt`` (plain or DDP-wrapped) or ``.safetensors``.

    Independent of flamingo.loaders on purpose: the oracle must not share our reading of files.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_open_flamingo(
    lm_dir: str | Path,
    vision_hf_dir: str | Path,
    checkpoint_path: str | Path,
    cross_attn_every_n_layers: int,
):
    """``(Flamingo, tokenizer)``: the published OpenFlamingo model built from files, eval mode.

    The oracle of the parity tests and the baseline of the benchmarks, assembled the way
    ``open_flamingo/src/factory.py`` does, minus open_clip: the vision tower is transformers'
    ``CLIPVisionModelWithProjection`` (``vision_hf_dir``) behind a ``.visual`` returning
    open_clip <= 2.22's ``(pooled, patch tokens before ln_post)``; the LM is
    ``AutoModelForCausalLM`` (no ``trust_remote_code``) extended with ``FlamingoLMMixin``, its
    decoder-layer attribute found by the package's own ``_infer_decoder_layers_attr_name``; the
    tokenizer gets ``<|endofchunk|>``, ``<image>`` (and ``<PAD>``) and pads on the left, as
    OpenFlamingo's evaluation does; the checkpoint loads with ``strict=False`` and unexpected
    keys are an error. Nothing of our reference model or loaders is used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModelWithProjection

    Flamingo, FlamingoLMMixin, extend_instance = import_open_flamingo()
    from open_flamingo.src.factory import _infer_decoder_layers_attr_name

    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    add_flamingo_tokens(tokenizer)
    tokenizer.padding_side = "left"

    lang_encoder = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True)
    extend_instance(lang_encoder, FlamingoLMMixin)
    lang_encoder.set_decoder_layers_attr_name(_infer_decoder_layers_attr_name(lang_encoder))
    lang_encoder.resize_token_embeddings(len(tokenizer))

    clip = CLIPVisionModelWithProjection.from_pretrained(vision_hf_dir, local_files_only=True)
    vision = nn.Module()
    vision.visual = HFVisionTokens(clip)
    model = Flamingo(
        vision,
        lang_encoder,
        tokenizer.encode(EOC_TOKEN)[-1],
        tokenizer.encode(MEDIA_TOKEN)[-1],
        vis_dim=clip.config.hidden_size,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
    )
    result = model.load_state_dict(read_flamingo_checkpoint(checkpoint_path), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{checkpoint_path}: unexpected checkpoint keys {result.unexpected_keys}")
    # Flamingo's own weights exist only in the checkpoint ("gated_cross_attn_layers." aliases
    # of the loaded ".gated_cross_attn_layer." tensors are reported missing; they are not).
    unloaded = [k for k in result.missing_keys if "perceiver." in k or "_attn_layer." in k]
    if unloaded:
        raise ValueError(f"{checkpoint_path}: checkpoint lacks Flamingo weights {unloaded}")
    model.eval()
    return model, tokenizer
