"""The graph contract: names, dtypes and (symbolic) shapes of every input and output.

Declared once as data and read by the exporter (names, dynamic axes), the runtime (what to feed,
what comes back), the TensorRT profile builder and the tests. No torch, no onnx.
- vision: `pixel_values` (num_images, num_frames, 3, S, S) -> `image_latents` (num_images, L, Dv)
  and, for every gated cross-attention layer j (decoder-layer order), `cross_attn.{j}.key|value`
  (num_images, H, L, Dh): K/V computed once per media item, never per generated token. A media
  item is an image (num_frames 1) or a clip; one run takes items of one frame count (the
  runtime groups them), and a clip gets one set of latents like an image (docs/ARCHITECTURE.md).
- decoder, one graph for prefill and decode: `input_ids`, `attention_mask` (batch, past + new),
  `position_ids` (rotary families), `media_index` (which image each token attends to, 0 =
  none), `logits_index` (which new positions get logits: HF's `logits_to_keep` as indices),
  `cross_attn.{j}.key|value` (batch, H, media_keys, Dh: the row's images' K/V concatenated),
  `past_key_values.{i}.key|value` -> `logits` (batch, logits_positions, vocab),
  `present.{i}.key|value`. Generation asks for the last position only, so a prefill does no
  LM-head work for the other prompt tokens (T x vocab x width MACs: ~13 GFLOP for a 62-token
  prompt at OpenFlamingo-3B's 50k x 2048 head).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import FlamingoExportError

# Symbolic dimension names (also the TensorRT optimization-profile keys).
BATCH = "batch"
SEQUENCE = "sequence"
PAST_SEQUENCE = "past_sequence"
TOTAL_SEQUENCE = "total_sequence"  # past_sequence + sequence
NUM_IMAGES = "num_images"  # media items: images or clips
NUM_FRAMES = "num_frames"  # frames per media item (1 for images), up to the export's max_frames
MEDIA_KEYS = "media_keys"  # images per row x latents per image
LOGITS_POSITIONS = "logits_positions"  # new positions whose logits are computed
# the in-place decoder form's cache buffer length (past and present bound to one buffer)
KV_CAPACITY = "kv_capacity"

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    shape: tuple[Dim, ...]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphSpec:
        return cls(
            d["name"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )


@dataclass(frozen=True)
class ModelDims:
    """The numbers the contract depends on, read from a FlamingoConfig dict."""

    image_size: int
    vision_width: int
    num_latents: int
    xattn_layers: tuple[int, ...]  # decoder-layer indices with a gated cross-attention block
    xattn_heads: int
    xattn_dim_head: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    uses_position_ids: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelDims:
        lm, xa = cfg["lm"], cfg["cross_attn"]
        every, offset = xa["every_n_layers"], xa.get("layer_offset", 1)
        return cls(
            image_size=cfg["vision"]["image_size"],
            vision_width=cfg["vision"]["width"],
            num_latents=image_tokens(cfg),
            xattn_layers=tuple(cross_attn_layer_indices(lm["num_layers"], every, offset)),
            xattn_heads=xa["heads"],
            xattn_dim_head=xa["dim_head"],
            num_layers=lm["num_layers"],
            num_kv_heads=lm["num_kv_heads"],
            head_dim=lm["head_dim"],
            vocab_size=lm["vocab_size"],
            uses_position_ids=lm["family"] in ("llama", "gpt_neox"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Which image a token attends to (FlamingoConfig.media_rule): OpenFlamingo's latest <image>;
# IDEFICS' the same, but none after an EOS until the next <image>, and generated tokens keep
# the last prompt token's image (runtime.decoding.MediaCounter).
MEDIA_RULES = ("openflamingo", "idefics")


def cross_attn_layer_indices(num_layers: int, every_n: int, offset: int = 1) -> list[int]:
    """Decoder layers preceded by a gated cross-attention block: (i + offset) % every_n == 0
    (OpenFlamingo offset 1, IDEFICS offset 0)."""
    return [i for i in range(num_layers) if (i + offset) % every_n == 0]


def image_tokens(cfg: dict[str, Any]) -> int:
    """Cross-attention keys per image from a FlamingoConfig dict: the resampler's latents, or
    (no resampler, IDEFICS) the vision tokens: the patches plus CLS where included."""
    resampler, vision = cfg["resampler"], cfg["vision"]
    if resampler.get("enabled", True):
        return resampler["num_latents"]
    grid = vision["image_size"] // vision["patch_size"]
    return grid * grid + int(vision.get("include_cls", False))


# LM families whose attention takes no position ids (ALiBi biases): they run past the length
# they were trained on (answers there are the model's extrapolation), where a rotary family
# would meet positions it never saw.
EXTRAPOLATING_FAMILIES = ("mpt",)


def trained_context(cfg: dict[str, Any]) -> tuple[int | None, bool]:
    """(positions the LM was trained on, whether its family extrapolates past them) from a
    FlamingoConfig dict: HF's `max_position_embeddings` (MPT: `max_seq_len`); None if unknown."""
    lm = cfg["lm"]
    positions = lm.get("max_position_embeddings")
    return (int(positions) if positions else None), lm["family"] in EXTRAPOLATING_FAMILIES


def cross_attn_names(layer: int) -> tuple[str, str]:
    return f"cross_attn.{layer}.key", f"cross_attn.{layer}.value"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def vision_spec(dims: ModelDims, dtype: str = "float32") -> GraphSpec:
    s = dims.image_size
    kv_shape = (NUM_IMAGES, dims.xattn_heads, dims.num_latents, dims.xattn_dim_head)
    outputs = [
        TensorSpec("image_latents", dtype, (NUM_IMAGES, dims.num_latents, dims.vision_width))
    ]
    for j in dims.xattn_layers:
        outputs += [TensorSpec(n, dtype, kv_shape) for n in cross_attn_names(j)]
    return GraphSpec(
        "vision",
        (TensorSpec("pixel_values", dtype, (NUM_IMAGES, NUM_FRAMES, 3, s, s)),),
        tuple(outputs),
    )


