"""Configuration of a Flamingo model: vision tower, resampler, language model, cross-attention.

One dataclass per component, plain JSON-serialisable values only, so the same config travels
into the export manifest and back out in the torch-free runtime. OpenFlamingo's fixed choices
(resampler depth 6, 8 heads x 64, 64 latents; cross-attention 8 heads x 64) are the defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from runtime.spec import MEDIA_RULES, cross_attn_layer_indices, image_tokens

LM_FAMILIES = ("llama", "gpt_neox", "mpt")

# Where each HF causal LM keeps its decoder blocks: OpenFlamingo's decoder_layers_attr_name
# (open_flamingo/src/factory.py), the prefix of the layers' keys in its checkpoints.
DECODER_LAYERS_ATTR = {
    "llama": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "mpt": "transformer.blocks",
    "opt": "model.decoder.layers",
    "gptj": "transformer.h",
}


@dataclass
class VisionConfig:
    """open_clip CLIP ViT (the `visual` tower). OpenAI weights use QuickGELU."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    embed_dim: int = 768  # output of `proj` (pooled vector only; Flamingo uses the patch tokens);
    # 0 = no projection (IDEFICS keeps none)
    act: str = "quick_gelu"  # "quick_gelu" (OpenAI) or "gelu"
    ln_eps: float = 1e-5
    # open_clip <= 2.22 (what OpenFlamingo trained with) returns patch tokens before ln_post;
    # open_clip >= 2.23 applies ln_post to every token. False = training-time behaviour.
    tokens_after_ln_post: bool = False
    # IDEFICS feeds the last hidden state, CLS included (1 + g*g tokens), without ln_post
    include_cls: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        """Vision tokens per image handed on (to the resampler, or to cross-attention)."""
        return self.num_patches + int(self.include_cls)


@dataclass
class ResamplerConfig:
    """Perceiver resampler; dim is the vision width. IDEFICS may leave it out (`enabled`
    False: cross-attention attends to the vision tokens themselves), adds LayerNorms over the
    head dim on q and k (`qk_layer_norms`, its qk_layer_norms_perceiver) and uses ReLU.

    `max_num_frames` (OpenFlamingo's name): the checkpoint has learned frame (temporal)
    embeddings `perceiver.frame_embs` (max_num_frames, dim), added to each frame's patch tokens
    of a clip; None (the released image models): no frame embeddings."""

    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 64
    ff_mult: int = 4
    enabled: bool = True
    qk_layer_norms: bool = False
    ff_act: str = "gelu"
    max_num_frames: int | None = None


@dataclass
class CrossAttentionConfig:
    """Gated cross-attention blocks inserted before decoder layer i when
    (i + layer_offset) % every_n == 0: OpenFlamingo's (i+1) % n (offset 1), IDEFICS'
    i % cross_layer_interval (offset 0).

    block "openflamingo": LayerNorm -> attention (fused to_kv) ; LayerNorm -> GELU FF (ff_mult).
    block "llama" (IDEFICS): RMSNorm (LM eps) -> attention with optional RMSNorm over the head
    dim on q and k (`qk_norm`) ; RMSNorm -> SwiGLU of `intermediate_size` with the LM's
    activation. Gates tanh(g) are scalars (`gate_type` "float") or one per channel ("vector").
    """

    every_n_layers: int = 1
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    layer_offset: int = 1
    block: str = "openflamingo"
    qk_norm: bool = False
    gate_type: str = "float"
    intermediate_size: int = 0  # llama block: the SwiGLU width

    def layer_indices(self, num_layers: int) -> list[int]:
        return cross_attn_layer_indices(num_layers, self.every_n_layers, self.layer_offset)


