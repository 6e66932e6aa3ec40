"""The Flamingo reference model in PyTorch: the numbers every exported graph is measured against.

Read top to bottom: CLIP vision tower -> Perceiver resampler (frame embeddings for clips) ->
gated cross-attention -> decoder layers of the three LM families -> FlamingoLM (LM with
cross-attention and explicit KV cache tensors) -> Flamingo (the whole model, OpenFlamingo's
forward semantics).

Why the LM is re-implemented from HF weights instead of wrapping HF modules (OpenFlamingo's
mixin): the exported decoder graph needs KV cache and cross-attention K/V as plain tensors in and
out, attention written from MatMul/Softmax (TensorRT cannot carry past KV through the ONNX
Attention op), and a forward that does not change with transformers' cache API. Parameter names
inside each decoder layer match HF's so weights load without a rename table per tensor.

Shape letters: B batch, T new tokens, P past tokens, S = P + T, N images (media items: an image
or a clip), F frames per media item, V patch tokens per frame, L latents per media item,
M = images x latents (cross-attention keys), D width, H heads, Dh head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CrossAttentionConfig, FlamingoConfig, LMConfig, ResamplerConfig, VisionConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def activation(name: str) -> nn.Module:
    """HF/open_clip activation names -> modules (exact erf GELU unless the name says tanh)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name in ("gelu", "gelu_python"):
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return nn.GELU(approximate="tanh")
    if name in ("silu", "swish"):
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unsupported activation {name!r}")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm, statistics in float32 as HF computes them."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def scaled_dot_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale [+ bias]) v from MatMul/Softmax only (exports to plain ONNX ops).

    `scale` is a Python float so the graph holds a constant that onnxruntime folds into the
    MatMul (FusedMatMul alpha, with the K transpose); no bias (vision, resampler) means no Add
    over the whole score tensor."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


class _ReshapeKeepDims(torch.autograd.Function):
    """ONNX export of `reshape_keep_dims`: one Reshape with a constant target shape."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])

    @staticmethod
    def symbolic(g: object, x: torch.Value, shape: tuple[int, ...]) -> torch.Value:
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def reshape_keep_dims(x: torch.Tensor, *shape: int) -> torch.Tensor:
    """Reshape where 0 keeps that dim of x (ONNX Reshape semantics), e.g. (0, 0, H, -1).

    Why: tracing `view(b, t, h, d)` with dynamic b, t records Shape -> Gather -> Unsqueeze ->
    Concat for every call, ~9 nodes per head split, and at batch 1 a decode step costs its
    weight reads plus a few microseconds per executed node (docs/measurements.md)."""
    if torch.onnx.is_in_onnx_export():
        return _ReshapeKeepDims.apply(x, shape)
    return _ReshapeKeepDims.forward(None, x, shape)


def kv_heads(to_kv: nn.Linear, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenFlamingo's `to_kv(x).chunk(2, -1)` split into heads, as two projections by the
    weight's halves (constants at export): no Slice copies of the (N, T, 2 * inner) output."""
    k_weight, v_weight = to_kv.weight.chunk(2, dim=0)
    return split_heads(F.linear(x, k_weight), heads), split_heads(F.linear(x, v_weight), heads)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H * Dh) -> (B, H, T, Dh)."""
    return reshape_keep_dims(x, 0, 0, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, Dh) -> (B, T, H * Dh)."""
    return reshape_keep_dims(x.transpose(1, 2), 0, 0, -1)


# ---------------------------------------------------------------------------------------------
# Vision: open_clip VisionTransformer (parameter names as in open_clip's `visual.*` state dict)
# ---------------------------------------------------------------------------------------------


