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

The code lives in ``flamingo/oracle.py`` (``load_open_flamingo``) so the benchmarks build the
same baseline; it uses nothing of our reference model or loaders, only the published package.

Compatibility with transformers 4.57.6 (the package targets 4.28-4.33). Checked for LLaMA,
GPT-NeoX, MPT (transformers' native ``MptForCausalLM``) and OPT, with forward, greedy and
3-beam ``generate`` on left-padded batches of interleaved multi-image prompts
(``tests/flamingo/test_oracle_fixture.py`` keeps checking it). **Nothing breaks, so there is
no shim**:

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

from pathlib import Path

from flamingo.oracle import load_open_flamingo
from flamingo.oracle import read_flamingo_checkpoint as load_checkpoint

__all__ = ["load_checkpoint", "load_oracle"]


def load_oracle(paths):
    """``(Flamingo, tokenizer)`` for a :class:`fixtures.tiny.TinyPaths` fixture, in eval mode.

    The tokenizer pads on the left, as OpenFlamingo's evaluation does.
    """
    vision_hf_dir = paths.vision_hf_dir or Path(paths.root) / "vision_hf"
    return load_open_flamingo(
        paths.lm_dir, vision_hf_dir, paths.checkpoint_path, paths.cross_attn_every_n_layers
    )
