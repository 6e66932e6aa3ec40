"""Memory plan: will a Flamingo model at a precision fit a target, and up to which context?

Counted from first principles (dims -> parameters -> bytes), for a released preset (ViT-L/14 +
Perceiver resampler + the preset's LM and cross-attention layout) or an export's manifest:
* weights: fp32/fp16 4/2 bytes per tensor; int8 Linear weights 1 byte + an fp32 scale per
  output channel; int4 4 bits + an fp16 scale per block of 128 inputs. In int8/int4 the
  embeddings, LM head, norms, biases, patch embedding and latents stay fp16.
* self-attention KV cache at max_batch x max_seq_len, twice where present = Concat(past, new)
  (the portable decoder: trt/engine.py binds two buffers per layer), once where the step
  appends in place (the in-place decoder form on onnxruntime, runtime.spec.DecoderForm;
  TensorRT's IKVCacheUpdateLayer, 10.15+, would allow it: docs/ARCHITECTURE.md, "Decoder
  forms"); cross-attention K/V: the vision output for max_images, the decoder's per-row
  inputs (twice, for beam reordering) and each row's current image.
* activations: the largest single-layer working set of either graph (they share one block)
  plus the target's TensorRT workspace; the target's runtime overhead and OS reserve
  (trt/targets.py states the assumptions).
All estimates, none measured on a device here (docs/jetson.md, "Memory: what fits").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from flamingo.config import (
    PRESETS,
    CrossAttentionConfig,
    FlamingoConfig,
    LMConfig,
    ResamplerConfig,
    VisionConfig,
)
from runtime.errors import FlamingoExportError
from runtime.manifest import PRECISIONS

from .targets import Target

INT4_BLOCK = 128

# The preset LMs' dims (their config.json on the Hub). Vocabulary: the LM's own 50432 rows, as
# our loader keeps max(len(tokenizer), vocab_size); OpenFlamingo resizes to len(tokenizer)=50280.
_MPT_1B = {
    "family": "mpt",
    "vocab_size": 50432,
    "hidden_size": 2048,
    "num_layers": 24,
    "num_heads": 16,
    "num_kv_heads": 16,
    "head_dim": 128,
    "intermediate_size": 8192,
    "norm_eps": 1e-5,
    "act": "gelu",
    "tie_word_embeddings": True,
    "qk_ln": True,  # MosaicGPT attn_qk_ln
    "max_position_embeddings": 2048,
}
_RPJ_3B = {
    "family": "gpt_neox",
    "vocab_size": 50432,
    "hidden_size": 2560,
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 32,
    "head_dim": 80,
    "intermediate_size": 10240,
    "norm_eps": 1e-5,
    "act": "gelu",
    "tie_word_embeddings": False,
    "attention_bias": True,
    "rotary_dim": 80,
    "max_position_embeddings": 2048,
}
_MPT_7B = {
    **_MPT_1B,
    "hidden_size": 4096,
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 32,
    "head_dim": 128,
    "intermediate_size": 16384,
    "qk_ln": False,
}
PRESET_LMS: dict[str, dict[str, Any]] = {
    "mosaicml/mpt-1b-redpajama-200b": _MPT_1B,
    "mosaicml/mpt-1b-redpajama-200b-dolly": _MPT_1B,
    "togethercomputer/RedPajama-INCITE-Base-3B-v1": _RPJ_3B,
    "togethercomputer/RedPajama-INCITE-Instruct-3B-v1": _RPJ_3B,
    "mosaicml/mpt-7b": _MPT_7B,
}


class PlanError(FlamingoExportError, ValueError):
    """Unknown preset/precision or invalid limits."""


def preset_config(name: str) -> FlamingoConfig:
    """A released OpenFlamingo model's config: ViT-L/14 (OpenAI) + resampler + preset LM;
    an IDEFICS preset's from its Hub config.json (flamingo.idefics)."""
    if name not in PRESETS:
        raise PlanError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    preset = PRESETS[name]
    if preset.kind == "idefics":
        from pathlib import Path

        from flamingo.idefics import IDEFICS_HUB_CONFIGS, idefics_config

        return idefics_config(IDEFICS_HUB_CONFIGS[name], Path(f"{name} (preset)"))
    lm = LMConfig(**PRESET_LMS[preset.lm_name])
    return FlamingoConfig(
        vision=VisionConfig(),
        lm=lm,
        resampler=ResamplerConfig(),
        cross_attn=CrossAttentionConfig(every_n_layers=preset.cross_attn_every_n_layers),
    )