class VisionAttention(nn.Module):
    """nn.MultiheadAttention's parameter layout (in_proj_weight) with an exportable forward."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * width, width)))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # q, k, v from row blocks of in_proj (folded to three weights at export): no Split
        # copy of the (N, T, 3D) projection and no permute of it
        weights, biases = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        q, k, v = (split_heads(F.linear(x, w, b), self.heads) for w, b in zip(weights, biases))
        out = scaled_dot_attention(q, k, v, None, (self.width // self.heads) ** -0.5)
        return self.out_proj(merge_heads(out))


class VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = activation(act)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = VisionAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = VisionMLP(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionTransformerBlocks(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """CLIP ViT returning (pooled, patch tokens without CLS), like open_clip with output_tokens;
    with `include_cls` (IDEFICS) the tokens are the last hidden state, CLS first."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.num_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.transformer = VisionTransformerBlocks(cfg)
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.zeros(w, cfg.embed_dim)) if cfg.embed_dim else None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(pixels)  # (N, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, 1+g*g, D)
        x = self.transformer(self.ln_pre(x))
        first = 0 if self.cfg.include_cls else 1
        if self.cfg.tokens_after_ln_post:  # open_clip >= 2.23
            x = self.ln_post(x)
            pooled, tokens = x[:, 0], x[:, first:]
        else:  # open_clip <= 2.22 (the released checkpoints' training), IDEFICS
            pooled, tokens = self.ln_post(x[:, 0]), x[:, first:]
        return (pooled if self.proj is None else pooled @ self.proj), tokens


# ---------------------------------------------------------------------------------------------
# Perceiver resampler (names as OpenFlamingo's `perceiver.*` so checkpoints load unchanged)
# ---------------------------------------------------------------------------------------------


def feed_forward(dim: int, mult: int, act: str = "gelu") -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear, no biases (OpenFlamingo's FeedForward; IDEFICS'
    perceiver MLP is the same with ReLU)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        activation(act),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents)."""

    def __init__(self, dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        inner = cfg.heads * cfg.dim_head
        self.heads, self.scale = cfg.heads, cfg.dim_head**-0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        if cfg.qk_layer_norms:  # IDEFICS: LayerNorm over the head dim of q and k
            self.q_layer_norm = nn.LayerNorm(cfg.dim_head)
            self.k_layer_norm = nn.LayerNorm(cfg.dim_head)
        self.qk_layer_norms = cfg.qk_layer_norms

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # media (N, V, D), latents (N, L, D)
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = kv_heads(self.to_kv, torch.cat([media, latents], dim=1), self.heads)
        if self.qk_layer_norms:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        out = scaled_dot_attention(q, k, v, None, self.scale)
        return self.to_out(merge_heads(out))  # (N, L, D)


class PerceiverResampler(nn.Module):
    """(N, F, V, D) patch tokens of N media items -> (N, L, D) latents: a fixed number of
    visual tokens per media item, an image (F = 1) or a clip of F frames.

    With frame embeddings (cfg.max_num_frames, OpenFlamingo's `frame_embs`), frame f's tokens
    get `frame_embs[f]` added; then the F x V tokens are flattened and the latents attend over
    all of them: one set of latents stands for the whole clip (the Flamingo paper's video path,
    open_flamingo's `PerceiverResampler(max_num_frames=F)`)."""

    def __init__(self, dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.dim = dim
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim))
        if cfg.max_num_frames is not None:
            self.frame_embs = nn.Parameter(torch.randn(cfg.max_num_frames, dim))
        else:
            self.register_parameter("frame_embs", None)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(dim, cfg), feed_forward(dim, cfg.ff_mult, cfg.ff_act)]
            )
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        if media.ndim != 4:
            raise ValueError(f"media must be (N, F, V, D) patch tokens, got {tuple(media.shape)}")
        if self.frame_embs is not None:
            frames = media.shape[1]
            if not torch.jit.is_tracing() and frames > self.frame_embs.shape[0]:
                raise ValueError(
                    f"{frames} frames per media item, but the resampler has frame embeddings "
                    f"for at most {self.frame_embs.shape[0]} (max_num_frames)"
                )
            # (F, 1, D): one embedding per frame, the same for all of its V patch tokens
            media = media + self.frame_embs[:frames].unsqueeze(1).to(media.dtype)
        media = reshape_keep_dims(media, 0, -1, self.dim)  # (N, F*V, D)
        latents = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


# ---------------------------------------------------------------------------------------------
# Gated cross-attention and the media-location rule
# ---------------------------------------------------------------------------------------------


