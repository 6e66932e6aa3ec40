"""Load an HF IDEFICS folder (transformers' `IdeficsForVisionText2Text`) into our Flamingo.

IDEFICS is configuration of the same reference classes (flamingo/model.py), not a second model:
- vision: a CLIP ViT whose features are the last hidden state, CLS included, no post-layernorm
  (`VisionConfig.include_cls`); q/k/v projections concatenated into `in_proj` as for HF CLIP;
- resampler: optional (`use_resampler`), IDEFICS' q/k/v, ReLU MLP, optional q/k LayerNorms
  (`qk_layer_norms_perceiver`); k_proj/v_proj concatenated into `to_kv`;
- gated cross-attention: the "llama" block (RMSNorm, optional q/k RMSNorm, SwiGLU), gates
  tanh(alpha_cross_attn) / tanh(alpha_dense), float or vector, before decoder layer i when
  i % cross_layer_interval == 0 (`layer_offset` 0);
- decoupled embeddings and LM head (`additional_vocab_size`): the extra rows are concatenated
  after the frozen vocabulary into one embedding and one head (ids >= vocab_size index them,
  exactly as IdeficsDecoupledEmbedding / IdeficsDecoupledLinear compute);
- the LM: LLaMA layers with rotary base 10000 (IdeficsEmbedding ignores rope_theta);
- which image a token sees: `media_rule` "idefics" (processing_idefics: none after an EOS
  until the next `<image>`; generation repeats the last prompt token's image).

Source: transformers 4.57 `models/idefics/{configuration,modeling,perceiver,vision,
processing}_idefics.py`. Every error names the file and the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from runtime.idefics import IdeficsPromptFormat
from runtime.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessConfig

from .config import CrossAttentionConfig, FlamingoConfig, LMConfig, ResamplerConfig, VisionConfig
from .loaders import (
    LoadError,
    LoadReport,
    Reader,
    ResolvedFlamingo,
    _obj,
    check_head_dim,
    check_weight,
    clip_hf_to_open_clip,
    read_hf_weights,
    read_json_object,
    read_state_dict,
)
from .model import Flamingo

MODEL_TYPE = "idefics"
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
ROPE_BASE = 10000.0  # IdeficsEmbedding's default; IdeficsAttention passes no other
TRAINED_CONTEXT = 2048  # IdeficsEmbedding's max_position_embeddings (LLaMA-1's context)

_POS = {"type": "integer", "minimum": 1}
_EPS = {"type": "number", "exclusiveMinimum": 0}
_BOOL = {"type": "boolean"}
IDEFICS_CONFIG_SCHEMA = _obj(
    {
        "model_type": {"const": MODEL_TYPE},
        **{k: _POS for k in ("vocab_size", "hidden_size", "intermediate_size",
                             "num_hidden_layers", "num_attention_heads", "cross_layer_interval")},
        "additional_vocab_size": {"type": "integer", "minimum": 0},
        "hidden_act": {"type": "string"},
        "rms_norm_eps": _EPS,
        "alpha_type": {"enum": ["float", "vector"]},
        **{k: _BOOL for k in ("qk_layer_norms", "use_resampler", "tie_word_embeddings")},
        "vision_config": _obj(
            {
                **{k: _POS for k in ("embed_dim", "image_size", "intermediate_size",
                                     "patch_size", "num_hidden_layers", "num_attention_heads")},
                "num_channels": {"const": 3},
                "hidden_act": {"enum": ["gelu", "quick_gelu"]},
                "layer_norm_eps": _EPS,
            }
        ),
        "perceiver_config": _obj(
            {
                **{k: _POS for k in ("resampler_n_latents", "resampler_depth",
                                     "resampler_n_heads", "resampler_head_dim")},
                "qk_layer_norms_perceiver": _BOOL,
            }
        ),
    },
    ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
     "num_attention_heads"],
)  # fmt: skip


# The released models' config.json (the keys the conversion reads), checked against the Hub
# files (the -instruct models share their base's architecture):
# - huggingface.co/HuggingFaceM4/idefics-9b-instruct/blame/<commit>/config.json at commit
#   ceb649f537b77209225fd89f3ef3e0d24a577752: vocab 32000 + 2, hidden 4096, intermediate
#   11008, 32 layers, 32 heads, cross_layer_interval 4, alpha_type float, qk_layer_norms true,
#   qk_layer_norms_perceiver true, resampler depth 6 / head dim 96 / 16 heads / 64 latents,
#   rms_norm_eps 1e-6, vision embed_dim 1280, image 224, intermediate 5120, use_resampler
#   true, untied head; the same values in fine-tunes' config.json whose "_name_or_path" is
#   "HuggingFaceM4/idefics-9b" (e.g. huggingface.co/mrm8488/idefics-9b-ft-floco).
# - huggingface.co/HuggingFaceM4/idefics-80b-instruct/blame/<commit>/config.json at commit
#   0979cbfa9ef7beda8348ac9484a1ce66f08e6836: hidden 8192, intermediate 22016, 80 layers,
#   64 heads, rms_norm_eps 1e-5, the rest as 9B (q/k norms on in both places).
# Not in those excerpts: the vision tower's depth/heads/patch/act (32 layers, 16 heads, patch
# 14, gelu: IdeficsVisionConfig's defaults, the OpenCLIP ViT-H/14 the paper names; the Hub's
# "set the correct vision_config.hidden_act" commits of Aug 28, 2023 record it explicitly).
# Used by `plan` for the presets; a loaded folder's own config.json always wins.
_IDEFICS_9B = {
    "model_type": MODEL_TYPE,
    "vocab_size": 32000,
    "additional_vocab_size": 2,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "alpha_type": "float",
    "cross_layer_interval": 4,
    "qk_layer_norms": True,
    "use_resampler": True,
    "tie_word_embeddings": False,
    "vision_config": {
        "embed_dim": 1280,
        "image_size": 224,
        "intermediate_size": 5120,
        "patch_size": 14,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
    },
    "perceiver_config": {
        "resampler_n_latents": 64,
        "resampler_depth": 6,
        "resampler_n_heads": 16,
        "resampler_head_dim": 96,
        "qk_layer_norms_perceiver": True,
    },
}
_IDEFICS_80B = {
    **_IDEFICS_9B,
    "hidden_size": 8192,
    "intermediate_size": 22016,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "rms_norm_eps": 1e-5,
}
IDEFICS_HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "idefics-9b": _IDEFICS_9B,
    "idefics-9b-instruct": _IDEFICS_9B,
    "idefics-80b": _IDEFICS_80B,
    "idefics-80b-instruct": _IDEFICS_80B,
}


def check_idefics_preset(preset: str, cfg: FlamingoConfig, path: Path) -> None:
    """A --preset given with --model must be an IDEFICS preset the folder agrees with."""
    from .config import PRESETS

    p = PRESETS.get(preset)
    if p is None or p.kind != "idefics":
        known = ", ".join(n for n, q in PRESETS.items() if q.kind == "idefics")
        raise LoadError(f"--preset {preset!r} is not an IDEFICS preset (known: {known})")
    said = (cfg.lm.num_layers, cfg.cross_attn.every_n_layers)
    if said != (p.lm_layers, p.cross_attn_every_n_layers):
        raise LoadError(
            f"{path}: {said[0]} layers, cross_layer_interval {said[1]}, but preset {preset} "
            f"has {p.lm_layers} and {p.cross_attn_every_n_layers}"
        )


def is_idefics_folder(path: str | Path) -> bool:
    """Whether `path` is a folder whose config.json says model_type "idefics"."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return read_json_object(cfg).get("model_type") == MODEL_TYPE
    except LoadError:
        return False