# ---------------------------------------------------------------------------------------------
# Parameter inventory
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """count x a (fan_in -> fan_out) weight matrix: what int8/int4 quantize."""

    name: str
    fan_in: int
    fan_out: int
    count: int

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out * self.count


@dataclass
class Component:
    """Parameters of one part of the model, split by how they are stored when quantized."""

    linears: list[Linear] = field(default_factory=list)
    embeddings: int = 0  # embedding table (+ untied LM head): fp16 in int8/int4
    other: int = 0  # norms, biases, conv, positions, latents, gates: fp16 in int8/int4
    unused: int = 0  # in the checkpoint but not in any exported graph (CLIP proj, ...)
    graph: str = "decoder"

    @property
    def params(self) -> int:
        """Parameters in the exported graphs."""
        return sum(x.params for x in self.linears) + self.embeddings + self.other

    def weight_bytes(self, precision: str) -> int:
        if precision not in PRECISIONS:
            raise PlanError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
        if precision in ("fp32", "fp16"):
            return self.params * (4 if precision == "fp32" else 2)
        linear = 0
        for x in self.linears:
            if precision == "int8":
                linear += x.count * (x.fan_in * x.fan_out + 4 * x.fan_out)
            else:
                blocks = math.ceil(x.fan_in / INT4_BLOCK)
                linear += x.count * (math.ceil(x.fan_in * x.fan_out / 2) + 2 * x.fan_out * blocks)
        return linear + 2 * (self.embeddings + self.other)


def inventory(cfg: FlamingoConfig) -> dict[str, Component]:
    """vision_encoder, perceiver, cross_attention (to_kv in the vision graph), language_model."""
    v, r, xa, lm = cfg.vision, cfg.resampler, cfg.cross_attn, cfg.lm
    w, nl, hid = v.width, v.layers, int(v.width * v.mlp_ratio)
    vision = Component(
        linears=[
            Linear("attn.in_proj", w, 3 * w, nl),
            Linear("attn.out_proj", w, w, nl),
            Linear("mlp.c_fc", w, hid, nl),
            Linear("mlp.c_proj", hid, w, nl),
        ],
        other=(
            3 * v.patch_size**2 * w  # conv1 (no bias)
            + w  # class embedding
            + (v.num_patches + 1) * w  # positions
            + 2 * w  # ln_pre
            + nl * (3 * w + w + hid + w + 2 * w + 2 * w)  # biases + ln_1 + ln_2
            + (2 * w if v.tokens_after_ln_post else 0)
        ),
        unused=w * v.embed_dim + (0 if v.tokens_after_ln_post else 2 * w),  # proj, ln_post
        graph="vision",
    )
    inner, ff = r.heads * r.dim_head, r.ff_mult * w
    depth = r.depth if r.enabled else 0  # IDEFICS may have no resampler
    perceiver = Component(
        linears=[
            Linear("to_q", w, inner, depth),
            Linear("to_kv", w, 2 * inner, depth),
            Linear("to_out", inner, w, depth),
            Linear("ff.1", w, ff, depth),
            Linear("ff.3", ff, w, depth),
        ],
        other=(r.num_latents * w + depth * (3 * 2 * w + 4 * r.dim_head * r.qk_layer_norms)
               + 2 * w) if r.enabled else 0,
        graph="vision",
    )  # fmt: skip
    d = lm.hidden_size
    n_x = len(xa.layer_indices(lm.num_layers))
    x_inner = xa.heads * xa.dim_head
    cross_kv = Component(linears=[Linear("to_kv", w, 2 * x_inner, n_x)], graph="vision")
    gates = 2 * (d if xa.gate_type == "vector" else 1)
    if xa.block == "llama":  # IDEFICS: RMSNorm, q/k RMSNorm, SwiGLU
        ffn = [Linear(n, d, xa.intermediate_size, n_x) for n in ("ff.gate_proj", "ff.up_proj")]
        ffn.append(Linear("ff.down_proj", xa.intermediate_size, d, n_x))
        norms = 2 * d + 2 * xa.dim_head * xa.qk_norm
    else:
        x_ff = xa.ff_mult * d
        ffn = [Linear("ff.1", d, x_ff, n_x), Linear("ff.3", x_ff, d, n_x)]
        norms = 2 * d + 2 * d  # attn LayerNorm, ff LayerNorm
    cross = Component(
        linears=[Linear("to_q", d, x_inner, n_x), Linear("to_out", x_inner, d, n_x), *ffn],
        other=n_x * (norms + gates),
    )
    language = Component(
        linears=_decoder_linears(lm),
        embeddings=lm.vocab_size * d * (1 if lm.tie_word_embeddings else 2),
        other=_decoder_other(lm),
    )
    return {
        "vision_encoder": vision,
        "perceiver": perceiver,
        "cross_attention_kv": cross_kv,
        "cross_attention": cross,
        "language_model": language,
    }