def media_index_from_ids(
    input_ids: torch.Tensor, media_token_id: int, eos_token_id: int | None = None
) -> torch.Tensor:
    """1-based number of the latest `<image>` at or before each token; 0 before the first one.

    An integer cumsum (OpenFlamingo's bool cumsum is what broke its ONNX export, issue #256).
    With `eos_token_id` (IDEFICS' rule, processing_idefics.image_attention_mask_for_packed_
    input_ids): tokens after an EOS see no image until the next `<image>` (the EOS itself does).
    """
    is_image = input_ids == media_token_id
    index = torch.cumsum(is_image.to(torch.int64), dim=-1)
    if eos_token_id is None:
        return index
    pos = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    none = torch.full_like(pos, -1)
    last_image = torch.where(is_image, pos, none).cummax(-1).values
    last_eos = torch.where(input_ids == eos_token_id, pos, none).cummax(-1).values
    last_eos_before = torch.cat([none[..., :1], last_eos[..., :-1]], dim=-1)
    return index.masked_fill(last_eos_before > last_image, 0)


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)): LLaMA's MLP (IDEFICS' cross-attention block uses it too)."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MaskedCrossAttention(nn.Module):
    """Text queries attend only to the latents of their own (latest preceding) image.

    OpenFlamingo: LayerNorm on the text. IDEFICS ("llama" block): RMSNorm, and optionally an
    RMSNorm over the head dim of q and of k (`qk_norm`); k's is part of the image K/V."""

    def __init__(self, dim: int, dim_visual: int, xa: CrossAttentionConfig, lm: LMConfig) -> None:
        super().__init__()
        inner = xa.heads * xa.dim_head
        self.heads, self.scale = xa.heads, xa.dim_head**-0.5
        llama = xa.block == "llama"
        self.norm = RMSNorm(dim, lm.norm_eps) if llama else nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.qk_norm = xa.qk_norm
        if xa.qk_norm:
            self.q_layer_norm = RMSNorm(xa.dim_head, lm.norm_eps)
            self.k_layer_norm = RMSNorm(xa.dim_head, lm.norm_eps)

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, Dv) latents -> K, V (N, H, L, Dh): computed once per image, not per token."""
        k, v = kv_heads(self.to_kv, latents, self.heads)
        return (self.k_layer_norm(k) if self.qk_norm else k), v

    def forward(
        self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, media_mask: torch.Tensor
    ) -> torch.Tensor:
        # x (B, T, D); key/value (B, H, M, Dh); media_mask (B, 1, T, M) additive 0/-inf-like
        q = split_heads(self.to_q(self.norm(x)), self.heads)
        if self.qk_norm:
            q = self.q_layer_norm(q)
        out = scaled_dot_attention(q, key, value, media_mask, self.scale)  # (B, H, T, Dh)
        return self.to_out(merge_heads(out))


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(attn_gate) * xattn(x) ; x + tanh(ff_gate) * ff(x). Gates 0 = the plain LM.

    ff: OpenFlamingo's LayerNorm -> GELU FeedForward, or (IDEFICS) RMSNorm -> SwiGLU. Gates are
    one scalar each, or one value per channel (`gate_type` "vector", IDEFICS alpha_type)."""

    def __init__(self, dim: int, dim_visual: int, xa: CrossAttentionConfig, lm: LMConfig) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, xa, lm)
        gate = (dim,) if xa.gate_type == "vector" else (1,)
        self.attn_gate = nn.Parameter(torch.zeros(gate))
        if xa.block == "llama":
            self.ff = nn.Sequential(
                RMSNorm(dim, lm.norm_eps), SwiGLU(dim, xa.intermediate_size, lm.act)
            )
        else:
            self.ff = feed_forward(dim, xa.ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(gate))

    def forward(
        self,
        x: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        media_mask: torch.Tensor,
        has_media: torch.Tensor,
    ) -> torch.Tensor:
        # has_media (B, T, 1): text before the first image gets no cross-attention output
        x = x + self.attn(x, key, value, media_mask) * has_media * self.attn_gate.tanh()
        return x + self.ff(x) * self.ff_gate.tanh()