@dataclass
class LMConfig:
    """Decoder-only LM, re-implemented from the HF weights of one of LM_FAMILIES."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    act: str
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    # rotary families (llama, gpt_neox): frequencies are stored so the runtime needs no HF code
    rotary_dim: int = 0
    rope_inv_freq: list[float] = field(default_factory=list)
    rope_attention_scaling: float = 1.0
    parallel_residual: bool = False  # gpt_neox
    # mpt
    alibi_bias_max: float = 8.0
    clip_qkv: float | None = None
    qk_ln: bool = False  # MosaicGPT (OpenFlamingo-3B's MPT-1B): LayerNorm on full-width q and k
    softmax_scale: float | None = None
    max_position_embeddings: int = 2048

    @property
    def uses_position_ids(self) -> bool:
        return self.family in ("llama", "gpt_neox")


@dataclass
class FlamingoConfig:
    vision: VisionConfig
    lm: LMConfig
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    cross_attn: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    media_token_id: int = -1
    eoc_token_id: int = -1
    pad_token_id: int = -1
    # which image a token sees (runtime.spec.MEDIA_RULES): "openflamingo", or "idefics" (no
    # image after `eos_token_id` until the next <image>; generated tokens keep the last
    # prompt token's image, as IdeficsProcessor and IdeficsForVisionText2Text.generate do)
    media_rule: str = "openflamingo"
    eos_token_id: int = -1

    def __post_init__(self) -> None:
        if self.media_rule not in MEDIA_RULES:
            raise ValueError(f"media_rule must be one of {MEDIA_RULES}, got {self.media_rule!r}")

    @property
    def image_tokens(self) -> int:
        """Cross-attention keys per image: the resampler's latents, or the vision tokens."""
        return image_tokens(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlamingoConfig:
        def build(kind: type, values: dict[str, Any]) -> Any:
            known = {f.name for f in fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"{kind.__name__}: unknown keys {sorted(unknown)}")
            return kind(**values)

        return cls(
            vision=build(VisionConfig, d["vision"]),
            lm=build(LMConfig, d["lm"]),
            resampler=build(ResamplerConfig, d.get("resampler", {})),
            cross_attn=build(CrossAttentionConfig, d.get("cross_attn", {})),
            media_token_id=d["media_token_id"],
            eoc_token_id=d["eoc_token_id"],
            pad_token_id=d.get("pad_token_id", -1),
            media_rule=d.get("media_rule", "openflamingo"),
            eos_token_id=d.get("eos_token_id", -1),
        )


@dataclass(frozen=True)
class Preset:
    """A released OpenFlamingo (or IDEFICS) model: which LM family and how often
    cross-attention sits. IDEFICS presets' full configs: flamingo.idefics.IDEFICS_HUB_CONFIGS."""

    name: str
    lm_family: str
    lm_layers: int
    cross_attn_every_n_layers: int
    lm_name: str
    kind: str = "openflamingo"  # or "idefics" (loaded with --model)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("OpenFlamingo-3B-vitl-mpt1b", "mpt", 24, 1, "mosaicml/mpt-1b-redpajama-200b"),
        Preset(
            "OpenFlamingo-3B-vitl-mpt1b-langinstruct",
            "mpt",
            24,
            1,
            "mosaicml/mpt-1b-redpajama-200b-dolly",
        ),
        Preset(
            "OpenFlamingo-4B-vitl-rpj3b",
            "gpt_neox",
            32,
            2,
            "togethercomputer/RedPajama-INCITE-Base-3B-v1",
        ),
        Preset(
            "OpenFlamingo-4B-vitl-rpj3b-langinstruct",
            "gpt_neox",
            32,
            2,
            "togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
        ),
        Preset("OpenFlamingo-9B-vitl-mpt7b", "mpt", 32, 4, "mosaicml/mpt-7b"),
        # HuggingFaceM4/idefics-*: LLaMA-7B / LLaMA-65B, cross_layer_interval 4
        Preset("idefics-9b", "llama", 32, 4, "huggyllama/llama-7b", "idefics"),
        Preset("idefics-9b-instruct", "llama", 32, 4, "huggyllama/llama-7b", "idefics"),
        Preset("idefics-80b", "llama", 80, 4, "huggyllama/llama-65b", "idefics"),
        Preset("idefics-80b-instruct", "llama", 80, 4, "huggyllama/llama-65b", "idefics"),
    )
}
