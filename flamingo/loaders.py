"""Load a Flamingo model from the local files users have; nothing is downloaded.

Three sources, as OpenFlamingo composes them:
- the language model: an HF directory (config.json, safetensors or .bin shards, tokenizer);
- the vision tower: an open_clip CLIP state dict (`visual.*`) or an HF CLIP directory;
- the Flamingo weights: OpenFlamingo's `checkpoint.pt` (plain or a `model_state_dict` training
  save with `module.` prefixes) or safetensors: resampler, gated cross-attention, embeddings.

Every error names the file, the key and what was expected. torch.load always uses
weights_only=True; trust_remote_code is never used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from runtime.errors import FlamingoExportError
from runtime.prompts import EOC_TOKEN, MEDIA_TOKEN, PAD_TOKEN
from runtime.schema import check_document, load_json

from .config import (
    LM_FAMILIES,
    PRESETS,
    CrossAttentionConfig,
    FlamingoConfig,
    LMConfig,
    ResamplerConfig,
    VisionConfig,
)
from .model import Flamingo


class LoadError(FlamingoExportError, ValueError):
    """A model file is missing, unreadable or does not fit: the message says which and why."""


def read_json_object(path: Path, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON object from `path`, checked against `schema` (JSON Schema, runtime.schema): any
    problem is a LoadError naming the file and the key."""
    data = load_json(path, LoadError)
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise LoadError(f"{path}: expected a JSON object, got {kind}")
    return check_document(data, schema, str(path), LoadError) if schema else data


def _obj(properties: dict[str, Any], required: Iterable[str] = ()) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