def _decoder_linears(lm: LMConfig) -> list[Linear]:
    d, n, i = lm.hidden_size, lm.num_layers, lm.intermediate_size
    q, kv = lm.num_heads * lm.head_dim, lm.num_kv_heads * lm.head_dim
    if lm.family == "llama":
        return [
            Linear("q_proj", d, q, n),
            Linear("k_proj", d, kv, n),
            Linear("v_proj", d, kv, n),
            Linear("o_proj", q, d, n),
            Linear("gate_proj", d, i, n),
            Linear("up_proj", d, i, n),
            Linear("down_proj", i, d, n),
        ]
    if lm.family == "gpt_neox":
        return [
            Linear("query_key_value", d, 3 * d, n),
            Linear("dense", d, d, n),
            Linear("dense_h_to_4h", d, i, n),
            Linear("dense_4h_to_h", i, d, n),
        ]
    if lm.family == "mpt":
        return [
            Linear("Wqkv", d, 3 * d, n),
            Linear("out_proj", d, d, n),
            Linear("up_proj", d, i, n),
            Linear("down_proj", i, d, n),
        ]
    raise PlanError(f"no parameter layout for LM family {lm.family!r}")


def _decoder_other(lm: LMConfig) -> int:
    """Norm weights and biases of the decoder layers + final norm."""
    d, n, i = lm.hidden_size, lm.num_layers, lm.intermediate_size
    q, kv = lm.num_heads * lm.head_dim, lm.num_kv_heads * lm.head_dim
    if lm.family == "llama":
        per = 2 * d  # two RMSNorm weights
        per += (q + 2 * kv + d) if lm.attention_bias else 0
        per += (2 * i + d) if lm.mlp_bias else 0
        return n * per + d
    if lm.family == "gpt_neox":
        per = 2 * 2 * d + i + d  # two LayerNorms with bias; MLP biases always
        per += (3 * d + d) if lm.attention_bias else 0
        return n * per + 2 * d
    # mpt: bias-free LayerNorms (+ MosaicGPT's q/k LayerNorms)
    return n * (2 * d + (2 * d if lm.qk_ln else 0)) + d


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class PlanInputs:
    max_batch: int
    max_images: int
    max_seq_len: int
    precision: str
    # copies of the self-attention KV cache: 2 (past and present buffers, the portable
    # decoder), 1 (appended in place: the in-place decoder form)
    kv_buffers: int = 2

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise PlanError(
                f"unknown precision {self.precision!r} (known: {', '.join(PRECISIONS)})"
            )
        for key in ("max_batch", "max_images", "max_seq_len"):
            if getattr(self, key) < 1:
                raise PlanError(f"--{key.replace('_', '-')} must be >= 1")
        if self.kv_buffers not in (1, 2):
            raise PlanError(f"kv_buffers must be 1 or 2, got {self.kv_buffers}")


def act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def kv_cache_bytes(cfg: FlamingoConfig, batch: int, seq: int, precision: str) -> int:
    """One copy of the self-attention KV cache (K and V, every layer)."""
    lm = cfg.lm
    return 2 * lm.num_layers * lm.num_kv_heads * lm.head_dim * seq * batch * act_bytes(precision)


def cross_kv_per_image(cfg: FlamingoConfig, precision: str) -> int:
    xa, n_x = cfg.cross_attn, len(cfg.cross_attn.layer_indices(cfg.lm.num_layers))
    return 2 * n_x * xa.heads * cfg.image_tokens * xa.dim_head * act_bytes(precision)


def decoder_activation_bytes(cfg: FlamingoConfig, batch: int, seq: int, images: int, p: str) -> int:
    """Working set of one decoder layer at the prefill profile's max shape (past = 0)."""
    lm, xa, a = cfg.lm, cfg.cross_attn, act_bytes(p)
    tokens = batch * seq
    logits = tokens * lm.vocab_size * a
    hidden = 4 * tokens * lm.hidden_size * a
    qkv = tokens * (lm.num_heads + 2 * lm.num_kv_heads) * lm.head_dim * a
    scores = 2 * batch * lm.num_heads * seq * seq * a  # scores + probabilities, unfused
    mlp = tokens * lm.intermediate_size * a * (2 if lm.family == "llama" else 1)
    media = images * cfg.image_tokens
    xscores = 2 * batch * xa.heads * seq * media * a
    return logits + hidden + max(qkv + scores, mlp, xscores)