def cross_attention_mask(
    media_index: torch.Tensor, num_keys: int, num_latents: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive mask (B, 1, T, M) allowing key m iff it belongs to image media_index, plus (B,T,1)
    multiplier zeroing tokens with media_index 0 (OpenFlamingo zeroes their attention)."""
    key_image = torch.arange(num_keys, device=media_index.device) // num_latents + 1  # (M,)
    allowed = key_image.view(1, 1, 1, -1) == media_index.unsqueeze(1).unsqueeze(-1)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    mask = torch.where(allowed, torch.zeros((), dtype=dtype), neg)
    has_media = (media_index > 0).to(dtype).unsqueeze(-1)
    return mask, has_media


# ---------------------------------------------------------------------------------------------
# Decoder layers: one class per LM family, HF parameter names, explicit past/present KV
# ---------------------------------------------------------------------------------------------


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, signed sin (B, 1, T, rot): FlamingoLM.rope


def apply_rotary(x: torch.Tensor, rope: Rope, rot: int) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin on the first `rot` dims (all for LLaMA, rotary_pct
    for GPT-NeoX). rotate_half(x) * sin = swap_halves(x) * [-sin, sin] (the frequencies repeat
    over the halves), so with FlamingoLM.rope's signed sin there is no Neg per layer, and `rot`
    being a Python int makes every Slice constant (no Shape arithmetic in the graph)."""
    cos, signed_sin = rope
    half = rot // 2
    x_rot = x if rot == x.shape[-1] else x[..., :rot]
    swapped = torch.cat([x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = x_rot * cos + swapped * signed_sin
    return out if rot == x.shape[-1] else torch.cat([out, x[..., rot:]], dim=-1)


def append_kv(
    past: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)


def repeat_kv(x: torch.Tensor, cfg: LMConfig) -> torch.Tensor:
    """(B, KVH, S, Dh) -> (B, H, S, Dh) for grouped-query attention."""
    groups = cfg.num_heads // cfg.num_kv_heads
    if groups == 1:
        return x
    # a broadcasting Mul by ones copies each KV head `groups` times without reading x.shape
    # (expand() would need (B, S) traced as Shape ops); x * 1 is exact
    ones = torch.ones((1, 1, groups, 1, 1), dtype=x.dtype, device=x.device)
    return reshape_keep_dims(x.unsqueeze(2) * ones, 0, cfg.num_heads, -1, cfg.head_dim)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, kvh * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, kvh * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=cfg.attention_bias)

    def forward(self, x, bias, rope, past):
        cfg = self.cfg
        q = split_heads(self.q_proj(x), cfg.num_heads)
        k = split_heads(self.k_proj(x), cfg.num_kv_heads)
        v = split_heads(self.v_proj(x), cfg.num_kv_heads)
        q, k = apply_rotary(q, rope, cfg.rotary_dim), apply_rotary(k, rope, cfg.rotary_dim)
        k, v = append_kv(past, k, v)  # (B, KVH, S, Dh): the present cache
        kk, vv = repeat_kv(k, cfg), repeat_kv(v, cfg)
        out = scaled_dot_attention(q, kk, vv, bias, cfg.head_dim**-0.5)
        return self.o_proj(merge_heads(out)), (k, v)


class LlamaMLP(SwiGLU):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__(cfg.hidden_size, cfg.intermediate_size, cfg.act, cfg.mlp_bias)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, bias, rope, past):
        attn, present = self.self_attn(self.input_layernorm(x), bias, rope, past)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), present


class GPTNeoXAttention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, cfg.attention_bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, bias, rope, past):
        cfg = self.cfg
        dh = cfg.head_dim
        # fused projection is laid out per head: (B, T, H, 3 * Dh)
        qkv = split_heads(self.query_key_value(x), cfg.num_heads)
        q, k, v = qkv[..., :dh], qkv[..., dh : 2 * dh], qkv[..., 2 * dh :]
        q, k = apply_rotary(q, rope, cfg.rotary_dim), apply_rotary(k, rope, cfg.rotary_dim)
        k, v = append_kv(past, k, v)
        out = scaled_dot_attention(q, k, v, bias, dh**-0.5)
        return self.dense(merge_heads(out)), (k, v)


class GPTNeoXMLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.act)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXDecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attention = GPTNeoXAttention(cfg)
        self.mlp = GPTNeoXMLP(cfg)

    def forward(self, x, bias, rope, past):
        attn, present = self.attention(self.input_layernorm(x), bias, rope, past)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x)), present
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), present


