"""MosaicGPT (``model_type: mosaic_gpt``) -> transformers-native MPT: config and tensor names.

OpenFlamingo-3B-vitl-mpt1b's LM, ``mosaicml/mpt-1b-redpajama-200b`` (OpenFlamingo loads the copy
``anas-awadalla/mpt-1b-redpajama-200b``), ships the pre-MPT "MosaicGPT" remote code, not the
MPT-7B code transformers' ``MptForCausalLM`` mirrors. This maps it onto the native MPT layout
without running that code, and refuses with a ``ValueError`` naming the config key or tensor
whatever native MPT cannot compute: learned positions, biases, logit scale, prefix-LM,
mlp_ratio != 4, alibi_bias_max != 8, non-power-of-two head counts. QK LayerNorm
(``attn_qk_ln``) passes only with ``allow_qk_ln``, for an MPT layer that implements it.

Sources: mosaicml/examples @ eee3b25 ``examples/llm/src/models`` (what the Hub upload of
2023-04-19 ships, inferred from file sizes), the Hub config.json (blame @ 72e87cd), the model
card, llm-foundry's LPLayerNorm @ c4f8c754, transformers 4.57 ``models/mpt/modeling_mpt.py``.
Provenance in full, the MosaicGPT forward and where native MPT differs: docs/mosaic_gpt.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# config.json of mpt-1b-redpajama-200b, quoted from anas-awadalla/mpt-1b-redpajama-200b (the copy
# OpenFlamingo loads; blame @72e87cd) minus "_name_or_path". mosaicml's own file got one edit after
# upload (97dfc0f, 2023-04-20), which only set "_name_or_path". The fork's later commits touch
# mosaic_gpt.py's forward plumbing (labels, cache), not the architecture or the weights.
MPT_1B_REDPAJAMA_200B_CONFIG: dict[str, Any] = {
    "alibi": True,
    "alibi_bias_max": 8,
    "architectures": ["MosaicGPT"],
    "attn_clip_qkv": None,
    "attn_impl": "torch",
    "attn_pdrop": 0,
    "attn_qk_ln": True,
    "attn_uses_sequence_id": False,
    "auto_map": {
        "AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
        "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT",
    },
    "d_model": 2048,
    "emb_init_std": None,
    "emb_init_uniform_lim": None,
    "emb_pdrop": 0,
    "embedding_fraction": 1.0,
    "fan_mode": "fan_in",
    "init_device": "cpu",
    "init_div_is_residual": True,
    "init_gain": 0,
    "init_nonlinearity": "relu",
    "init_std": 0.02,
    "logit_scale": None,
    "low_precision_layernorm": True,
    "max_seq_len": 2048,
    "mlp_ratio": 4,
    "model_type": "mosaic_gpt",
    "n_heads": 16,
    "n_layers": 24,
    "no_bias": True,
    "param_init_fn": "kaiming_normal_",
    "prefix_lm": False,
    "resid_pdrop": 0,
    "softmax_scale": None,
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
    "torch_dtype": "float32",
    "transformers_version": "4.27.4",
    "use_cache": False,
    "verbose": 0,
    "vocab_size": 50432,
}

# MosaicGPT's nn.LayerNorm / LPLayerNorm are built without an eps argument: torch's default.
MOSAIC_GPT_LAYER_NORM_EPS = 1e-5

# MosaicGPTConfig defaults (examples@eee3b25) for the keys that change the forward.
_DEFAULTS: dict[str, Any] = {
    "mlp_ratio": 4,
    "attn_qk_ln": False,
    "attn_clip_qkv": None,
    "softmax_scale": None,
    "prefix_lm": False,
    "alibi": False,
    "alibi_bias_max": 8,
    "logit_scale": None,
    "no_bias": False,
    "embedding_fraction": 1.0,
    "max_seq_len": 2048,
}

# Keys with no effect on an inference forward: initialisation, dropout (off in eval), kernel
# choice (torch/triton/flash compute the same attention), autocast-only LayerNorm dtype
# handling, training-only sequence_id masking, and generic PretrainedConfig bookkeeping.
_INERT_KEYS = frozenset(
    {
        "param_init_fn", "init_div_is_residual", "init_std", "emb_init_std",
        "emb_init_uniform_lim", "init_gain", "fan_mode", "init_nonlinearity", "init_device",
        "verbose", "attn_pdrop", "resid_pdrop", "emb_pdrop", "attn_impl",
        "low_precision_layernorm", "attn_uses_sequence_id", "use_cache", "tokenizer_name",
        "model_type", "architectures", "auto_map", "torch_dtype", "dtype",
        "transformers_version", "_name_or_path", "name", "loss_fn", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "return_dict", "output_hidden_states",
        "output_attentions", "torchscript", "is_encoder_decoder", "is_decoder",
    }
)  # fmt: skip

# Keys that change the forward and are handled explicitly in mosaic_gpt_hf_config_to_mpt.
_MODEL_KEYS = frozenset(
    {"d_model", "n_heads", "n_layers", "vocab_size", "norm_type", "multiquery_attention"}
    | set(_DEFAULTS)
)

# MosaicGPT state-dict key -> native MPT key (``re.fullmatch`` pattern, ``str.format`` target
# fed the match groups). Shapes: D = d_model, V = vocab_size, r = mlp_ratio (must be 4).
MOSAIC_GPT_TO_MPT: list[tuple[str, str]] = [
    (r"transformer\.wte\.weight", "transformer.wte.weight"),  # [V, D], tied to the logits
    (r"transformer\.blocks\.(\d+)\.ln_1\.weight", "transformer.blocks.{0}.norm_1.weight"),  # [D]
    (r"transformer\.blocks\.(\d+)\.attn\.Wqkv\.weight", "transformer.blocks.{0}.attn.Wqkv.weight"),
    (
        r"transformer\.blocks\.(\d+)\.attn\.out_proj\.weight",
        "transformer.blocks.{0}.attn.out_proj.weight",
    ),  # [D, D]
    (r"transformer\.blocks\.(\d+)\.ln_2\.weight", "transformer.blocks.{0}.norm_2.weight"),  # [D]
    (
        r"transformer\.blocks\.(\d+)\.mlp\.mlp_up\.weight",
        "transformer.blocks.{0}.ffn.up_proj.weight",
    ),  # [rD, D]
    (
        r"transformer\.blocks\.(\d+)\.mlp\.mlp_down\.weight",
        "transformer.blocks.{0}.ffn.down_proj.weight",
    ),  # [D, rD]
    (r"transformer\.ln_f\.weight", "transformer.norm_f.weight"),  # [D]
]

# Present only when attn_qk_ln is true (mpt-1b-redpajama-200b). Native MPT has no such tensors;
# the targets are the names llm-foundry's later MPT code and vLLM's MPT use for the same thing.
MOSAIC_GPT_QK_LN_TO_MPT: list[tuple[str, str]] = [
    (r"transformer\.blocks\.(\d+)\.attn\.q_ln\.weight", "transformer.blocks.{0}.attn.q_ln.weight"),
    (r"transformer\.blocks\.(\d+)\.attn\.k_ln\.weight", "transformer.blocks.{0}.attn.k_ln.weight"),
]

_QK_LN_REASON = (
    "attn_qk_ln=true (QK LayerNorm, tensors attn.q_ln.weight/attn.k_ln.weight): MosaicGPT "
    "LayerNorms the whole d_model-wide query and key vectors after Wqkv (and after the "
    "attn_clip_qkv clamp), before the head split. transformers' native MptAttention has no such "
    "step, and a data-dependent normalisation cannot be folded into Wqkv, so native MPT would "
    "compute different logits. Loading it needs an MPT layer extended with q_ln/k_ln "
    "(bias-free LayerNorm(d_model, eps=1e-5)); pass allow_qk_ln=True only to such a layer"
)


def is_mosaic_gpt(hf_config: Mapping[str, Any]) -> bool:
    """True for a MosaicGPT config.json (mpt-1b-redpajama-200b and its fine-tunes)."""
    if hf_config.get("model_type") == "mosaic_gpt":
        return True
    return "MosaicGPT" in (hf_config.get("architectures") or ())


def _get(hf_config: Mapping[str, Any], key: str) -> Any:
    return hf_config.get(key, _DEFAULTS.get(key))


def mosaic_gpt_hf_config_to_mpt(
    hf_config: Mapping[str, Any], *, allow_qk_ln: bool = False
) -> dict[str, Any]:
    """An equivalent transformers ``MptConfig`` dict, or ``ValueError`` naming the config key.

    With ``allow_qk_ln`` the result carries ``attn_config["qk_ln"] = True``: valid for
    ``MptConfig`` but *ignored* by transformers' modeling code, so it is only correct for an MPT
    layer that implements q_ln/k_ln (see ``_QK_LN_REASON``).
    """
    if not is_mosaic_gpt(hf_config):
        raise ValueError(f"not a MosaicGPT config (model_type={hf_config.get('model_type')!r})")

    def refuse(key: str, why: str) -> ValueError:
        return ValueError(f"MosaicGPT config key {key}={hf_config.get(key)!r}: {why}")

    for key in hf_config:
        if key not in _MODEL_KEYS and key not in _INERT_KEYS:
            raise refuse(
                key,
                "unknown MosaicGPT config key (this converter knows the mosaicml/examples "
                "revision of 2023-04 that mpt-1b-redpajama-200b ships); refusing rather than "
                "guessing what it changes",
            )
    for key in ("d_model", "n_heads", "n_layers", "vocab_size"):
        value = hf_config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise refuse(key, "required positive integer")
    d_model, n_heads = hf_config["d_model"], hf_config["n_heads"]
    if d_model % n_heads:
        raise refuse("d_model", f"not divisible by n_heads={n_heads}")

    if not _get(hf_config, "alibi"):
        raise refuse(
            "alibi",
            "MosaicGPT without ALiBi adds a learned position embedding (transformer.wpe); "
            "native MPT always applies ALiBi and has no position embedding",
        )
    if n_heads & (n_heads - 1):
        raise refuse(
            "n_heads",
            "not a power of two: MosaicGPT of this revision uses ALiBi slopes "
            "2^-(h*alibi_bias_max/n_heads), native MPT interleaves the slopes of the next power "
            "of two (mosaicml/examples#307 changed MosaicGPT to match only after "
            "mpt-1b-redpajama-200b was published), so they differ and the config does not say "
            "which code trained the weights",
        )
    if _get(hf_config, "alibi_bias_max") != 8:
        raise refuse(
            "alibi_bias_max",
            "transformers' MptModel builds its ALiBi tensor without passing "
            "attn_config.alibi_bias_max (transformers 4.57 modeling_mpt.py), so native MPT "
            "always uses 8",
        )
    if _get(hf_config, "attn_qk_ln") and not allow_qk_ln:
        raise refuse("attn_qk_ln", _QK_LN_REASON)
    if not _get(hf_config, "no_bias"):
        raise refuse(
            "no_bias",
            "false means every Linear (Wqkv, out_proj, mlp_up, mlp_down) and every LayerNorm "
            "(ln_1, ln_2, ln_f, q_ln, k_ln) has a trained bias; native MPT has no bias "
            "parameters anywhere",
        )
    if _get(hf_config, "logit_scale") is not None:
        raise refuse(
            "logit_scale",
            "native MptForCausalLM does not scale logits (it could be folded into "
            "norm_f.weight, which this converter does not do)",
        )
    if _get(hf_config, "prefix_lm"):
        raise refuse(
            "prefix_lm",
            "bidirectional prefix attention; native MPT is causal only",
        )
    if _get(hf_config, "mlp_ratio") != 4:
        raise refuse(
            "mlp_ratio",
            "transformers' MptMLP (and our MPT layer) is fixed at 4 * d_model; it ignores "
            "expansion_ratio",
        )
    if hf_config.get("multiquery_attention"):
        raise refuse("multiquery_attention", "native MPT attention is multi-head only")
    norm_type = hf_config.get("norm_type", "low_precision_layernorm")
    if str(norm_type).lower() not in ("layernorm", "low_precision_layernorm"):
        raise refuse("norm_type", "native MPT uses LayerNorm only")
    fraction = _get(hf_config, "embedding_fraction")
    if not 0 < fraction <= 1:
        raise refuse("embedding_fraction", "must be in (0, 1]")
    clip = _get(hf_config, "attn_clip_qkv")
    scale = _get(hf_config, "softmax_scale")
    return {
        "model_type": "mpt",
        "architectures": ["MptForCausalLM"],
        "d_model": d_model,
        "n_heads": n_heads,
        "n_layers": hf_config["n_layers"],
        "expansion_ratio": 4,
        "max_seq_len": _get(hf_config, "max_seq_len"),
        "vocab_size": hf_config["vocab_size"],
        "layer_norm_epsilon": MOSAIC_GPT_LAYER_NORM_EPS,
        "learned_pos_emb": False,
        "no_bias": True,
        "logit_scale": None,
        "norm_type": "low_precision_layernorm",
        # only scales the embedding gradient (x*f + x.detach()*(1-f)); the forward is x
        "embedding_fraction": fraction,
        "resid_pdrop": 0.0,
        "emb_pdrop": 0.0,
        "use_cache": False,
        "tie_word_embeddings": True,  # MosaicGPT computes logits with wte.weight, always
        "attn_config": {
            "attn_type": "multihead_attention",
            "attn_pdrop": 0.0,
            "attn_impl": "torch",
            "clip_qkv": None if clip is None else float(clip),
            "softmax_scale": None if scale is None else float(scale),
            "prefix_lm": False,
            "qk_ln": bool(_get(hf_config, "attn_qk_ln")),
            "attn_uses_sequence_id": False,
            "alibi": True,
            "alibi_bias_max": _get(hf_config, "alibi_bias_max"),
        },
    }


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, target in table:
        m = re.fullmatch(pattern, key)
        if m:
            return target.format(*m.groups())
    return None


def map_mosaic_gpt_state_dict(sd: Mapping[str, T], *, allow_qk_ln: bool = False) -> dict[str, T]:
    """Rename MosaicGPT tensors to native MPT names; values pass through untouched.

    ``ValueError`` names the first tensor that has no native MPT counterpart. Nothing is dropped:
    a MosaicGPT checkpoint saved with ``no_bias: true`` has no bias tensors (they are deleted from
    the modules before any save), so a ``*.bias`` key means a biased model, refused whole.
    There is no lm_head tensor: MosaicGPT's logits use ``transformer.wte.weight``.
    """
    table = MOSAIC_GPT_TO_MPT + (MOSAIC_GPT_QK_LN_TO_MPT if allow_qk_ln else [])
    out: dict[str, T] = {}
    for key, value in sd.items():
        new = _rename(key, table)
        if new is None:
            if _rename(key, MOSAIC_GPT_QK_LN_TO_MPT) is not None:
                why = _QK_LN_REASON
            elif key.endswith(".bias"):
                why = "bias tensor (a no_bias=false MosaicGPT); native MPT has no biases"
            elif key.startswith("transformer.wpe."):
                why = "learned position embedding (alibi=false); native MPT uses ALiBi only"
            else:
                why = "not a tensor of the MosaicGPT layout this converter knows"
            raise ValueError(f"MosaicGPT tensor {key!r}: {why}")
        out[new] = value
    return out


def mosaic_gpt_tensor_shapes(hf_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a MosaicGPT checkpoint of this config holds, with its shape (MosaicGPT names).

    For mpt-1b-redpajama-200b: 24 * 8 + 2 = 194 tensors, 1,311,442,944 parameters (5.25 GB
    in float32, the size of its pytorch_model.bin on the Hub).
    """
    d, v = int(hf_config["d_model"]), int(hf_config["vocab_size"])
    r = int(_get(hf_config, "mlp_ratio"))
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, d)}
    if not _get(hf_config, "alibi"):
        shapes["transformer.wpe.weight"] = (int(_get(hf_config, "max_seq_len")), d)
    biased = not _get(hf_config, "no_bias")
    for i in range(int(hf_config["n_layers"])):
        p = f"transformer.blocks.{i}."
        layer: dict[str, tuple[int, ...]] = {
            "ln_1.weight": (d,),
            "attn.Wqkv.weight": (3 * d, d),
            "attn.out_proj.weight": (d, d),
            "ln_2.weight": (d,),
            "mlp.mlp_up.weight": (r * d, d),
            "mlp.mlp_down.weight": (d, r * d),
        }
        if _get(hf_config, "attn_qk_ln"):
            layer["attn.q_ln.weight"] = (d,)
            layer["attn.k_ln.weight"] = (d,)
        if biased:
            layer.update({k[: -len("weight")] + "bias": (s[0],) for k, s in list(layer.items())})
        shapes.update({p + k: s for k, s in layer.items()})
    shapes["transformer.ln_f.weight"] = (d,)
    if biased:
        shapes["transformer.ln_f.bias"] = (d,)
    return shapes


def parameter_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())