def idefics_config(hf: dict[str, Any], path: Path) -> FlamingoConfig:
    """Our FlamingoConfig from an IDEFICS config.json dict (token ids filled in by the loader).
    Defaults are IdeficsConfig's."""
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise LoadError(
            f"{path}: model_type {model_type!r} is not an IDEFICS model (expected "
            f"'{MODEL_TYPE}'); OpenFlamingo models load with --lm/--vision/--checkpoint"
        )
    from runtime.schema import check_document

    hf = check_document(hf, IDEFICS_CONFIG_SCHEMA, str(path), LoadError)
    v = hf.get("vision_config") or {}
    p = hf.get("perceiver_config") or {}
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    layers, interval = hf["num_hidden_layers"], hf.get("cross_layer_interval", 1)
    if hidden % heads:
        raise LoadError(
            f"{path}: num_attention_heads ({heads}) does not divide hidden_size ({hidden})"
        )
    if layers % interval:
        # IdeficsModel builds num_hidden_layers // interval blocks but indexes one per
        # i % interval == 0: the last index would be out of range
        raise LoadError(
            f"{path}: cross_layer_interval ({interval}) does not divide num_hidden_layers "
            f"({layers}); transformers' IdeficsModel cannot run such a model"
        )
    width = v.get("embed_dim", 768)
    v_heads = v.get("num_attention_heads", 16)
    if width % v_heads:
        raise LoadError(
            f"{path}: vision_config.num_attention_heads ({v_heads}) does not divide "
            f"vision_config.embed_dim ({width})"
        )
    head_dim = hidden // heads
    check_head_dim(head_dim, path)
    inv_freq = 1.0 / (
        ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    )
    lm = LMConfig(
        family="llama",
        vocab_size=hf["vocab_size"] + hf.get("additional_vocab_size", 0),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rotary_dim=head_dim,
        rope_inv_freq=inv_freq.tolist(),
        max_position_embeddings=TRAINED_CONTEXT,
    )
    vision = VisionConfig(
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 14),
        width=width,
        layers=v.get("num_hidden_layers", 32),
        heads=v_heads,
        mlp_ratio=v.get("intermediate_size", 5120) / width,
        embed_dim=0,
        act=v.get("hidden_act", "gelu"),
        ln_eps=v.get("layer_norm_eps", 1e-5),
        include_cls=True,
    )
    resampler = ResamplerConfig(
        depth=p.get("resampler_depth", 6),
        heads=p.get("resampler_n_heads", 16),
        dim_head=p.get("resampler_head_dim", 96),
        num_latents=p.get("resampler_n_latents", 64),
        ff_mult=4,
        enabled=bool(hf.get("use_resampler", False)),
        qk_layer_norms=bool(p.get("qk_layer_norms_perceiver", False)),
        ff_act="relu",
    )
    cross_attn = CrossAttentionConfig(
        every_n_layers=interval,
        heads=heads,
        dim_head=head_dim,
        layer_offset=0,
        block="llama",
        qk_norm=bool(hf.get("qk_layer_norms", False)),
        gate_type=hf.get("alpha_type", "float"),
        intermediate_size=hf["intermediate_size"],
    )
    return FlamingoConfig(
        vision=vision, lm=lm, resampler=resampler, cross_attn=cross_attn, media_rule="idefics"
    )


