"""onnxruntime execution of an export folder: vision graph, decoder graph, step model (no torch).

`OnnxFlamingo` loads and checks an export (manifest, sha256, graph I/O against the spec), runs
the vision graph on preprocessed pixels and hands out `OrtStepModel`s that the shared search in
runtime.generation drives.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .decoding import MediaCounter, position_ids
from .manifest import Manifest, ManifestError, load_manifest, safe_join
from .spec import GraphSpec, ModelDims, cross_attn_names, past_names

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def make_session(path: Path, providers: Sequence[str], threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = set(ort.get_available_providers())
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ValueError(
            f"execution provider(s) {unknown} not available in this onnxruntime "
            f"(available: {sorted(available)})"
        )
    return ort.InferenceSession(str(path), options, providers=list(providers))


def check_session_io(session: ort.InferenceSession, spec: GraphSpec, where: str) -> None:
    """The graph must expose exactly the inputs/outputs the manifest's spec declares."""
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != spec.input_names or got_out != spec.output_names:
        missing = [n for n in spec.input_names + spec.output_names if n not in got_in + got_out]
        extra = [n for n in got_in + got_out if n not in spec.input_names + spec.output_names]
        raise ManifestError(
            f"{where}: graph I/O does not match the manifest spec "
            f"(missing {missing[:4]}, unexpected {extra[:4]})"
        )


class OnnxFlamingo:
    """An export folder ready to run: sessions, dims, special tokens."""

    def __init__(
        self,
        export_dir: str | Path,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        threads: int | None = None,
        verify_hashes: bool = True,
    ) -> None:
        self.root = Path(export_dir)
        self.manifest: Manifest = load_manifest(self.root, verify_hashes=verify_hashes)
        self.dims = ModelDims.from_config(self.manifest.model)
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, entry in self.manifest.graphs.items():
            path = safe_join(self.root, entry.file)
            session = make_session(path, providers, threads)
            check_session_io(session, entry.spec, str(path))
            self.sessions[name] = session
        self.vision_spec = self.manifest.graphs["vision"].spec
        self.decoder_spec = self.manifest.graphs["decoder"].spec
        self.float_dtype = np.dtype(self.decoder_spec.outputs[1].dtype)
        tokens = self.manifest.special_tokens
        self.media_token_id: int = tokens["media_token_id"]
        self.eoc_token_id: int = tokens["eoc_token_id"]
        self.pad_token_id: int = tokens["pad_token_id"]

    def encode_images(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 3, S, S) preprocessed pixels -> {image_latents, cross_attn.{j}.key|value}."""
        dtype = np.dtype(self.vision_spec.inputs[0].dtype)
        outputs = self.sessions["vision"].run(
            None, {"pixel_values": np.ascontiguousarray(pixel_values, dtype=dtype)}
        )
        return dict(zip(self.vision_spec.output_names, outputs))

    def rows_cross_kv(
        self, features: dict[str, np.ndarray], rows: Sequence[Sequence[int]]
    ) -> dict[str, np.ndarray]:
        """Per-row cross-attention K/V: row b attends over images rows[b] (indices into the
        vision batch), concatenated in order and zero-padded to the longest row."""
        most = max(1, max(len(r) for r in rows))
        latents = self.dims.num_latents
        out = {}
        for j in self.dims.xattn_layers:
            for name in cross_attn_names(j):
                per_image = features[name]  # (N, H, L, Dh)
                _, h, _, dh = per_image.shape
                buf = np.zeros((len(rows), h, most * latents, dh), dtype=per_image.dtype)
                for b, images in enumerate(rows):
                    for slot, i in enumerate(images):
                        buf[b, :, slot * latents : (slot + 1) * latents] = per_image[i]
                out[name] = buf
        return out

    def step_model(self, cross_kv: dict[str, np.ndarray], num_images: np.ndarray) -> OrtStepModel:
        return OrtStepModel(self, cross_kv, num_images)


class OrtStepModel:
    """StepModel over the decoder graph; owns the self-attention KV cache between steps."""

    def __init__(
        self, engine: OnnxFlamingo, cross_kv: dict[str, np.ndarray], num_images: np.ndarray
    ) -> None:
        self.engine = engine
        self.session = engine.sessions["decoder"]
        self.cross_kv = cross_kv
        self.media = MediaCounter(engine.media_token_id, num_images)
        dims = engine.dims
        batch = len(num_images)
        empty = np.zeros((batch, dims.num_kv_heads, 0, dims.head_dim), dtype=engine.float_dtype)
        self.past = {n: empty for i in range(dims.num_layers) for n in past_names(i)}
        self.uses_position_ids = dims.uses_position_ids

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """All-position logits (N, T, V) for the new tokens; advances the cache."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_position_ids:
            feed["position_ids"] = position_ids(attention_mask, input_ids.shape[1])
        feed["media_index"] = self.media(input_ids)
        feed.update(self.cross_kv)
        feed.update(self.past)
        logits, *presents = self.session.run(None, feed)
        self.past = {
            p: v
            for p, v in zip(
                (n for i in range(self.engine.dims.num_layers) for n in past_names(i)), presents
            )
        }
        return logits

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        return self.run(ids, mask)[:, -1].astype(np.float32)

    def reorder_cache(self, index: np.ndarray) -> None:
        self.past = {k: v[index] for k, v in self.past.items()}
        self.cross_kv = {k: v[index] for k, v in self.cross_kv.items()}
        self.media.reorder(index)