_POSITIVE = {"type": "integer", "minimum": 1}
_POSITIVE_OR_NULL = {"type": ["integer", "null"], "minimum": 1}
_EPS = {"type": "number", "exclusiveMinimum": 0}
_FRACTION = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
_ROPE = {
    "rope_theta": _EPS,
    "rope_scaling": {
        "type": ["object", "null"],
        "properties": {"rope_type": {"type": "string"}, "type": {"type": "string"},
                       "factor": _EPS},
    },
}  # fmt: skip
SHARD_INDEX_SCHEMA = _obj(
    {"weight_map": {"type": "object", "additionalProperties": {"type": "string", "minLength": 1}}},
    ["weight_map"],
)
# The keys of an HF config.json each family's conversion reads (HF's names), with their types.
_HF_REQUIRED = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"]  # fmt: skip
_HF_ROTARY = {  # what LLaMA and GPT-NeoX configs share
    **{k: _POSITIVE for k in (*_HF_REQUIRED, "max_position_embeddings")},
    "hidden_act": {"type": "string"},
    **{k: {"type": "boolean"} for k in ("tie_word_embeddings", "attention_bias")},
    **_ROPE,
}
HF_CONFIG_SCHEMAS: dict[str, dict[str, Any]] = {
    "llama": _obj(
        {
            **_HF_ROTARY,
            "num_key_value_heads": _POSITIVE_OR_NULL,
            "head_dim": _POSITIVE_OR_NULL,
            "rms_norm_eps": _EPS,
            "mlp_bias": {"type": "boolean"},
        },
        _HF_REQUIRED,
    ),
    "gpt_neox": _obj(
        {
            **_HF_ROTARY,
            "layer_norm_eps": _EPS,
            "rotary_pct": _FRACTION,
            "partial_rotary_factor": _FRACTION,
            "rotary_emb_base": _EPS,
            "use_parallel_residual": {"type": "boolean"},
        },
        _HF_REQUIRED,
    ),
    "mpt": _obj(
        {
            **{k: _POSITIVE for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                      "max_seq_len")},
            "layer_norm_epsilon": _EPS,
            "attn_config": {"type": ["object", "null"]},
        },
        ["vocab_size", "d_model", "n_layers", "n_heads"],
    ),
}  # fmt: skip
OPEN_CLIP_CONFIG_SCHEMA = _obj(
    {
        "model_cfg": _obj(
            {
                "quick_gelu": {"type": "boolean"},
                "embed_dim": _POSITIVE,
                "vision_cfg": _obj(
                    {
                        **{k: _POSITIVE for k in ("image_size", "layers", "width",
                                                  "head_width", "patch_size")},
                        "mlp_ratio": _EPS,
                    }
                ),
            }
        )
    }
)  # fmt: skip
HF_CLIP_CONFIG_SCHEMA = _obj(
    {
        "vision_config": {"type": "object"},
        "num_attention_heads": _POSITIVE,
        "hidden_act": {"enum": ["quick_gelu", "gelu"]},
        "layer_norm_eps": _EPS,
    }
)


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or .pt/.bin/.pth via torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated files surface many exception types
        raise LoadError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def unwrap_training_save(sd: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """OpenFlamingo training saves {"model_state_dict": {...}} with DDP `module.` prefixes."""
    if "model_state_dict" in sd:
        sd = sd["model_state_dict"]
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise LoadError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
        out[k.removeprefix("module.")] = v
    return out


Reader = Callable[[Path], dict[str, Any]]  # read_state_dict, or flamingo.lazy's lazy reader


def read_hf_weights(
    lm_dir: Path, sources: dict[str, Path] | None = None, reader: Reader = read_state_dict
) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory: single file or sharded, safetensors preferred.
    `sources` (if given) receives the file each tensor came from; `reader` reads one file."""
    sources = sources if sources is not None else {}
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (lm_dir / single).is_file():
            sd = reader(lm_dir / single)
            sources.update(dict.fromkeys(sd, lm_dir / single))
            return sd
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = lm_dir / index_name
        if index.is_file():
            data = read_json_object(index, SHARD_INDEX_SCHEMA)
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(data["weight_map"].values())):
                # the name, not its target, must stay inside: the hub cache's snapshot files
                # are symlinks into its blobs folder (huggingface_hub's layout)
                name = PurePosixPath(shard)
                if name.is_absolute() or "\\" in shard or ".." in name.parts or not name.name:
                    raise LoadError(f"{index}: weight_map names {shard!r}, outside {lm_dir}")
                shard_sd = reader(lm_dir / shard)
                sources.update(dict.fromkeys(shard_sd, lm_dir / shard))
                sd.update(shard_sd)
            return sd
    raise LoadError(
        f"{lm_dir}: no weights found (expected model.safetensors, pytorch_model.bin or a "
        "sharded *.index.json)"
    )


# ---------------------------------------------------------------------------------------------
# Language model: config and the one rename table per family
# ---------------------------------------------------------------------------------------------

# HF name prefix -> FlamingoLM name prefix; inside a decoder layer the names are HF's own.
LM_KEY_MAP: dict[str, list[tuple[str, str]]] = {
    "llama": [
        ("model.embed_tokens.", "embed_tokens."),
        ("model.layers.", "layers."),
        ("model.norm.", "final_norm."),
        ("lm_head.", "lm_head."),
    ],
    "gpt_neox": [
        ("gpt_neox.embed_in.", "embed_tokens."),
        ("gpt_neox.layers.", "layers."),
        ("gpt_neox.final_layer_norm.", "final_norm."),
        ("embed_out.", "lm_head."),
    ],
    "mpt": [
        ("transformer.wte.", "embed_tokens."),
        ("transformer.blocks.", "layers."),
        ("transformer.norm_f.", "final_norm."),
        ("lm_head.", "lm_head."),
    ],
}

# Buffers HF keeps in some checkpoints that carry no weights we need.
_IGNORED_HF_KEYS = re.compile(r"(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


def hf_family(hf_config: dict[str, Any], path: Path) -> str:
    model_type = hf_config.get("model_type")
    if model_type in LM_FAMILIES:
        return model_type
    if model_type == "mosaic_gpt":
        return "mosaic_gpt"
    raise LoadError(
        f"{path}: unsupported language model family model_type={model_type!r}; "
        f"supported: {', '.join(LM_FAMILIES)} (and MosaicGPT for OpenFlamingo-3B)"
    )


def lm_config_from_hf(hf_config: dict[str, Any], path: Path) -> LMConfig:
    """Our LMConfig from an HF config.json dict (rotary frequencies computed by transformers)."""
    family = hf_family(hf_config, path)
    if family in HF_CONFIG_SCHEMAS:
        hf_config = check_document(hf_config, HF_CONFIG_SCHEMAS[family], str(path), LoadError)
        _check_heads(hf_config, family, path)
    if family == "mosaic_gpt":
        from .mosaic_gpt import mosaic_gpt_hf_config_to_mpt

        try:
            hf_config = mosaic_gpt_hf_config_to_mpt(hf_config, allow_qk_ln=True)
        except ValueError as e:
            raise LoadError(f"{path}: {e}") from e
        family = "mpt"
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.for_model(**hf_config)
    except Exception as e:
        raise LoadError(f"{path}: invalid {family} config ({e})") from e

    def rope() -> tuple[list[float], float, int]:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaling = getattr(cfg, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type in ("dynamic", "longrope"):
            raise LoadError(
                f"{path}: rope_scaling type {rope_type!r} depends on the sequence length at run "
                "time and cannot be baked into a static graph; supported: default, linear, "
                "llama3, yarn"
            )
        if rope_type not in ROPE_INIT_FUNCTIONS:
            known = sorted(set(ROPE_INIT_FUNCTIONS) - {"dynamic", "longrope"})
            raise LoadError(
                f"{path}: rope_scaling.rope_type {rope_type!r} is not a known RoPE type "
                f"(supported: {', '.join(known)})"
            )
        try:
            inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
        except Exception as e:  # missing or ill-typed rope_scaling fields
            raise LoadError(f"{path}: invalid rope_scaling {scaling} ({e})") from e
        return inv_freq.tolist(), float(scale), 2 * len(inv_freq)

    if family == "llama":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv, scale, rot = rope()
        return LMConfig(
            family=family,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            act=cfg.hidden_act,
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            attention_bias=bool(cfg.attention_bias),
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            rotary_dim=rot,
            rope_inv_freq=inv,
            rope_attention_scaling=scale,
            max_position_embeddings=cfg.max_position_embeddings,
        )
    if family == "gpt_neox":
        inv, scale, rot = rope()
        return LMConfig(
            family=family,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_attention_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            norm_eps=cfg.layer_norm_eps,
            act=cfg.hidden_act,
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            attention_bias=bool(getattr(cfg, "attention_bias", True)),
            rotary_dim=rot,
            rope_inv_freq=inv,
            rope_attention_scaling=scale,
            parallel_residual=bool(cfg.use_parallel_residual),
            max_position_embeddings=cfg.max_position_embeddings,
        )
    attn = cfg.attn_config
    if not getattr(attn, "alibi", True):
        raise LoadError(f"{path}: MPT without ALiBi (attn_config.alibi=false) is not supported")
    return LMConfig(
        family="mpt",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_layers=cfg.n_layers,
        num_heads=cfg.n_heads,
        num_kv_heads=cfg.n_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        # transformers' MptMLP is fixed at 4x (it ignores expansion_ratio), as is our layer
        intermediate_size=4 * cfg.d_model,
        norm_eps=cfg.layer_norm_epsilon,
        act="gelu",
        tie_word_embeddings=True,
        alibi_bias_max=float(attn.alibi_bias_max),
        clip_qkv=attn.clip_qkv,
        qk_ln=bool(getattr(attn, "qk_ln", False)),
        softmax_scale=attn.softmax_scale,
        max_position_embeddings=cfg.max_seq_len,
    )


# Far above every released LM's (64-256); checked before the rotary table (head_dim / 2
# floats) and the model are built, so a corrupt config.json fails at once, not out of memory.
MAX_HEAD_DIM = 1024


def check_head_dim(head_dim: int, path: Path) -> None:
    """Refuses an attention head width past MAX_HEAD_DIM (LoadError naming `path`)."""
    if head_dim > MAX_HEAD_DIM:
        raise LoadError(
            f"{path}: attention heads of width {head_dim} (hidden size / heads); at most "
            f"{MAX_HEAD_DIM} is accepted (released LMs use 64-256): is the config corrupt?"
        )


def _check_heads(hf_config: dict[str, Any], family: str, path: Path) -> None:
    """Attention heads that split the width (and KV heads that split the heads)."""
    width, heads = (
        ("d_model", "n_heads") if family == "mpt" else ("hidden_size", "num_attention_heads")
    )
    explicit_head_dim = family == "llama" and hf_config.get("head_dim") is not None
    if not explicit_head_dim and hf_config[width] % hf_config[heads]:
        raise LoadError(
            f"{path}: {heads} ({hf_config[heads]}) does not divide {width} ({hf_config[width]})"
        )
    head_dim = (hf_config.get("head_dim") if explicit_head_dim else None) or (
        hf_config[width] // hf_config[heads]
    )
    check_head_dim(head_dim, path)
    kv = hf_config.get("num_key_value_heads") if family == "llama" else None
    if kv is not None and hf_config[heads] % kv:
        raise LoadError(
            f"{path}: num_key_value_heads ({kv}) does not divide num_attention_heads "
            f"({hf_config[heads]})"
        )


def map_lm_key(family: str, key: str) -> str | None:
    for src, dst in LM_KEY_MAP[family]:
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


# ---------------------------------------------------------------------------------------------
# Vision: open_clip state dict (architecture from tensor shapes) or HF CLIP directory
# ---------------------------------------------------------------------------------------------


def clip_hf_to_open_clip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPVisionModel(+visual_projection) tensors -> open_clip `visual.*` names (no prefix)."""
    p = "vision_model."
    hf = {k.removeprefix(p) if k.startswith(p) else k: v for k, v in hf.items()}
    out = {
        "conv1.weight": hf["embeddings.patch_embedding.weight"],
        "class_embedding": hf["embeddings.class_embedding"],
        "positional_embedding": hf["embeddings.position_embedding.weight"],
        "ln_pre.weight": hf["pre_layrnorm.weight"],
        "ln_pre.bias": hf["pre_layrnorm.bias"],
        "ln_post.weight": hf["post_layernorm.weight"],
        "ln_post.bias": hf["post_layernorm.bias"],
    }
    if "visual_projection.weight" in hf:
        out["proj"] = hf["visual_projection.weight"].t().contiguous()
    i = 0
    while f"encoder.layers.{i}.layer_norm1.weight" in hf:
        s, d = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
            out[f"{d}{b}.weight"], out[f"{d}{b}.bias"] = hf[f"{s}{a}.weight"], hf[f"{s}{a}.bias"]
        qkv = [f"{s}self_attn.{n}_proj" for n in "qkv"]
        out[f"{d}attn.in_proj_weight"] = torch.cat([hf[f"{n}.weight"] for n in qkv])
        out[f"{d}attn.in_proj_bias"] = torch.cat([hf[f"{n}.bias"] for n in qkv])
        for a, b in (
            ("self_attn.out_proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            out[f"{d}{b}.weight"], out[f"{d}{b}.bias"] = hf[f"{s}{a}.weight"], hf[f"{s}{a}.bias"]
        i += 1
    return out


def vision_config_from_open_clip(
    sd: dict[str, torch.Tensor], path: Path, heads: int | None, act: str
) -> VisionConfig:
    """open_clip state dicts carry no config: infer it from shapes (heads = width / 64 unless
    given, open_clip's default head width)."""
    for key in (
        "conv1.weight",
        "positional_embedding",
        "proj",
        "transformer.resblocks.0.mlp.c_fc.weight",
    ):
        if key not in sd:
            raise LoadError(
                f"{path}: missing vision tensor 'visual.{key}' (not an open_clip CLIP ViT?)"
            )
    if sd["conv1.weight"].dim() != 4 or sd["positional_embedding"].dim() != 2:
        raise LoadError(f"{path}: visual.conv1.weight / positional_embedding have wrong ranks")
    width, _, patch, _ = sd["conv1.weight"].shape
    tokens = sd["positional_embedding"].shape[0] - 1
    grid = math.isqrt(max(tokens, 0))
    if grid < 1 or grid * grid != tokens:
        raise LoadError(
            f"{path}: visual.positional_embedding has {tokens + 1} rows, not 1 + a square grid"
        )
    heads = heads or max(1, width // 64)
    if width % heads:
        raise LoadError(f"{path}: {heads} vision heads do not divide the vision width {width}")
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    return VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        layers=layers,
        heads=heads,
        mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        embed_dim=sd["proj"].shape[1],
        act=act,
    )


def _agree(option: str, given: Any, file: Path, key: str, said: Any) -> Any:
    """The value an option and a config file agree on (either may be None)."""
    if given is not None and said is not None and given != said:
        raise LoadError(f"{option} {given} contradicts {file}: {key} = {said!r}")
    return given if given is not None else said


def read_vision(
    path: Path,
    heads: int | None = None,
    act: str | None = None,
    assumptions: list[str] | None = None,
    reader: Reader = read_state_dict,
) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """(config, open_clip-named visual tensors) from an open_clip file or an HF CLIP directory.

    What neither the files nor the options say is assumed and described in `assumptions`
    (with the flag that overrides it); options that contradict a config file are refused.
    """
    path = Path(path)
    config_file: Path | None = None
    oc_vision: dict[str, Any] = {}
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise LoadError(f"{path}: HF CLIP directory without config.json")
        hf_cfg = read_json_object(config_file, HF_CLIP_CONFIG_SCHEMA)
        vcfg = hf_cfg.get("vision_config", hf_cfg)
        if vcfg is not hf_cfg:
            vcfg = check_document(
                vcfg, HF_CLIP_CONFIG_SCHEMA, f"{config_file}: vision_config", LoadError
            )
        try:
            sd = clip_hf_to_open_clip(read_hf_weights(path, reader=reader))
        except KeyError as e:
            raise LoadError(
                f"{path}: missing CLIP vision tensor {e.args[0]!r} (not an HF CLIP vision model?)"
            ) from None
        heads = _agree("--vision-heads", heads, config_file, "num_attention_heads",
                       vcfg.get("num_attention_heads"))  # fmt: skip
        act = _agree("--vision-act", act, config_file, "hidden_act", vcfg.get("hidden_act"))
        ln_eps = vcfg.get("layer_norm_eps", 1e-5)
    else:
        sd = reader(path)
        sd = unwrap_training_save(sd, path) if "model_state_dict" in sd else sd
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
        ln_eps = 1e-5
        # open_clip's hub layout keeps the model config beside the weights: use it when present
        oc_file = path.parent / "open_clip_config.json"
        if oc_file.is_file():
            config_file = oc_file
            model_cfg = read_json_object(oc_file, OPEN_CLIP_CONFIG_SCHEMA).get("model_cfg", {})
            vision = oc_vision = model_cfg.get("vision_cfg", {})
            if "head_width" in vision:
                width = vision.get("width")
                if width is None or width % vision["head_width"]:
                    raise LoadError(
                        f"{oc_file}: model_cfg.vision_cfg.head_width {vision['head_width']} does "
                        f"not divide width {width}"
                    )
                heads = _agree("--vision-heads", heads, oc_file,
                               "model_cfg.vision_cfg.width / head_width",
                               width // vision["head_width"])  # fmt: skip
            if "quick_gelu" in model_cfg:
                said = "quick_gelu" if model_cfg["quick_gelu"] else "gelu"
                act = _agree("--vision-act", act, oc_file, "model_cfg.quick_gelu", said)
    notes = assumptions if assumptions is not None else []
    if heads is None:
        notes.append(
            "vision heads = width / 64 (open_clip's default head width; the vision files do "
            "not say): override with --vision-heads"
        )
    if act is None:
        notes.append(
            "vision activation quick_gelu (OpenAI CLIP weights, what OpenFlamingo uses; the "
            "vision files do not say): override with --vision-act gelu"
        )
    cfg = vision_config_from_open_clip(sd, path, heads, act or "quick_gelu")
    cfg.ln_eps = ln_eps
    for key in ("width", "layers", "patch_size", "image_size", "mlp_ratio"):
        if key in oc_vision and oc_vision[key] != getattr(cfg, key):
            raise LoadError(
                f"{config_file}: model_cfg.vision_cfg.{key} = {oc_vision[key]!r}, but the "
                f"tensors of {path} give {getattr(cfg, key)!r}"
            )
    return cfg, sd


# ---------------------------------------------------------------------------------------------
# Tokenizer, extended exactly as OpenFlamingo does
# ---------------------------------------------------------------------------------------------


def load_tokenizer(lm_dir: Path, tokenizer_dir: Path | None = None) -> Any:
    from transformers import AutoTokenizer

    src = Path(tokenizer_dir or lm_dir)
    try:
        tok = AutoTokenizer.from_pretrained(
            str(src), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:
        raise LoadError(f"{src}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    tok.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "left"
    return tok


# ---------------------------------------------------------------------------------------------
# The Flamingo checkpoint
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What was loaded from where, and what did not fit (printed by `inspect`)."""

    lm_dir: str
    vision_path: str
    checkpoint_path: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # values the files do not say, each with the flag that overrides it
    assumptions: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What every command that loads a model says (inspect, export): tensors ignored
        ("unexpected"), rows made up ("filled"), values assumed ("assumed")."""
        return [
            f"{label}: {item}"
            for label, items in (
                ("unexpected", self.unexpected),
                ("filled", self.filled),
                ("assumed", self.assumptions),
            )
            for item in items
        ]


_XATTN = re.compile(
    r"^lang_encoder\.(?P<layers>.+)\.(?P<i>\d+)\.gated_cross_attn_layer\.(?P<rest>.+)$"
)


def cross_attn_layers_in_checkpoint(sd: Iterable[str]) -> list[int]:
    return sorted({int(m["i"]) for k in sd if (m := _XATTN.match(k))})


def infer_cross_attn_every_n(indices: list[int], num_layers: int, path: Path) -> int:
    for n in range(1, num_layers + 1):
        if CrossAttentionConfig(every_n_layers=n).layer_indices(num_layers) == indices:
            return n
    raise LoadError(
        f"{path}: gated cross-attention layers at {indices} match no cross_attn_every_n_layers "
        f"for a {num_layers}-layer LM"
    )


_PERCEIVER_LAYER = re.compile(r"^perceiver\.layers\.(\d+)\.")


def resampler_config_from_checkpoint(sd: dict[str, torch.Tensor], path: Path) -> ResamplerConfig:
    """Depth, latents and ff_mult from the tensors (released models: 6, 64, 4; smaller models
    such as the trained demo reduce them), max_num_frames from `perceiver.frame_embs` (absent in
    the released models: None). Heads stay OpenFlamingo's 8; dim_head = inner / 8."""
    if "perceiver.latents" not in sd or "perceiver.layers.0.0.to_q.weight" not in sd:
        raise LoadError(
            f"{path}: missing resampler tensors (perceiver.latents, perceiver.layers.0.*)"
        )
    depth = 1 + max(int(m[1]) for k in sd if (m := _PERCEIVER_LAYER.match(k)))
    num_latents, dim = sd["perceiver.latents"].shape
    heads = ResamplerConfig.heads
    inner = sd["perceiver.layers.0.0.to_q.weight"].shape[0]
    ff = sd.get("perceiver.layers.0.1.1.weight")
    if inner % heads or ff is None or ff.shape[0] % dim:
        raise LoadError(
            f"{path}: resampler tensors do not fit {heads} heads and an integer ff_mult "
            f"(to_q {inner} x {dim})"
        )
    if "perceiver.media_time_embs" in sd:
        raise LoadError(
            f"{path}: 'perceiver.media_time_embs' (OpenFlamingo's per-media time embeddings) is "
            "not supported; frame embeddings ('perceiver.frame_embs') are"
        )
    frame_embs = sd.get("perceiver.frame_embs")
    if frame_embs is not None and (
        frame_embs.ndim != 2 or frame_embs.shape[0] < 1 or frame_embs.shape[1] != dim
    ):
        raise LoadError(
            f"{path}: tensor 'perceiver.frame_embs' has shape {tuple(frame_embs.shape)}, "
            f"expected (max_num_frames >= 1, {dim})"
        )
    return ResamplerConfig(
        depth=depth,
        heads=heads,
        dim_head=inner // heads,
        num_latents=num_latents,
        ff_mult=ff.shape[0] // dim,
        max_num_frames=None if frame_embs is None else int(frame_embs.shape[0]),
    )


def map_checkpoint_key(key: str, family: str) -> str | None:
    """OpenFlamingo checkpoint name -> our Flamingo name (None = not a Flamingo tensor)."""
    if key.startswith("perceiver."):
        return key
    if m := _XATTN.match(key):
        return f"lang_model.cross_attn_layers.{m['i']}.{m['rest']}"
    if key.startswith("lang_encoder."):
        hf_key = key[len("lang_encoder.") :].replace(".decoder_layer.", ".")
        mapped = map_lm_key(family, hf_key)
        return f"lang_model.{mapped}" if mapped else None
    return None


def source_key(our_key: str, family: str) -> str:
    """Where an OpenFlamingo model's files keep the tensor `our_key` (the inverse of
    map_checkpoint_key / map_lm_key; vision as open_clip names it): what errors name."""
    layers = next(src for src, dst in LM_KEY_MAP.get(family, []) if dst == "layers.")
    if m := re.match(r"^lang_model\.cross_attn_layers\.(\d+)\.(.+)$", our_key):
        return f"lang_encoder.{layers}{m[1]}.gated_cross_attn_layer.{m[2]}"
    if our_key.startswith("lang_model."):
        rest = our_key[len("lang_model.") :]
        for src, dst in LM_KEY_MAP.get(family, []):
            if rest.startswith(dst):
                return src + rest[len(dst) :]
    if our_key.startswith("vision_encoder."):
        return "visual." + our_key[len("vision_encoder.") :]
    return our_key  # perceiver.*: the checkpoint's own name


def resolve_cross_attn_every_n(
    requested: int | None, preset: str | None, found: list[int], num_layers: int, path: Path
) -> int:
    if preset is not None:
        if preset not in PRESETS or PRESETS[preset].kind != "openflamingo":
            known = ", ".join(n for n, p in PRESETS.items() if p.kind == "openflamingo")
            raise LoadError(
                f"unknown preset {preset!r} for OpenFlamingo files; known: {known} (IDEFICS "
                "presets go with --model)"
            )
        p = PRESETS[preset]
        if requested is not None and requested != p.cross_attn_every_n_layers:
            raise LoadError(
                f"--cross-attn-every-n-layers {requested} contradicts preset {preset} "
                f"({p.cross_attn_every_n_layers})"
            )
        requested = p.cross_attn_every_n_layers
    given = f"--preset {preset}: " if preset is not None else ""
    if requested is None:
        return infer_cross_attn_every_n(found, num_layers, path)
    if requested < 1:
        raise LoadError(f"--cross-attn-every-n-layers must be >= 1, got {requested}")
    expected = CrossAttentionConfig(every_n_layers=requested).layer_indices(num_layers)
    if found != expected:
        raise LoadError(
            f"{given}cross_attn_every_n_layers={requested} expects gated cross-attention before "
            f"decoder layers {expected}, but {path} has them at {found}"
        )
    return requested


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """No NaN or Inf in a floating tensor; checked in chunks (no full-size mask)."""
    flat = tensor.reshape(-1)
    return all(
        bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk)
    )


def check_weight(tensor: torch.Tensor, like: torch.Tensor, source: Path, key: str) -> None:
    """A tensor loaded into a floating parameter must be floating and finite: an integer or
    bool tensor would be silently cast, a NaN/Inf exported. (Integer and bool buffers, e.g.
    position ids or causal masks, are what they are.) A meta tensor (flamingo.lazy's, read for
    its shape only) has no values yet: flamingo.lazy.SourceFiles checks them as it reads them."""
    if not like.is_floating_point():
        return
    if not tensor.is_floating_point():
        raise LoadError(
            f"{source}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
            "expected a floating dtype"
        )
    if not tensor.is_meta and not all_finite(tensor):
        raise LoadError(f"{source}: tensor {key!r} holds non-finite values (NaN or Inf)")


def load_flamingo(
    lm_dir: str | Path,
    vision_path: str | Path,
    checkpoint_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> tuple[Flamingo, Any, LoadReport]:
    """The reference model from local files: (model in eval mode, tokenizer, report).

    `options`: resolve_flamingo's keywords (cross_attn_every_n_layers, preset, vision_heads,
    vision_act, vision_tokens_after_ln_post, tokenizer_dir)."""
    resolved = resolve_flamingo(lm_dir, vision_path, checkpoint_path, **options)
    cfg, loaded = resolved.config, resolved.tensors
    with torch.device("meta"):
        model = Flamingo(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.to(dtype) for k, v in loaded.items()}, strict=False, assign=False)
    if cfg.lm.tie_word_embeddings:
        model.lang_model.lm_head.weight = model.lang_model.embed_tokens.weight
    model.lang_model._init_buffers()
    model.to(dtype).eval()
    return model, resolved.tokenizer, resolved.report


@dataclass
class ResolvedFlamingo:
    """What the files resolve to before any model is built: the config, the extended
    tokenizer, the report, and every weight under our parameter name (a tied LM head is not
    listed: it is the input embedding)."""

    config: FlamingoConfig
    tokenizer: Any
    report: LoadReport
    tensors: dict[str, torch.Tensor]
    # what a loader that knows better (IDEFICS) sets for the manifest, else None
    preprocess: dict[str, Any] | None = None
    prompt_format: dict[str, Any] | None = None


def resolve_flamingo(
    lm_dir: str | Path,
    vision_path: str | Path,
    checkpoint_path: str | Path,
    *,
    cross_attn_every_n_layers: int | None = None,
    preset: str | None = None,
    vision_heads: int | None = None,
    vision_act: str | None = None,
    vision_tokens_after_ln_post: bool = False,
    tokenizer_dir: str | Path | None = None,
    reader: Reader = read_state_dict,
) -> ResolvedFlamingo:
    """Config, tokenizer and weights (by our names) from local files, every check of
    load_flamingo included. `reader` reads one weight file (flamingo.lazy's reads shapes only:
    the streaming export)."""
    lm_dir, vision_path, ckpt_path = Path(lm_dir), Path(vision_path), Path(checkpoint_path)
    report = LoadReport(str(lm_dir), str(vision_path), str(ckpt_path))
    for option, value in (("--vision-heads", vision_heads),
                          ("--cross-attn-every-n-layers", cross_attn_every_n_layers)):  # fmt: skip
        if value is not None and (isinstance(value, bool) or value < 1):
            raise LoadError(f"{option} must be >= 1, got {value}")
    if vision_act not in (None, "quick_gelu", "gelu"):
        raise LoadError(f"--vision-act must be quick_gelu or gelu, got {vision_act!r}")
    cfg_file = lm_dir / "config.json"
    if not cfg_file.is_file():
        raise LoadError(f"{lm_dir}: not an HF model directory (config.json not found)")
    hf_config = read_json_object(cfg_file)
    lm_cfg = lm_config_from_hf(hf_config, cfg_file)
    is_mosaic = hf_config.get("model_type") == "mosaic_gpt"
    if preset in PRESETS and PRESETS[preset].lm_family != lm_cfg.family:  # before any weights
        raise LoadError(
            f"--preset {preset} expects a {PRESETS[preset].lm_family} LM, but {cfg_file} is "
            f"{lm_cfg.family}"
        )

    vision_cfg, vision_sd = read_vision(
        vision_path, vision_heads, vision_act, report.assumptions, reader
    )
    vision_cfg.tokens_after_ln_post = vision_tokens_after_ln_post
    if not vision_tokens_after_ln_post:
        report.assumptions.append(
            "vision patch tokens taken before ln_post (open_clip <= 2.22, as the released "
            "checkpoints were trained): override with --vision-tokens-after-ln-post"
        )

    ckpt = reader(ckpt_path)
    ckpt = unwrap_training_save(ckpt, ckpt_path)
    found = cross_attn_layers_in_checkpoint(ckpt)
    if not found:
        raise LoadError(
            f"{ckpt_path}: no gated cross-attention tensors "
            "(lang_encoder.*.gated_cross_attn_layer.*)"
        )
    every_n = resolve_cross_attn_every_n(
        cross_attn_every_n_layers, preset, found, lm_cfg.num_layers, ckpt_path
    )
    tok = load_tokenizer(lm_dir, Path(tokenizer_dir) if tokenizer_dir else None)
    base_vocab = lm_cfg.vocab_size
    lm_cfg.vocab_size = max(len(tok), base_vocab)
    cfg = FlamingoConfig(
        vision=vision_cfg,
        lm=lm_cfg,
        resampler=resampler_config_from_checkpoint(ckpt, ckpt_path),
        cross_attn=CrossAttentionConfig(every_n_layers=every_n),
        media_token_id=tok.encode(MEDIA_TOKEN)[-1],
        eoc_token_id=tok.encode(EOC_TOKEN)[-1],
        pad_token_id=tok.pad_token_id,
    )
    try:
        with torch.device("meta"):
            model = Flamingo(cfg)
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        raise LoadError(
            f"{cfg_file}, {vision_path}, {ckpt_path}: these files describe a model that cannot be "
            f"built ({type(e).__name__}: {e})"
        ) from e
    expected = {k: v for k, v in model.state_dict().items()}
    loaded: dict[str, torch.Tensor] = {}

    def put(our_key: str, tensor: torch.Tensor, source: Path, source_key: str) -> None:
        if our_key not in expected:
            report.unexpected.append(f"{source}:{source_key}")
            return
        want = tuple(expected[our_key].shape)
        if (
            our_key.endswith(("embed_tokens.weight", "lm_head.weight"))
            and tensor.shape[0] <= want[0]
        ):
            if tensor.shape[1:] != want[1:]:
                raise LoadError(
                    f"{source}: tensor {source_key!r} has shape {tuple(tensor.shape)}, expected "
                    f"(<= {want[0]}, {want[1]}) for an LM of width {lm_cfg.hidden_size}"
                )
        elif tuple(tensor.shape) != want:
            raise LoadError(
                f"{source}: tensor {source_key!r} has shape {tuple(tensor.shape)}, expected {want}"
            )
        check_weight(tensor, expected[our_key], source, source_key)
        loaded[our_key] = tensor

    # 1. LM weights
    lm_files: dict[str, Path] = {}
    lm_sd = read_hf_weights(lm_dir, lm_files, reader)
    if is_mosaic:
        from .mosaic_gpt import map_mosaic_gpt_state_dict

        lm_sd = map_mosaic_gpt_state_dict(lm_sd, allow_qk_ln=True)
    for k, v in lm_sd.items():
        mapped = map_lm_key(lm_cfg.family, k)
        if mapped is None:
            if not _IGNORED_HF_KEYS.search(k):
                report.unexpected.append(f"{lm_dir}:{k}")
            continue
        put(f"lang_model.{mapped}", v, lm_files.get(k, lm_dir), k)
    # 2. vision weights
    for k, v in vision_sd.items():
        put(f"vision_encoder.{k}", v, vision_path, f"visual.{k}" if not vision_path.is_dir() else k)
    # 3. Flamingo checkpoint (overrides the LM's embeddings with the resized, trained ones)
    for k, v in ckpt.items():
        if k.startswith("vision_encoder."):
            continue
        mapped = map_checkpoint_key(k, lm_cfg.family)
        if mapped is None:
            report.unexpected.append(f"{ckpt_path}:{k}")
            continue
        put(mapped, v, ckpt_path, k)

    # the vocabulary grew by Flamingo's special tokens: resized rows must come from the checkpoint
    vocab = lm_cfg.vocab_size
    for key in ("lang_model.embed_tokens.weight", "lang_model.lm_head.weight"):
        if key == "lang_model.lm_head.weight" and lm_cfg.tie_word_embeddings:
            continue
        t = loaded.get(key)
        if t is not None and t.shape[0] < vocab:
            if key.endswith("embed_tokens.weight"):
                raise LoadError(
                    f"{ckpt_path}: input embeddings have {t.shape[0]} rows but the extended "
                    f"tokenizer has {vocab} tokens; the checkpoint must carry resized embeddings"
                )
            # HF's resize gives new output rows random values that OpenFlamingo never saved for
            # untied heads; the mean row is the deterministic choice and is reported.
            fill = t.float().mean(0, keepdim=True).to(t.dtype).expand(vocab - t.shape[0], -1)
            loaded[key] = torch.cat([t, fill])
            report.filled.append(f"{key}[{t.shape[0]}:{vocab}] = mean of existing rows")

    required_missing = []
    for k in expected:
        if k in loaded or (k == "lang_model.lm_head.weight" and lm_cfg.tie_word_embeddings):
            continue
        (required_missing if not k.startswith("lang_model.lm_head") else report.missing).append(k)
    if required_missing:
        where = {"perceiver": ckpt_path, "lang_model.cross": ckpt_path, "vision": vision_path}
        first = required_missing[0]
        src = next((p for pre, p in where.items() if first.startswith(pre)), lm_dir)
        names = [source_key(k, lm_cfg.family) for k in required_missing[:2]]
        raise LoadError(
            f"{src}: {len(required_missing)} required tensor(s) missing, e.g. {names[0]!r}"
            + (f" (and {names[1]!r})" if len(names) > 1 else "")
        )
    if report.missing:
        raise LoadError(f"{lm_dir}: output embeddings missing ({report.missing[0]})")

    report.notes.append(f"cross_attn_every_n_layers={every_n}; vocabulary {base_vocab} -> {vocab}")
    return ResolvedFlamingo(cfg, tok, report, loaded)