def bias_free_layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    """MPT's LayerNorm has no bias (HF MptBlock sets it to None)."""
    return nn.LayerNorm(dim, eps=eps, bias=False)


class MptAttention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.scale = cfg.softmax_scale or cfg.head_dim**-0.5
        if cfg.qk_ln:
            self.q_ln = bias_free_layer_norm(cfg.hidden_size, cfg.norm_eps)
            self.k_ln = bias_free_layer_norm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, bias, rope, past):
        cfg = self.cfg
        d = cfg.hidden_size
        qkv = self.Wqkv(x)
        if cfg.clip_qkv:
            qkv = qkv.clamp(min=-cfg.clip_qkv, max=cfg.clip_qkv)
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        if cfg.qk_ln:  # over the full width, before the head split (and before the cache)
            q, k = self.q_ln(q), self.k_ln(k)
        q, k, v = (split_heads(s, cfg.num_heads) for s in (q, k, v))
        k, v = append_kv(past, k, v)
        out = scaled_dot_attention(q, k, v, bias, self.scale)  # bias carries ALiBi per head
        return self.out_proj(merge_heads(out)), (k, v)


class MptMLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.act = activation(cfg.act)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class MptDecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.norm_1 = bias_free_layer_norm(cfg.hidden_size, cfg.norm_eps)
        self.attn = MptAttention(cfg)
        self.norm_2 = bias_free_layer_norm(cfg.hidden_size, cfg.norm_eps)
        self.ffn = MptMLP(cfg)

    def forward(self, x, bias, rope, past):
        attn, present = self.attn(self.norm_1(x), bias, rope, past)
        x = x + attn
        return x + self.ffn(self.norm_2(x)), present


DECODER_LAYERS: dict[str, type[nn.Module]] = {
    "llama": LlamaDecoderLayer,
    "gpt_neox": GPTNeoXDecoderLayer,
    "mpt": MptDecoderLayer,
}


def alibi_slopes(num_heads: int, alibi_bias_max: float) -> torch.Tensor:
    """MPT's ALiBi slopes (H,), including its ordering for non-power-of-two head counts."""
    n2 = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / torch.pow(
        2, torch.arange(1, n2 + 1, dtype=torch.float32) * (alibi_bias_max / n2)
    )
    if n2 != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


# ---------------------------------------------------------------------------------------------
# The LM with cross-attention: what the decoder graph exports
# ---------------------------------------------------------------------------------------------