KV_CACHE_FORMS = ("concat", "inplace")
INDEX_FORMS = ("inputs", "in-graph")


class DecoderFormError(FlamingoExportError, ValueError):
    """A decoder form that is unknown, cannot be produced from a graph, or cannot run a
    request (e.g. in-graph indices for rows whose image counts differ)."""


@dataclass(frozen=True)
class DecoderForm:
    """How a decoder graph lays out the same function (exporter/decoder_forms.py rewrites the
    portable graph into the others; docs/ARCHITECTURE.md, "Decoder forms").

    kv_cache: "concat" (portable: present = Concat(past, new), what TensorRT parses) or
    "inplace" (onnxruntime's GroupQueryAttention; past and present may be one preallocated
    (batch, kv_heads, kv_capacity, head_dim) buffer that the step appends to in place).
    indices: "inputs" (media_index, logits_index fed per step) or "in-graph" (computed from
    input_ids and the shapes by runtime.decoding.in_graph_media_index's rule, logits of every
    new position: what onnxruntime-genai can drive).
    Every form but the portable one is onnxruntime's alone: our TensorRT engine binds the
    portable graph's inputs and the in-place form's contrib op has no TensorRT parser.
    """

    kv_cache: str = "concat"
    indices: str = "inputs"

    def validate(self) -> None:
        """Raises DecoderFormError for an unknown kv_cache or indices value."""
        if self.kv_cache not in KV_CACHE_FORMS:
            raise DecoderFormError(
                f"kv_cache must be one of {KV_CACHE_FORMS}, got {self.kv_cache!r}"
            )
        if self.indices not in INDEX_FORMS:
            raise DecoderFormError(f"indices must be one of {INDEX_FORMS}, got {self.indices!r}")

    @property
    def portable(self) -> bool:
        return self == PORTABLE

    @property
    def backends(self) -> tuple[str, ...]:
        """Runtimes that execute this form (see the class docstring)."""
        return ("onnxruntime", "tensorrt") if self.portable else ("onnxruntime",)

    def to_dict(self) -> dict[str, str]:
        return {"kv_cache": self.kv_cache, "indices": self.indices}

    @classmethod
    def parse(cls, text: str) -> DecoderForm:
        """From the CLI's comma list, e.g. "in-graph", "inplace", "inplace,in-graph", "portable"
        (each word names a kv_cache or an indices value)."""
        chosen: dict[str, str] = {}
        for word in (w.strip() for w in text.split(",") if w.strip()):
            if word in KV_CACHE_FORMS:
                half = "kv_cache"
            elif word in INDEX_FORMS:
                half = "indices"
            elif word == "portable":
                half = "portable"
            else:
                raise DecoderFormError(
                    f"unknown decoder form {word!r}: expected a comma list of "
                    f"{(*KV_CACHE_FORMS, *INDEX_FORMS, 'portable')}"
                )
            if half in chosen and chosen[half] != word:
                raise DecoderFormError(
                    f"decoder form {text!r} names two {half} choices: {chosen[half]!r} and {word!r}"
                )
            chosen[half] = word
        form = cls(
            chosen.get("kv_cache", PORTABLE.kv_cache), chosen.get("indices", PORTABLE.indices)
        )
        if "portable" in chosen and not form.portable:
            raise DecoderFormError(
                f"decoder form {text!r}: 'portable' cannot be combined with "
                f"{form.kv_cache if form.kv_cache != PORTABLE.kv_cache else form.indices!r}"
            )
        return form

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DecoderForm:
        form = cls(**(d or {}))
        form.validate()
        return form


PORTABLE = DecoderForm()


def decoder_spec(
    dims: ModelDims, dtype: str = "float32", form: DecoderForm = PORTABLE
) -> GraphSpec:
    inputs = [
        TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
        TensorSpec("attention_mask", "int64", (BATCH, TOTAL_SEQUENCE)),
    ]
    if dims.uses_position_ids:
        inputs.append(TensorSpec("position_ids", "int64", (BATCH, SEQUENCE)))
    if form.indices == "inputs":
        inputs.append(TensorSpec("media_index", "int64", (BATCH, SEQUENCE)))
        inputs.append(TensorSpec("logits_index", "int64", (LOGITS_POSITIONS,)))
    xkv = (BATCH, dims.xattn_heads, MEDIA_KEYS, dims.xattn_dim_head)
    for j in dims.xattn_layers:
        inputs += [TensorSpec(n, dtype, xkv) for n in cross_attn_names(j)]
    past = (BATCH, dims.num_kv_heads, PAST_SEQUENCE, dims.head_dim)
    present = (BATCH, dims.num_kv_heads, TOTAL_SEQUENCE, dims.head_dim)
    if form.kv_cache == "inplace":
        past = present = (BATCH, dims.num_kv_heads, KV_CAPACITY, dims.head_dim)
    outputs = [TensorSpec("logits", dtype, (BATCH, LOGITS_POSITIONS, dims.vocab_size))]
    for i in range(dims.num_layers):
        inputs += [TensorSpec(n, dtype, past) for n in past_names(i)]
        outputs += [TensorSpec(n, dtype, present) for n in present_names(i)]
    return GraphSpec("decoder", tuple(inputs), tuple(outputs))