# IDEFICS name -> ours. Groups: (regex, target template, how): "copy", or "kv" (k_proj and
# v_proj concatenated into to_kv), or "gate" (reshaped to our gate shape).
_PERCEIVER = re.compile(r"^model\.perceiver_resampler\.blocks\.(\d+)\.([01])\.(.+)$")
_XATTN = re.compile(r"^model\.gated_cross_attn_layers\.(\d+)\.(.+)$")
_PERCEIVER_ATTN = {
    "context_layer_norm": "norm_media",
    "latents_layer_norm": "norm_latents",
    "q_proj": "to_q",
    "output_proj": "to_out",
    "q_layer_norm": "q_layer_norm",
    "k_layer_norm": "k_layer_norm",
}
_PERCEIVER_MLP = {"ln": "0", "fc": "1", "c_proj": "3"}
_XATTN_PARTS = {
    "input_layernorm": "attn.norm",
    "cross_attn.q_proj": "attn.to_q",
    "cross_attn.o_proj": "attn.to_out",
    "cross_attn.q_layer_norm": "attn.q_layer_norm",
    "cross_attn.k_layer_norm": "attn.k_layer_norm",
    "post_attention_layernorm": "ff.0",
    "mlp.gate_proj": "ff.1.gate_proj",
    "mlp.up_proj": "ff.1.up_proj",
    "mlp.down_proj": "ff.1.down_proj",
    "alpha_cross_attn": "attn_gate",
    "alpha_dense": "ff_gate",
}
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")
# pairs concatenated row-wise into one of our tensors, in this order
_CONCAT = {
    "lang_model.embed_tokens.weight": (
        "model.embed_tokens.weight",
        "model.embed_tokens.additional_embedding.weight",
    ),
    "lang_model.lm_head.weight": ("lm_head.weight", "lm_head.additional_fc.weight"),
}