class FlamingoLM(nn.Module):
    """Decoder-only LM with gated cross-attention blocks before selected decoder layers.

    forward takes everything explicitly (no hidden conditioning state): the per-token media
    index, the per-layer cross-attention K/V over all images of each row, and past KV.
    """

    def __init__(self, cfg: FlamingoConfig) -> None:
        super().__init__()
        lm = cfg.lm
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(lm.vocab_size, lm.hidden_size)
        self.layers = nn.ModuleList(DECODER_LAYERS[lm.family](lm) for _ in range(lm.num_layers))
        xa = cfg.cross_attn
        self.cross_attn_layer_indices = xa.layer_indices(lm.num_layers)
        # keyed by decoder-layer index, like OpenFlamingo's `<layers>.<i>.gated_cross_attn_layer`
        self.cross_attn_layers = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(lm.hidden_size, cfg.vision.width, xa, lm)
                for i in self.cross_attn_layer_indices
            }
        )
        if lm.family == "llama":
            self.final_norm = RMSNorm(lm.hidden_size, lm.norm_eps)
        elif lm.family == "mpt":
            self.final_norm = bias_free_layer_norm(lm.hidden_size, lm.norm_eps)
        else:
            self.final_norm = nn.LayerNorm(lm.hidden_size, eps=lm.norm_eps)
        self.lm_head = nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
        if lm.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._init_buffers()

    def _init_buffers(self) -> None:
        """Constants derived from the config (not weights); rebuilt after meta-device loading."""
        lm = self.cfg.lm
        if lm.rope_inv_freq:
            inv = torch.tensor(lm.rope_inv_freq, dtype=torch.float32)
            self.register_buffer("rope_inv_freq", inv, persistent=False)
        if lm.family == "mpt":
            slopes = alibi_slopes(lm.num_heads, lm.alibi_bias_max)
            self.register_buffer("alibi_slopes", slopes, persistent=False)

    def media_kv(self, latents: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per cross-attention layer K/V (N, H, L, Dh) for N images' latents (N, L, Dv)."""
        return [
            self.cross_attn_layers[str(i)].attn.media_kv(latents)
            for i in self.cross_attn_layer_indices
        ]

    def rope(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.unsqueeze(-1).float() * self.rope_inv_freq  # (B, T, rot/2)
        scale = self.cfg.lm.rope_attention_scaling
        cos, sin = freqs.cos() * scale, freqs.sin() * scale
        cos, signed_sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        return cos.to(dtype).unsqueeze(1), signed_sin.to(dtype).unsqueeze(1)  # (B, 1, T, rot)

    def self_attention_bias(
        self, attention_mask: torch.Tensor, num_new: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive (B, 1|H, T, S) bias: causal over S = past + new, padding, ALiBi for MPT."""
        total = attention_mask.shape[1]
        past = total - num_new
        key_pos = torch.arange(total, device=attention_mask.device)
        query_pos = torch.arange(num_new, device=attention_mask.device) + past
        causal = key_pos.view(1, -1) <= query_pos.view(-1, 1)  # (T, S)
        allowed = causal.view(1, 1, num_new, total) & (attention_mask.view(-1, 1, 1, total) > 0)
        bias = torch.where(
            allowed, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype)
        )
        if self.cfg.lm.family == "mpt":
            # slope * (key - last key): only differences matter under softmax, so padding and
            # the absolute offset are irrelevant; same values as HF's build_mpt_alibi_tensor
            rel = (key_pos - (total - 1)).to(torch.float32)
            bias = bias + (self.alibi_slopes.view(1, -1, 1, 1) * rel.view(1, 1, 1, -1)).to(dtype)
        return bias

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, S) 1 = real token (past and new), 0 = padding
        media_index: torch.Tensor,  # (B, T) 1-based image number per token, 0 = none
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]],  # per xattn layer (B, H, M, Dh)
        past: KVCache,  # per decoder layer (B, KVH, P, Dh)
        position_ids: torch.Tensor | None = None,  # (B, T) rotary families
        logits_index: torch.Tensor | None = None,  # (K,) new positions to compute logits for
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T, V), or (B, K, V) for the positions in `logits_index`, and the
        present KV. Selecting before the final norm leaves the other positions' LM-head work
        undone (HF's logits_to_keep)."""
        x = self.embed_tokens(input_ids)  # (B, T, D)
        dtype = x.dtype
        bias = self.self_attention_bias(attention_mask, input_ids.shape[1], dtype)
        rope = self.rope(position_ids, dtype) if self.cfg.lm.uses_position_ids else None
        num_keys = cross_kv[0][0].shape[2] if cross_kv else 0
        media_mask, has_media = cross_attention_mask(
            media_index, num_keys, self.cfg.image_tokens, dtype
        )
        present: KVCache = []
        xattn_kv = dict(zip(self.cross_attn_layer_indices, cross_kv))
        for i, layer in enumerate(self.layers):
            if i in xattn_kv:
                key, value = xattn_kv[i]
                x = self.cross_attn_layers[str(i)](x, key, value, media_mask, has_media)
            x, kv = layer(x, bias, rope, past[i])
            present.append(kv)
        if logits_index is not None:
            x = x.index_select(1, logits_index)
        return self.logits(self.final_norm(x)), present

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, V). A tied head is computed as (W x^T)^T so an exported graph
        holds the vocab x width matrix once: `x W^T` makes the ONNX exporter fold a transposed
        copy of W beside the Gather's W (+412 MB for MPT-1B); here only activations transpose."""
        if self.lm_head.weight is self.embed_tokens.weight:
            return torch.matmul(self.lm_head.weight, x.transpose(-1, -2)).transpose(-1, -2)
        return self.lm_head(x)

    def empty_cache(
        self, batch: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> KVCache:
        lm = self.cfg.lm
        shape = (batch, lm.num_kv_heads, 0, lm.head_dim)
        return [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(lm.num_layers)
        ]


def position_ids_from_mask(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """HF's rule for left padding: cumsum(mask) - 1, pads at 1; positions of the last num_new."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, -num_new:]


# ---------------------------------------------------------------------------------------------
# Flamingo: the whole model
# ---------------------------------------------------------------------------------------------


class Flamingo(nn.Module):
    def __init__(self, cfg: FlamingoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_encoder = VisionTransformer(cfg.vision)
        self.perceiver = (
            PerceiverResampler(cfg.vision.width, cfg.resampler) if cfg.resampler.enabled else None
        )
        self.lang_model = FlamingoLM(cfg)
        # how inputs are prepared where not OpenFlamingo's way, set by a loader (IDEFICS):
        # runtime.images.PreprocessConfig and runtime.idefics.IdeficsPromptFormat dicts,
        # recorded in the export manifest
        self.preprocess: dict | None = None
        self.prompt_format: dict | None = None

    def encode_media(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, F, 3, H, W) preprocessed frames of N media items -> (N, L, Dv) latents.

        Every frame goes through the vision encoder alone; the resampler sees all F frames of
        an item at once (an image is F = 1). Without a resampler (IDEFICS) the latents are an
        image's vision tokens themselves (L = cfg.image_tokens; images only)."""
        n, frames = pixels.shape[0], pixels.shape[1]
        _, tokens = self.vision_encoder(pixels.flatten(0, 1))  # (N*F, g*g [+1 CLS], Dv)
        tokens = tokens.reshape(n, frames, tokens.shape[-2], tokens.shape[-1])  # (N, F, V, Dv)
        if self.perceiver is None:
            if not torch.jit.is_tracing() and frames != 1:
                raise ValueError("a model without a resampler takes images only (F = 1)")
            return tokens[:, 0]
        return self.perceiver(tokens)

    def media_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) prompt ids -> which image each token attends to (cfg.media_rule)."""
        eos = self.cfg.eos_token_id if self.cfg.media_rule == "idefics" else None
        return media_index_from_ids(input_ids, self.cfg.media_token_id, eos)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed pixels -> (N, L, Dv) latents (media items of one frame)."""
        return self.encode_media(pixels.unsqueeze(1))

    def cross_kv_for_rows(self, latents: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B, T_img, L, Dv) latents of each row's images -> per layer (B, H, T_img*L, Dh)."""
        b, t_img, num_latents, dv = latents.shape
        out = []
        for k, v in self.lang_model.media_kv(latents.reshape(b * t_img, num_latents, dv)):
            h, dh = k.shape[1], k.shape[3]
            out.append(
                tuple(
                    s.reshape(b, t_img, h, num_latents, dh).transpose(1, 2).reshape(b, h, -1, dh)
                    for s in (k, v)
                )
            )
        return out

    def encode_vision_x(self, vision_x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """OpenFlamingo's vision_x (B, T_img, F, C, H, W) -> cross-attention K/V: T_img media
        items per row, each of F frames (images: F = 1; open_flamingo's own wrapper asserts
        F == 1, its resampler takes any F up to max_num_frames)."""
        if vision_x.ndim != 6:
            raise ValueError(
                f"vision_x must be (B, T_img, F, C, H, W), got {tuple(vision_x.shape)}"
            )
        b, t_img = vision_x.shape[:2]
        latents = self.encode_media(vision_x.flatten(0, 1))
        return self.cross_kv_for_rows(latents.view(b, t_img, *latents.shape[1:]))

    def forward(
        self,
        vision_x: torch.Tensor,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full-sequence logits (B, T, V), OpenFlamingo's `Flamingo.forward` semantics."""
        if attention_mask is None:
            attention_mask = torch.ones_like(lang_x)
        cross_kv = self.encode_vision_x(vision_x)
        logits, _ = self.lang_model(
            lang_x,
            attention_mask,
            self.media_index(lang_x),
            cross_kv,
            self.lang_model.empty_cache(lang_x.shape[0], self.lang_model.embed_tokens.weight.dtype),
            position_ids_from_mask(attention_mask, lang_x.shape[1]),
        )
        return logits
