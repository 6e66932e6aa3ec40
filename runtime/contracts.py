"""What the pipeline needs of an engine and of its step models, declared once (numpy only).

The search (runtime/generation.py) needs only `generation.StepModel`: `step` and
`reorder_cache`. The pipeline, the prefix cache and parity need a `DecoderStepModel` (that, plus
all-position `run`, `advance` into the cache, the cache's length and a host copy of it, when the
prefill ended) from an `Engine`: an export ready to run. onnxruntime's
`runtime.engine.OnnxFlamingo` and TensorRT's `trt.engine.TrtFlamingo` are engines; their step
models and the PyTorch reference's (`flamingo.generate.TorchStepModel`) share
`runtime.decoding.BaseStepModel`. OnnxFlamingo makes each graph's `Session` with a
`SessionFactory` (onnxruntime by default; parity and calibration pass their own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .decoding import ImageFeatures
from .generation import StepModel
from .manifest import Manifest
from .spec import GraphSpec, ModelDims


@runtime_checkable
class DecoderStepModel(StepModel, Protocol):
    """A StepModel that owns the decoder's self-attention KV cache between calls.

    Every call takes the new tokens (N, T) int64 and the attention mask (N, past + T); `step`
    also accepts ids that start with tokens already cached (the mask says how many are new).
    """

    prefill_end: float | None  # time.perf_counter() when the first `step` returned

    @property
    def past_length(self) -> int:
        """Cached positions per row."""
        ...

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits (N, T, V) of every new position; advances the cache."""
        ...

    def advance(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Run new tokens into the cache (their logits are not wanted)."""
        ...

    def past_arrays(self) -> dict[str, np.ndarray]:
        """An owned host copy of the cache, `past_key_values.{i}.key|value` (N, KVH, past, Dh)."""
        ...


@runtime_checkable
class Engine(Protocol):
    """An export folder ready to run: its contract, the vision graph and decoder step models."""

    root: Path
    manifest: Manifest
    dims: ModelDims
    vision_spec: GraphSpec
    decoder_spec: GraphSpec
    float_dtype: np.dtype  # the decoder's K/V dtype
    media_token_id: int
    eoc_token_id: int
    pad_token_id: int

    @property
    def limits(self) -> dict[str, int]:
        """max_images, max_seq_len, max_frames (TensorRT: and max_batch) it runs within: the
        export's or lower."""
        ...

    def performance_notes(self) -> list[str]:
        """Why this export will run badly on this engine (empty: nothing known)."""
        ...

    def encode_images(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 3, S, S) images or (N, F, 3, S, S) media items of F frames (1..max_frames)
        -> {image_latents, cross_attn.{j}.key|value}, one entry per item."""
        ...

    def rows_cross_kv(
        self, features: ImageFeatures, rows: Sequence[Sequence[int]]
    ) -> dict[str, np.ndarray]:
        """Per-row cross-attention K/V (runtime.decoding.rows_cross_kv)."""
        ...

    def step_model(
        self,
        cross_kv: dict[str, np.ndarray],
        num_images: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        media_count: np.ndarray | None = None,
        io_binding: bool = True,
    ) -> DecoderStepModel:
        """A step model over rows with these K/V and image counts, optionally starting from a
        cached `past` (host arrays) with `media_count` images already seen per row."""
        ...


@runtime_checkable
class Session(Protocol):
    """A graph's executor as OnnxFlamingo uses it (onnxruntime.InferenceSession's names; its
    step models use IOBinding where the session has `io_binding`)."""

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]) -> list[Any]:
        """Outputs (all when output_names is None) for the feed, as numpy arrays."""
        ...

    def get_inputs(self) -> Sequence[Any]:
        """The graph's inputs in order, each with a `.name`."""
        ...

    def get_outputs(self) -> Sequence[Any]:
        """The graph's outputs in order, each with a `.name`."""
        ...


SessionFactory = Callable[[str, Path], Session]  # (graph name, ONNX file) -> its session