def map_idefics_key(key: str, interval: int) -> tuple[str, str] | None:
    """(our name, part) for an IDEFICS tensor name; part "k"/"v" for halves of to_kv, "" for a
    whole tensor; None = not ours to load."""
    for ours, names in _CONCAT.items():
        if key in names:
            return ours, "head" if key == names[0] else "extra"
    if key.startswith("model.layers."):
        return "lang_model.layers." + key[len("model.layers.") :], ""
    if key == "model.norm.weight":
        return "lang_model.final_norm.weight", ""
    if key == "model.perceiver_resampler.latents":
        return "perceiver.latents", ""
    if key.startswith("model.perceiver_resampler.layer_norm."):
        return "perceiver.norm." + key.rsplit(".", 1)[1], ""
    if m := _PERCEIVER.match(key):
        block, sub, rest = m.groups()
        module, param = rest.rsplit(".", 1)
        prefix = f"perceiver.layers.{block}.{sub}."
        if sub == "0" and module in ("k_proj", "v_proj"):
            return prefix + "to_kv." + param, module[0]
        table = _PERCEIVER_ATTN if sub == "0" else _PERCEIVER_MLP
        return (prefix + table[module] + "." + param, "") if module in table else None
    if m := _XATTN.match(key):
        block, rest = m.groups()
        prefix = f"lang_model.cross_attn_layers.{int(block) * interval}."
        if rest in ("cross_attn.k_proj.weight", "cross_attn.v_proj.weight"):
            return prefix + "attn.to_kv.weight", rest.split(".")[1][0]
        if rest in ("alpha_cross_attn", "alpha_dense"):
            return prefix + _XATTN_PARTS[rest], "gate"
        module, param = rest.rsplit(".", 1)
        return (prefix + _XATTN_PARTS[module] + "." + param, "") if module in _XATTN_PARTS else None
    return None


PREPROCESSOR_SCHEMA = _obj(
    {
        "image_size": _POS,
        "image_num_channels": {"const": 3},
        "image_mean": {"type": "array", "items": {"type": "number"}, "minItems": 3,
                       "maxItems": 3},
        "image_std": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0},
                      "minItems": 3, "maxItems": 3},
        "do_rescale": {"const": True},
        "rescale_factor": {"const": 1 / 255},
    }
)  # fmt: skip


def idefics_preprocess(folder: Path, image_size: int, report: LoadReport) -> PreprocessConfig:
    """IdeficsImageProcessor's inference transform from preprocessor_config.json: RGB first
    (alpha over white), resize to a square (BICUBIC, no crop), /255, mean/std (IDEFICS'
    defaults = OpenAI CLIP's)."""
    file = folder / "preprocessor_config.json"
    if file.is_file():
        d = read_json_object(file, PREPROCESSOR_SCHEMA)
    else:
        d = {}
        report.assumptions.append(
            f"{file.name} not found: IdeficsImageProcessor's defaults (size {image_size}, "
            "OpenAI CLIP mean/std)"
        )
    size = d.get("image_size", image_size)
    if size != image_size:
        raise LoadError(
            f"{file}: image_size {size} differs from the vision tower's {image_size} "
            "(config.json vision_config.image_size)"
        )
    return PreprocessConfig(
        image_size=size,
        mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
        interpolation="bicubic",
        resize_mode="squash",
        rgb_first=True,
    )


def load_idefics_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:
        raise LoadError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    tok.padding_side = "left"  # IdeficsProcessor pads to the longest prompt, on the left
    return tok


def load_idefics(
    folder: str | Path, *, preset: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Flamingo, Any, LoadReport]:
    """The reference model from an HF IDEFICS folder: (model in eval mode, tokenizer, report).

    Errors (LoadError): no config.json, another model type, a config transformers could not
    run, a missing shard, a shard index naming a file outside the folder, a tensor missing or
    of the wrong shape, a tokenizer without `<image>` or with ids beyond the vocabulary."""
    resolved = resolve_idefics(folder, preset=preset)
    cfg = resolved.config
    with torch.device("meta"):
        model = Flamingo(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.to(dtype) for k, v in resolved.tensors.items()}, strict=False)
    if cfg.lm.tie_word_embeddings:
        model.lang_model.lm_head.weight = model.lang_model.embed_tokens.weight
    model.lang_model._init_buffers()
    model.to(dtype).eval()
    model.preprocess = resolved.preprocess
    model.prompt_format = resolved.prompt_format
    return model, resolved.tokenizer, resolved.report


