"""TensorRT execution of an export folder's engines, with the KV cache resident on the device.

`flamingo-export build` writes `vision.engine`, `decoder.engine` and `engines.json` into the
export folder (runtime/engines.py checks them against the export, TensorRT and the GPU at load).
`TrtFlamingo` is the runtime.contracts.Engine over them, so `runtime.pipeline` and
`runtime.generation` drive it unchanged: `FlamingoPipeline(export_dir,
engine=TrtFlamingo(export_dir))`. `TrtStepModel` is its DecoderStepModel: device buffers
allocated once at max_batch x max_seq_len, two per layer for K and two for V, bound in turn as
past and present so nothing is copied and only the last position's logits reach the host per
decode step (the buffer layout: docs/jetson.md, "The runtime's device memory"). Device memory
and execution sit behind trt/device.py's protocols; not run against a GPU here: the buffer
logic is tested with the stand-ins of tests/trt/stand_in.py (tests/trt/test_trt_build.py).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.decoding import (
    BaseStepModel,
    RowsCrossKV,
    current_image_offsets,
    logits_index,
    media_reset_token,
    position_ids,
)
from runtime.engines import (
    EngineMismatchError,
    check_against_device,
    check_against_export,
    load_engines_manifest,
)
from runtime.manifest import Manifest, load_manifest, safe_join
from runtime.spec import ModelDims, cross_attn_names, past_names, present_names

from .device import (
    CudaDevice,
    Device,
    Executor,
    PingPong,
    TrtExecutor,
    device_memory_size,
    import_tensorrt,
)
from .profiles import Limits, clips_per_run


def _runs(index: np.ndarray) -> list[tuple[int, int, int]]:
    """(dst_row, src_row, rows) runs of consecutive rows: fewer device copies."""
    runs: list[tuple[int, int, int]] = []
    for dst, src in enumerate(int(i) for i in index):
        if runs and runs[-1][1] + runs[-1][2] == src and runs[-1][0] + runs[-1][2] == dst:
            d, s, n = runs[-1]
            runs[-1] = (d, s, n + 1)
        else:
            runs.append((dst, src, 1))
    return runs


class TrtFlamingo(RowsCrossKV):
    """An export folder + its TensorRT engines: a runtime.contracts.Engine."""

    def __init__(
        self,
        export_dir: str | Path,
        *,
        device: Device | None = None,
        executors: dict[str, Executor] | None = None,
        verify_hashes: bool = True,
        strict_device: bool = True,
    ) -> None:
        """Real use: no device/executors (TensorRT and cuda-python are imported, engines.json
        checked against this GPU). Tests pass stand-ins (tests/trt/stand_in.py)."""
        if executors is None:  # a missing TensorRT first, in build's words, before engines.json
            import_tensorrt()
        self.root = Path(export_dir)
        self.manifest: Manifest = load_manifest(self.root, verify_hashes=verify_hashes)
        self.engines = load_engines_manifest(self.root, verify_hashes=verify_hashes)
        check_against_export(self.engines, self.manifest, self.root)
        self.dims = ModelDims.from_config(self.manifest.model)
        self.limits = self.engines.limits
        self.vision_spec = self.manifest.graphs["vision"].spec
        self.decoder_spec = self.manifest.graphs["decoder"].spec
        tokens = self.manifest.special_tokens
        self.media_token_id: int = tokens["media_token_id"]
        self.eoc_token_id: int = tokens["eoc_token_id"]
        self.pad_token_id: int = tokens["pad_token_id"]
        self._trt_objects: list[Any] = []
        if executors is None:
            device, executors = self._load_tensorrt(strict_device)
        assert device is not None
        self.device = device
        self.executors = executors
        self.float_dtype = executors["decoder"].tensor_dtype(present_names(0)[0])
        self._active: TrtStepModel | None = None
        self._allocate()

    def _load_tensorrt(self, strict_device: bool) -> tuple[Device, dict[str, Executor]]:
        trt = import_tensorrt()
        device = CudaDevice()
        check_against_device(self.engines, trt.__version__, device.info(), strict_device)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engines = {}
        for name, entry in self.engines.engines.items():
            path = safe_join(self.root, entry.file)
            # A read-only map instead of f.read(): on Jetson (one DRAM for CPU and GPU) the
            # pages are file-backed and reclaimable, not a second anonymous copy of the weights.
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                engine = runtime.deserialize_cuda_engine(m)
            if engine is None:
                raise EngineMismatchError(f"{path}: TensorRT could not deserialize the engine")
            engines[name] = engine
        # vision and decoder never run at the same time: one activation block serves both
        memory = device.alloc(max(device_memory_size(e) for e in engines.values()))
        executors = {n: TrtExecutor(trt, e, device, memory) for n, e in engines.items()}
        self._trt_objects = [logger, runtime, engines]
        return device, executors

    def _allocate(self) -> None:
        """All step buffers once, at the engines' limits (nothing allocated per step)."""
        d, lim, dev = self.dims, self.limits, self.device
        b, s, imgs = lim["max_batch"], lim["max_seq_len"], lim["max_images"]
        dec = self.executors["decoder"]
        kv_item = dec.tensor_dtype(past_names(0)[0]).itemsize
        kv_bytes = b * d.num_kv_heads * s * d.head_dim * kv_item
        self.kv = {n: PingPong(dev, kv_bytes) for i in range(d.num_layers) for n in past_names(i)}
        x_names = [n for j in d.xattn_layers for n in cross_attn_names(j)]
        x_item = dec.tensor_dtype(x_names[0]).itemsize if x_names else 4
        x_bytes = b * d.xattn_heads * imgs * d.num_latents * d.xattn_dim_head * x_item
        self.cross = {n: PingPong(dev, x_bytes) for n in x_names}
        # each row's current image's K/V, what decode steps bind (runtime.decoding)
        local_bytes = b * d.xattn_heads * d.num_latents * d.xattn_dim_head * x_item
        self.cross_local = {n: dev.alloc(local_bytes) for n in x_names}
        self.int_inputs = {
            t.name: dev.alloc(b * s * 8)
            for t in self.decoder_spec.inputs
            if t.dtype == "int64"  # ids, mask, positions, media index (8 bytes covers int32)
        }
        self.logits_capacity = 0
        self.logits_ptr = 0
        vis = self.executors["vision"]
        # a run holds at most max_images one-frame images or clips_per_run clips (profiles)
        self.clips_per_run = clips_per_run(Limits(**lim))
        frames = max(imgs, self.clips_per_run * lim["max_frames"])
        self.vision_in = dev.alloc(
            int(np.prod((frames, 3, d.image_size, d.image_size)))
            * vis.tensor_dtype("pixel_values").itemsize
        )
        self.vision_out: dict[str, int] = {}
        for t in self.vision_spec.outputs:
            per_image = int(np.prod([x for x in t.shape if isinstance(x, int)]))
            item = vis.tensor_dtype(t.name).itemsize
            self.vision_out[t.name] = dev.alloc(imgs * per_image * item)

    def performance_notes(self) -> list[str]:
        """Nothing known to run badly: the engines were built for this GPU."""
        return []

    def logits_buffer(self, nbytes: int) -> int:
        """Grow-only (the prefill logits are the largest; decode reuses the buffer)."""
        if nbytes > self.logits_capacity:
            if self.logits_ptr:
                self.device.free(self.logits_ptr)
            self.logits_ptr = self.device.alloc(nbytes)
            self.logits_capacity = nbytes
        return self.logits_ptr

    def encode_images(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 3, S, S) images or (N, F, 3, S, S) media items of F frames -> {image_latents,
        cross_attn.{j}.key|value} on the host (once per prompt, not per step: the pipeline
        arranges them per row). One-frame items run under the "images" profile, up to
        max_images per run; clips under "clips", `clips_per_run` per run."""
        pixels = pixel_values[:, None] if pixel_values.ndim == 4 else pixel_values
        n, frames = pixels.shape[:2]
        if not 1 <= frames <= self.limits["max_frames"]:
            raise ValueError(
                f"{frames} frames per media item: the vision engine was built for "
                f"1..{self.limits['max_frames']} (max_frames)"
            )
        vis, dev = self.executors["vision"], self.device
        if frames == 1:
            profile, per_run = 0, self.limits["max_images"]
        else:
            profile, per_run = 1, self.clips_per_run
        vis.set_profile(profile)
        pixels = np.ascontiguousarray(pixels, dtype=vis.tensor_dtype("pixel_values"))
        outs = {}
        for t in self.vision_spec.outputs:
            shape = tuple(n if isinstance(x, str) else x for x in t.shape)
            outs[t.name] = np.empty(shape, dtype=vis.tensor_dtype(t.name))
        for start in range(0, n, per_run):
            part = pixels[start : start + per_run]
            dev.upload(self.vision_in, part)
            vis.set_input_shape("pixel_values", part.shape)
            vis.set_address("pixel_values", self.vision_in)
            for name in outs:
                vis.set_address(name, self.vision_out[name])
            vis.execute()
            for name, out in outs.items():
                dev.download(out[start : start + len(part)], self.vision_out[name])
            dev.synchronize()
        return outs

    def step_model(
        self,
        cross_kv: dict[str, np.ndarray],
        num_images: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        media_count: np.ndarray | None = None,
        io_binding: bool = True,
    ) -> TrtStepModel:
        """Engine.step_model: `past` (a cached prefix, host arrays) is uploaded once;
        `io_binding` is accepted and ignored (the KV cache is always device-resident here)."""
        model = TrtStepModel(self, cross_kv, num_images, past, media_count)
        self._active = model
        return model


@dataclass(frozen=True)
class _Piece:
    profile: int
    tokens: int


class TrtStepModel(BaseStepModel):
    """DecoderStepModel over the decoder engine; the KV cache never leaves the device.

    Uses the buffers of its TrtFlamingo: creating a new step model ends the previous one.
    A step's new tokens run as one engine call when a profile covers them (prefill: past 0;
    extend: a short chunk after a cached prefix; decode: one token), else as several chunks.
    """

    def __init__(
        self,
        engine: TrtFlamingo,
        cross_kv: dict[str, np.ndarray],
        num_images: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        media_count: np.ndarray | None = None,
    ) -> None:
        super().__init__(
            engine.media_token_id, num_images, media_count, media_reset_token(engine.manifest.model)
        )
        self.engine = engine
        self.dec = engine.executors["decoder"]
        self.dev = engine.device
        dims = engine.dims
        self.dims = dims
        self._check_batch(self.batch)
        entry = engine.engines.engines["decoder"]
        self.max_seq_len = engine.limits["max_seq_len"]
        self.prefill = entry.profile_index("prefill")
        self.decode = entry.profile_index("decode")
        names = [p["name"] for p in entry.profiles]
        if "extend" in names:
            self.extend: int | None = entry.profile_index("extend")
            self.extend_tokens = entry.dim_range("extend", "sequence")[2]
            self.extend_past = entry.dim_range("extend", "past_sequence")[2]
        else:
            self.extend, self.extend_tokens, self.extend_past = None, 0, 0
        first = next(iter(cross_kv.values()))
        self.media_keys = first.shape[2]
        most = engine.limits["max_images"] * dims.num_latents
        if self.media_keys > most:
            raise ValueError(
                f"{self.media_keys // dims.num_latents} images per row exceed the engines' "
                f"max_images {engine.limits['max_images']}"
            )
        for name, value in cross_kv.items():
            engine.cross[name].index = 0
            array = np.ascontiguousarray(value, dtype=self.dec.tensor_dtype(name))
            self.dev.upload(engine.cross[name].current, array)
        self._local_offsets: tuple[int, ...] | None = None  # rows in engine.cross_local
        self.past_len = 0
        for buf in engine.kv.values():
            buf.index = 0
        if past is not None:
            self._upload_past(past)

    def _upload_past(self, past: dict[str, np.ndarray]) -> None:
        length = int(next(iter(past.values())).shape[2])
        if length >= self.max_seq_len:
            raise ValueError(
                f"a cached past of {length} tokens leaves no room in max_seq_len {self.max_seq_len}"
            )
        for name, buf in self.engine.kv.items():
            value = past[name]
            if value.shape[0] != self.batch or value.shape[2] != length:
                raise ValueError(f"past {name!r} has shape {value.shape}")
            self.dev.upload(buf.current, np.ascontiguousarray(value, self.dec.tensor_dtype(name)))
        self.dev.synchronize()
        self.past_len = length

    # ------------------------------------------------------------------ checks

    def _check_batch(self, batch: int) -> None:
        most = self.engine.limits["max_batch"]
        if batch > most:
            raise ValueError(
                f"batch {batch} exceeds the engines' max_batch {most}; rebuild with "
                f"`flamingo-export build --max-batch {batch}` (beam search needs one row per beam)"
            )

    def _check_active(self) -> None:
        if self.engine._active is not self:
            raise RuntimeError("a newer step model of this engine owns the device buffers")

    # ------------------------------------------------------------------ state

    @property
    def past_length(self) -> int:
        return self.past_len

    def past_arrays(self) -> dict[str, np.ndarray]:
        """The KV cache copied to the host (for prefix-cache snapshots; not used per step)."""
        self._check_active()
        d = self.dims
        out = {}
        for name, buf in self.engine.kv.items():
            shape = (self.batch, d.num_kv_heads, self.past_len, d.head_dim)
            out[name] = np.empty(shape, dtype=self.dec.tensor_dtype(name))
            self.dev.download(out[name], buf.current)
        self.dev.synchronize()
        return out

    # ------------------------------------------------------------------ running

    def _pieces(self, past: int, new: int) -> list[_Piece]:
        """How `new` tokens after `past` cached ones split over the engine's profiles."""
        pieces = []
        while new > 0:
            if past == 0:
                n, profile = new, self.prefill
            elif new == 1 or self.extend is None or past > self.extend_past:
                n, profile = 1, self.decode
            else:
                n, profile = min(new, self.extend_tokens), self.extend
            pieces.append(_Piece(profile, n))
            past, new = past + n, new - n
        return pieces

    def _bind_int(self, name: str, values: np.ndarray) -> None:
        dtype = self.dec.tensor_dtype(name)  # int32 on TensorRT < 9 (INT64 bound as INT32)
        array = np.ascontiguousarray(values, dtype=dtype)
        ptr = self.engine.int_inputs[name]
        self.dev.upload(ptr, array)
        self.dec.set_input_shape(name, array.shape)
        self.dec.set_address(name, ptr)

    def _run_piece(
        self, profile: int, ids: np.ndarray, mask: np.ndarray, all_positions: bool
    ) -> tuple[int, int]:
        """One engine call for ids (B, T) after past_len cached tokens; (logits ptr, number of
        logit positions: T, or 1 = the last unless all_positions)."""
        dims, dec = self.dims, self.dec
        b, t = ids.shape
        past = self.past_len
        dec.set_profile(profile)
        self._bind_int("input_ids", ids)
        self._bind_int("attention_mask", mask)
        if dims.uses_position_ids:
            self._bind_int("position_ids", position_ids(mask.astype(np.int64), t))
        media = self.media(ids.astype(np.int64))
        local = self._current_image(media)
        self._bind_int("media_index", media if local is None else (media > 0).astype(np.int64))
        keep = logits_index(t, all_positions)
        self._bind_int("logits_index", keep)
        keys = self.media_keys if local is None else dims.num_latents
        for name, buf in self.engine.cross.items():
            dec.set_input_shape(name, (b, dims.xattn_heads, keys, dims.xattn_dim_head))
            dec.set_address(name, buf.current if local is None else local[name])
        for i in range(dims.num_layers):
            for past_name, present_name in zip(past_names(i), present_names(i)):
                buf = self.engine.kv[past_name]
                dec.set_input_shape(past_name, (b, dims.num_kv_heads, past, dims.head_dim))
                dec.set_address(past_name, buf.current)
                dec.set_address(present_name, buf.spare)  # becomes the next piece's past
        item = dec.tensor_dtype("logits").itemsize
        logits_ptr = self.engine.logits_buffer(b * len(keep) * dims.vocab_size * item)
        dec.set_address("logits", logits_ptr)
        dec.execute()
        for buf in self.engine.kv.values():
            buf.flip()
        self.past_len = past + t
        return logits_ptr, len(keep)

    def _current_image(self, media: np.ndarray) -> dict[str, int] | None:
        """Device buffers holding each row's current image's K/V where every new token of a
        row attends to it (`current_image_offsets`), copied from the rows' K/V when a row's
        image changes; None: bind all images' K/V."""
        dims = self.dims
        offsets = current_image_offsets(media, self.media_keys, dims.num_latents)
        if offsets is None:
            return None
        current = tuple(int(o) for o in offsets)
        if self._local_offsets != current:
            dh, heads = dims.xattn_dim_head, dims.xattn_heads
            for name, buf in self.engine.cross.items():
                item = self.dec.tensor_dtype(name).itemsize
                block = dims.num_latents * dh * item  # one head's keys of one image
                for b, first in enumerate(current):
                    for h in range(b * heads, (b + 1) * heads):  # (row, head) pairs
                        src = buf.current + (h * self.media_keys + first) * dh * item
                        self.dev.copy(self.engine.cross_local[name] + h * block, src, block)
            self._local_offsets = current
        return self.engine.cross_local

    def _forward(self, ids: np.ndarray, mask: np.ndarray, all_positions: bool) -> np.ndarray:
        """Run ids (B, T) whose mask covers past + T; float32 logits of the last position
        (B, 1, V) or of every new position (B, T, V). Advances the device KV cache."""
        self._check_active()
        b, t = ids.shape
        if b != self.batch:
            raise ValueError(f"batch {b} != the cache's batch {self.batch}")
        if mask.shape != (b, self.past_len + t):
            raise ValueError(
                f"attention_mask {mask.shape} must be (batch, past {self.past_len} + new {t})"
            )
        if self.past_len + t > self.max_seq_len:
            raise ValueError(
                f"{self.past_len + t} tokens exceed the engines' max_seq_len {self.max_seq_len} "
                "(rebuild with a larger --max-seq-len, up to the export's limit)"
            )
        logits_dtype = self.dec.tensor_dtype("logits")
        vocab, item = self.dims.vocab_size, logits_dtype.itemsize
        chunks = []
        done = 0
        for piece in self._pieces(self.past_len, t):
            end = self.past_len + piece.tokens
            ptr, n = self._run_piece(
                piece.profile, ids[:, done : done + piece.tokens], mask[:, :end], all_positions
            )
            done += piece.tokens
            if all_positions:
                out = np.empty((b, n, vocab), dtype=logits_dtype)
                self.dev.download(out, ptr)
                self.dev.synchronize()  # the next piece reuses the logits buffer
                chunks.append(out)
        if all_positions:
            return np.concatenate(chunks, axis=1).astype(np.float32)
        last = np.empty((b, 1, vocab), dtype=logits_dtype)
        row = vocab * item
        self.dev.download_rows(last, ptr + (n - 1) * row, n * row, row, b)
        self.dev.synchronize()
        return last.astype(np.float32)

    def _reorder(self, index: np.ndarray) -> None:
        """new_row[i] = row[index[i]] for the KV and cross-attention buffers, on the device."""
        self._check_active()
        self._check_batch(len(index))
        dims, runs = self.dims, _runs(index)
        groups = (
            (self.engine.kv, dims.num_kv_heads * self.past_len * dims.head_dim),
            (self.engine.cross, dims.xattn_heads * self.media_keys * dims.xattn_dim_head),
        )
        for buffers, row_elems in groups:
            for name, buf in buffers.items():
                row = row_elems * self.dec.tensor_dtype(name).itemsize
                if row:
                    for dst, src, n in runs:
                        self.dev.copy(buf.spare + dst * row, buf.current + src * row, n * row)
                buf.flip()
        self.dev.synchronize()
        self._local_offsets = None  # rows moved: the current-image K/V are copied again