def vision_activation_bytes(cfg: FlamingoConfig, images: int, p: str) -> int:
    v, a = cfg.vision, act_bytes(p)
    t = v.num_patches + 1
    hidden = 4 * images * t * v.width * a
    qkv = 3 * images * t * v.width * a
    scores = 2 * images * v.heads * t * t * a
    mlp = images * t * int(v.width * v.mlp_ratio) * a
    return hidden + max(qkv + scores, mlp)


@dataclass
class Plan:
    source: str
    target: Target
    inputs: PlanInputs
    params: dict[str, int]
    unused_params: int
    lines: dict[str, int]  # budget line -> bytes
    graph_weights: dict[str, int]
    usable_bytes: int
    load_peak_bytes: int
    largest_max_seq_len: int | None
    seq_cap: int
    notes: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(self.lines.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    @property
    def decode_tokens_per_s_bound(self) -> float:
        """Memory-bandwidth bound: every decode step reads all decoder weights once."""
        return self.target.bandwidth_gb_s * 1e9 / max(1, self.graph_weights["decoder"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target.to_dict(),
            "precision": self.inputs.precision,
            "limits": {
                "max_batch": self.inputs.max_batch,
                "max_images": self.inputs.max_images,
                "max_seq_len": self.inputs.max_seq_len,
            },
            "params": self.params,
            "unused_params": self.unused_params,
            "bytes": self.lines,
            "graph_weight_bytes": self.graph_weights,
            "total_bytes": self.total_bytes,
            "usable_bytes": self.usable_bytes,
            "fits": self.fits,
            "load_peak_bytes": self.load_peak_bytes,
            "load_peak_fits": self.load_peak_bytes <= self.usable_bytes,
            "largest_max_seq_len": self.largest_max_seq_len,
            "seq_cap": self.seq_cap,
            "decode_tokens_per_s_bound": round(self.decode_tokens_per_s_bound, 1),
            "notes": self.notes,
        }

    def format(self) -> str:
        gib = 1 << 30

        def g(n: int) -> str:
            return f"{n / gib:8.2f} GiB"

        i = self.inputs
        t = self.target
        out = [
            f"{self.source} at {i.precision} on {t.name} ({t.description})",
            f"limits: max_batch {i.max_batch}, max_images {i.max_images}, "
            f"max_seq_len {i.max_seq_len}",
            "parameters (in the exported graphs):",
        ]
        for name, n in self.params.items():
            out.append(f"  {name:<22}{n:>16,}")
        out.append("memory:")
        labels = {
            "weights": "weights",
            "kv_cache": f"self-attn KV cache (x{i.kv_buffers} buffer"
            + ("s)" if i.kv_buffers > 1 else ")"),
            "cross_kv": "cross-attn K/V",
            "activations": "activations (estimate)",
            "workspace": "TensorRT workspace (limit)",
            "runtime": "CUDA/TensorRT runtime",
        }
        for key, n in self.lines.items():
            out.append(f"  {labels.get(key, key):<34}{g(n)}")
        out.append(f"  {'total':<34}{g(self.total_bytes)}")
        out.append(
            f"  {'usable on target':<34}{g(self.usable_bytes)}  "
            f"({g(t.memory_bytes).strip()} - OS reserve {t.reserve_note})"
        )
        margin = self.usable_bytes - self.total_bytes
        if self.fits:
            out.append(f"verdict: FITS ({g(margin).strip()} to spare)")
        else:
            out.append(f"verdict: DOES NOT FIT (over by {g(-margin).strip()})")
        at = f"at max_batch {i.max_batch}, max_images {i.max_images}"
        if self.largest_max_seq_len is None:
            out.append(f"largest max_seq_len that fits {at}: none (not even 1 token)")
        elif self.largest_max_seq_len >= self.seq_cap:
            out.append(
                f"largest max_seq_len that fits {at}: {self.seq_cap} (the LM's whole context)"
            )
        else:
            out.append(f"largest max_seq_len that fits {at}: {self.largest_max_seq_len}")
        out.append(
            f"decode bound: <= {self.decode_tokens_per_s_bound:.1f} tokens/s "
            f"({t.bandwidth_gb_s:g} GB/s / decoder weights; not measured)"
        )
        if t.shared_memory and self.load_peak_bytes > self.usable_bytes:
            out.append(
                f"warning: engine load peak {g(self.load_peak_bytes).strip()} exceeds usable "
                "memory if the engine file is read into RAM before deserializing (the runtime "
                "maps it instead; see docs/jetson.md)"
            )
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def _budget(
    cfg: FlamingoConfig, comps: dict[str, Component], inputs: PlanInputs, target: Target
) -> dict[str, int]:
    p = inputs.precision
    per_image = cross_kv_per_image(cfg, p)
    act = max(
        decoder_activation_bytes(cfg, inputs.max_batch, inputs.max_seq_len, inputs.max_images, p),
        vision_activation_bytes(cfg, inputs.max_images, p),
    )
    return {
        "weights": sum(c.weight_bytes(p) for c in comps.values()),
        "kv_cache": inputs.kv_buffers
        * kv_cache_bytes(cfg, inputs.max_batch, inputs.max_seq_len, p),
        # vision output, per-row inputs twice, and each row's current image for decode steps
        "cross_kv": per_image * (inputs.max_images * (1 + 2 * inputs.max_batch) + inputs.max_batch),
        "activations": act,
        "workspace": target.workspace_bytes,
        "runtime": target.runtime_overhead_bytes,
    }


def make_plan(
    cfg: FlamingoConfig, source: str, target: Target, inputs: PlanInputs, notes: list[str]
) -> Plan:
    inputs.validate()
    comps = inventory(cfg)
    lines = _budget(cfg, comps, inputs, target)
    usable = target.usable_bytes
    graph_weights = {"vision": 0, "decoder": 0}
    for c in comps.values():
        graph_weights[c.graph] += c.weight_bytes(inputs.precision)
    # Reading an engine file into RAM and deserializing it holds both copies (shared DRAM).
    load_peak = (
        graph_weights["vision"] + 2 * graph_weights["decoder"] + target.runtime_overhead_bytes
    )
    cap = max(cfg.lm.max_position_embeddings, inputs.max_seq_len)

    def fits(seq: int) -> bool:
        trial = PlanInputs(inputs.max_batch, inputs.max_images, seq, inputs.precision)
        return sum(_budget(cfg, comps, trial, target).values()) <= usable

    largest = None
    if fits(1):
        lo, hi = 1, cap
        while lo < hi:  # the budget grows with seq: binary search the last fitting length
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        largest = lo
    params = {name: c.params for name, c in comps.items()}
    params = {
        "vision_encoder": params["vision_encoder"],
        "perceiver": params["perceiver"],
        "cross_attention": params["cross_attention"] + params["cross_attention_kv"],
        "language_model": params["language_model"],
        "total": sum(params.values()),
    }
    return Plan(
        source=source,
        target=target,
        inputs=inputs,
        params=params,
        unused_params=sum(c.unused for c in comps.values()),
        lines=lines,
        graph_weights=graph_weights,
        usable_bytes=usable,
        load_peak_bytes=load_peak,
        largest_max_seq_len=largest,
        seq_cap=cap,
        notes=notes,
    )


def plan_preset(name: str, target: Target, inputs: PlanInputs) -> Plan:
    notes = []
    if inputs.precision in ("int8", "int4"):
        notes.append(
            f"{inputs.precision}: Linear weights quantized (Q/DQ), embeddings/head/norms counted "
            "fp16, as `quantize --no-quantize-embeddings` writes them (quantize's default also "
            "makes the embedding tables int8: less than this)"
        )
    if inputs.precision == "int4":
        notes.append("int4 blocked DequantizeLinear is parsed by TensorRT 10 only (JetPack 6.1+)")
    return make_plan(preset_config(name), name, target, inputs, notes)


def plan_export(manifest: Any, source: str, target: Target, inputs: PlanInputs) -> Plan:
    """Plan from an export's manifest (its model config; its precision unless overridden; the
    KV cache once where its decoder form appends in place)."""
    cfg = FlamingoConfig.from_dict(manifest.model)
    notes = []
    if manifest.graphs["decoder"].form.kv_cache == "inplace":
        inputs = replace(inputs, kv_buffers=1)
        notes.append(
            "the decoder appends to its KV cache in place (GroupQueryAttention, onnxruntime "
            "only): the cache is counted once; TensorRT builds the portable form"
        )
    from runtime.manifest import graph_backends

    ort_only = [n for n in manifest.graphs if "tensorrt" not in graph_backends(manifest, n)]
    if ort_only:
        notes.append(
            f"the {' and '.join(ort_only)} graph(s) run on onnxruntime only (decoder form or "
            "precision: manifest backends); TensorRT cannot build this export as it is: plan "
            "and build a portable export (quantize --precision fp16 | int8 W8A8 | int4 for "
            "TensorRT)"
        )
    precisions = {g.precision for g in manifest.graphs.values()}
    if precisions != {inputs.precision}:
        notes.append(
            f"the export's graphs are {'/'.join(sorted(precisions))}; planned at "
            f"{inputs.precision} as asked"
        )
    return make_plan(cfg, source, target, inputs, notes)