def resolve_idefics(
    folder: str | Path, *, preset: str | None = None, reader: Reader = read_state_dict
) -> ResolvedFlamingo:
    """Config, tokenizer, report, preprocessing, prompt format and every weight under our
    parameter name, before any model is built (load_idefics' checks; the errors of
    load_idefics). `reader` reads one weight file (flamingo.lazy's reads shapes only: the
    streaming export; the decoupled embedding and head, and the q/k/v and k/v projections, are
    then concatenations recorded lazily and read from their parts when written)."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise LoadError(f"{folder}: not an HF model folder (config.json not found)")
    hf = read_json_object(cfg_file)
    cfg = idefics_config(hf, cfg_file)
    if preset is not None:
        check_idefics_preset(preset, cfg, cfg_file)
    report = LoadReport(str(folder), str(folder), str(folder))
    preprocess = idefics_preprocess(folder, cfg.vision.image_size, report)

    tok = load_idefics_tokenizer(folder)
    media = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if media is None or media == tok.unk_token_id:
        raise LoadError(f"{folder}: the tokenizer has no {IMAGE_TOKEN} token")
    if len(tok) > cfg.lm.vocab_size:
        raise LoadError(
            f"{folder}: the tokenizer has {len(tok)} tokens but the model only "
            f"{cfg.lm.vocab_size} (vocab_size + additional_vocab_size in {cfg_file})"
        )
    if tok.eos_token_id is None:
        raise LoadError(f"{folder}: the tokenizer has no EOS token (IdeficsProcessor needs one)")
    cfg.media_token_id = media
    cfg.eos_token_id = tok.eos_token_id
    cfg.eoc_token_id = tok.eos_token_id  # generation stops at EOS, as IDEFICS' generate does
    cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    try:
        with torch.device("meta"):
            model = Flamingo(cfg)
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        raise LoadError(f"{cfg_file}: describes a model that cannot be built ({e})") from e
    expected = model.state_dict()

    files: dict[str, Path] = {}
    sd = read_hf_weights(folder, files, reader)
    interval = cfg.cross_attn.every_n_layers
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        source = files.get(key, folder)
        if key.startswith("model.vision_model."):
            continue  # mapped as a whole below
        mapped = map_idefics_key(key, interval)
        if mapped is None or mapped[0] not in expected:
            if not _IGNORED.search(key):
                report.unexpected.append(f"{source}:{key}")
            continue
        ours, part = mapped
        check_weight(tensor, expected[ours], source, key)
        parts.setdefault(ours, {})[part] = tensor

    loaded: dict[str, torch.Tensor] = {}
    for ours, got in parts.items():
        if set(got) <= {"k", "v"}:
            if set(got) != {"k", "v"}:
                missing = "v_proj" if "k" in got else "k_proj"
                raise LoadError(f"{folder}: {missing} missing for {ours} (IDEFICS names)")
            loaded[ours] = torch.cat([got["k"], got["v"]])
        elif set(got) <= {"head", "extra"}:
            loaded[ours] = torch.cat([got[p] for p in ("head", "extra") if p in got])
        elif "gate" in got:
            want = expected[ours].shape
            if got["gate"].numel() != want.numel():
                raise LoadError(
                    f"{folder}: gate for {ours} has {got['gate'].numel()} values, expected "
                    f"{want.numel()} (alpha_type {cfg.cross_attn.gate_type})"
                )
            loaded[ours] = got["gate"].reshape(want)
        else:
            loaded[ours] = got[""]

    vision = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.vision_model.")}
    try:
        vision_sd = clip_hf_to_open_clip(vision)
    except KeyError as e:
        raise LoadError(
            f"{folder}: missing vision tensor 'model.vision_model.{e.args[0]}'"
        ) from None
    for k, v in vision_sd.items():
        ours = f"vision_encoder.{k}"
        if ours in expected:
            check_weight(v, expected[ours], folder, f"model.vision_model ({k})")
            loaded[ours] = v

    head = "lang_model.lm_head.weight"
    for key, want in expected.items():
        if key == head and cfg.lm.tie_word_embeddings:
            continue
        if key not in loaded:
            raise LoadError(f"{folder}: tensor for {key!r} missing (IDEFICS weights incomplete)")
        if tuple(loaded[key].shape) != tuple(want.shape):
            raise LoadError(
                f"{folder}: tensor for {key!r} has shape {tuple(loaded[key].shape)}, expected "
                f"{tuple(want.shape)} from {cfg_file}"
            )

    additional = tok.special_tokens_map.get("additional_special_tokens", [])
    prompt_format = IdeficsPromptFormat(
        bos_token=tok.bos_token,
        image_token=IMAGE_TOKEN,
        fake_image_token=FAKE_IMAGE_TOKEN,
        # IdeficsProcessor adds it only when the tokenizer was trained with it
        end_of_utterance_token=(
            END_OF_UTTERANCE_TOKEN if END_OF_UTTERANCE_TOKEN in additional else None
        ),
    ).to_dict()
    blocks = model.lang_model.cross_attn_layer_indices
    report.notes.append(
        f"IDEFICS: resampler {'on' if cfg.resampler.enabled else 'off'}, "
        f"{cfg.image_tokens} keys per image, cross-attention before layers {blocks}, "
        f"vocabulary {hf['vocab_size']} + {hf.get('additional_vocab_size', 0)}"
    )
    return ResolvedFlamingo(cfg, tok, report, loaded, preprocess.to_dict(), prompt_format)
