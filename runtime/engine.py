"""onnxruntime execution of an export folder: vision graph, decoder graph, step model (no torch).

`OnnxFlamingo` loads and checks an export (manifest, sha256, graph I/O against the spec), runs
the vision graph on preprocessed pixels and hands out `OrtStepModel`s that the shared search in
runtime.generation drives.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .contracts import Session, SessionFactory
from .decoding import (
    BaseStepModel,
    RowsCrossKV,
    current_image_kv,
    current_image_offsets,
    in_graph_media_index,
    logits_index,
    media_reset_token,
    position_ids,
)
from .errors import FlamingoExportError
from .manifest import Manifest, ManifestError, load_manifest
from .spec import DecoderFormError, GraphSpec, ModelDims, past_names

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
# Intra-op threads accepted (0 / None: onnxruntime's default, all cores). More cores than any
# edge device has; onnxruntime does not bound it itself (100,000 threads hang session creation).
MAX_THREADS = 256


class SessionOptionsError(FlamingoExportError, ValueError):
    """An onnxruntime setting out of range (threads, providers)."""


def check_providers(providers: object) -> None:
    """A sequence of provider names (a single name would be read as its characters)."""
    ok = not isinstance(providers, (str, bytes))
    if ok:
        try:
            ok = all(isinstance(p, str) for p in providers)  # type: ignore[attr-defined]
        except TypeError:
            ok = False
    if not ok:
        raise SessionOptionsError(
            f"providers must be a list of execution provider names, got {providers!r}; wrap a "
            "single name in a list"
        )


def check_threads(threads: object) -> None:
    """None, or an int in [0, MAX_THREADS] (0 = onnxruntime's default)."""
    ok = isinstance(threads, int) and not isinstance(threads, bool) and 0 <= threads <= MAX_THREADS
    if threads is not None and not ok:
        raise SessionOptionsError(
            f"threads must be an int in [0, {MAX_THREADS}] (0 = onnxruntime's default), "
            f"got {threads!r}"
        )


# Graphs whose idle intra-op workers must not spin: the vision graph runs once per query and is
# followed at once by the decoder, whose own workers would compete with the vision pool's
# spinning ones for the cores. The decoder keeps spinning: its steps run back to back
# (docs/measurements.md).
NO_SPIN_GRAPHS = frozenset({"vision"})


# An int8 W8A8 decoder (Q/DQ on activations) is the form TensorRT builds into int8 GEMMs;
# onnxruntime's CPU EP fuses only the MatMuls whose output is re-quantized and runs the rest as
# DequantizeLinear + float MatMul, dequantizing every weight at every step, so it decodes slower
# than fp32 there, weight-only int8 faster (docs/measurements.md).
_W8A8_NOTE = (
    "the decoder is int8 W8A8 (quantize --int8-mode w8a8), {made}: onnxruntime's CPU EP runs "
    "it slower than fp32 (decode ~5.7x on the bench model); on CPU quantize with "
    "--int8-mode weight-only or --precision int4"
)
W8A8_ON_CPU = _W8A8_NOTE.format(made="made for TensorRT")


def slow_on_cpu(manifest: Manifest) -> list[str]:
    """Why this export's graphs run badly on onnxruntime's CPU EP (empty: nothing known)."""
    decoder = manifest.quantization.get("decoder")
    is_w8a8 = isinstance(decoder, dict) and decoder.get("mode") == "w8a8"
    entry = manifest.graphs["decoder"]
    if not (is_w8a8 and entry.precision == "int8"):
        return []
    if entry.form.portable:
        return [W8A8_ON_CPU]
    # W8A8 pays off only in TensorRT, which this form does not run on (runtime.spec.DecoderForm)
    form = ",".join(entry.form.to_dict().values())
    return [_W8A8_NOTE.format(made=f"in decoder form {form}, which TensorRT does not run")]


class ProviderError(SessionOptionsError):
    """An execution provider that this onnxruntime build does not have."""


def make_session(
    path: Path,
    providers: Sequence[str],
    threads: int | None,
    spin: bool = True,
    optimize: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime session; `optimize=False` runs the graph as written (no fusions)."""
    check_threads(threads)
    check_providers(providers)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    available = set(ort.get_available_providers())
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ProviderError(
            f"execution provider(s) {unknown} not available in this onnxruntime "
            f"(available: {sorted(available)})"
        )
    return ort.InferenceSession(str(path), options, providers=list(providers))


def ort_session_factory(
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    threads: int | None = None,
    optimize: bool = True,
    spin: bool = True,
) -> SessionFactory:
    """OnnxFlamingo's default sessions: `make_session` per graph, the vision graph's idle
    workers not spinning (NO_SPIN_GRAPHS); `spin=False`: no graph's (on a machine whose cores
    other processes share, a spinning worker burns the time slices the step needs)."""

    def make(name: str, path: Path) -> ort.InferenceSession:
        spin_here = spin and name not in NO_SPIN_GRAPHS
        return make_session(path, providers, threads, spin=spin_here, optimize=optimize)

    return make


# numpy dtype name (runtime.spec) -> onnxruntime's NodeArg.type
ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "float64": "tensor(double)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "int8": "tensor(int8)",
    "uint8": "tensor(uint8)",
    "bool": "tensor(bool)",
}


def check_session_io(session: Session, spec: GraphSpec, where: str) -> None:
    """The graph must expose exactly the inputs/outputs the manifest's spec declares, with
    its dtypes and fixed dimensions (checked where the session reports them: onnxruntime's
    NodeArgs do), so a mismatch is caught at load, not at the first run."""
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != spec.input_names or got_out != spec.output_names:
        missing = [n for n in spec.input_names + spec.output_names if n not in got_in + got_out]
        extra = [n for n in got_in + got_out if n not in spec.input_names + spec.output_names]
        raise ManifestError(
            f"{where}: graph I/O does not match the manifest spec "
            f"(missing {missing[:4]}, unexpected {extra[:4]})"
        )
    args = [*session.get_inputs(), *session.get_outputs()]
    for arg, declared in zip(args, (*spec.inputs, *spec.outputs)):
        kind = getattr(arg, "type", None)
        if isinstance(kind, str) and kind != ORT_TYPES.get(declared.dtype, kind):
            raise ManifestError(
                f"{where}: {declared.name} is {kind} in the graph, the manifest says "
                f"{declared.dtype}"
            )
        shape = getattr(arg, "shape", None)
        if not isinstance(shape, (list, tuple)):
            continue
        fixed = [d if isinstance(d, int) else None for d in declared.shape]
        actual = [d if isinstance(d, int) else None for d in shape]
        if len(actual) != len(fixed) or any(
            a is not None and f is not None and a != f for a, f in zip(actual, fixed)
        ):
            raise ManifestError(
                f"{where}: {declared.name} has shape {list(shape)} in the graph, the manifest "
                f"says {list(declared.shape)}"
            )


def open_session(make: SessionFactory, name: str, path: Path) -> Session:
    """`make(name, path)`, with a graph that onnxruntime (or the factory) cannot load
    reported as a ManifestError naming the file."""
    try:
        return make(name, path)
    except FlamingoExportError:
        raise
    except Exception as e:  # onnxruntime's pybind errors derive from Exception only
        detail = " ".join(str(e).split())[:300]
        raise ManifestError(
            f"{path}: not a loadable ONNX model ({type(e).__name__}: {detail})"
        ) from e


class OnnxFlamingo(RowsCrossKV):
    """An export folder ready to run (runtime.contracts.Engine): sessions, dims, special
    tokens."""

    def __init__(
        self,
        export_dir: str | Path,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        threads: int | None = None,
        verify_hashes: bool = True,
        *,
        session_factory: SessionFactory | None = None,
        spin: bool = True,
    ) -> None:
        """`session_factory(graph name, ONNX path)` makes each graph's session instead of
        onnxruntime with `providers` and `threads` (e.g. an unoptimized or reference executor,
        a recording wrapper); its sessions are checked against the spec like the default's.
        `spin=False`: the decoder's idle workers do not spin either (`ort_session_factory`)."""
        self.root = Path(export_dir)
        self.manifest: Manifest = load_manifest(self.root, verify_hashes=verify_hashes)
        self.dims = ModelDims.from_config(self.manifest.model)
        check_providers(providers)
        self.providers = tuple(providers)
        make = session_factory or ort_session_factory(providers, threads, spin=spin)
        self.sessions: dict[str, Session] = {}
        for name, entry in self.manifest.graphs.items():
            path = self.manifest.path(self.root, entry.file)
            session = open_session(make, name, path)
            check_session_io(session, entry.spec, str(path))
            self.sessions[name] = session
        self.vision_spec = self.manifest.graphs["vision"].spec
        self.decoder_spec = self.manifest.graphs["decoder"].spec
        self.float_dtype = np.dtype(self.decoder_spec.outputs[1].dtype)
        tokens = self.manifest.special_tokens
        self.media_token_id: int = tokens["media_token_id"]
        self.eoc_token_id: int = tokens["eoc_token_id"]
        self.pad_token_id: int = tokens["pad_token_id"]
        self.media_reset_token_id = media_reset_token(self.manifest.model)

    @property
    def limits(self) -> dict[str, int]:
        """The export's max_images, max_seq_len and max_frames."""
        return self.manifest.limits

    def performance_notes(self) -> list[str]:
        """Why this export runs badly here: `slow_on_cpu` where the CPU EP runs the graphs."""
        on_cpu = not self.providers or self.providers[0] == "CPUExecutionProvider"
        return slow_on_cpu(self.manifest) if on_cpu else []

    def encode_images(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 3, S, S) images or (N, F, 3, S, S) media items of F frames (clips) ->
        {image_latents, cross_attn.{j}.key|value}, one entry per item."""
        pixels = pixel_values[:, None] if pixel_values.ndim == 4 else pixel_values
        frames, most = pixels.shape[1], self.limits["max_frames"]
        if not 1 <= frames <= most:
            raise ValueError(
                f"{frames} frames per media item: this export takes 1..{most} (max_frames)"
            )
        dtype = np.dtype(self.vision_spec.inputs[0].dtype)
        outputs = self.sessions["vision"].run(
            None, {"pixel_values": np.ascontiguousarray(pixels, dtype=dtype)}
        )
        return dict(zip(self.vision_spec.output_names, outputs))

    def step_model(
        self,
        cross_kv: dict[str, np.ndarray],
        num_images: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        media_count: np.ndarray | None = None,
        io_binding: bool = True,
    ) -> OrtStepModel:
        """A step model over the decoder: `OrtInplaceStepModel` for the in-place KV form."""
        inplace = self.manifest.graphs["decoder"].form.kv_cache == "inplace"
        cls = OrtInplaceStepModel if inplace else OrtStepModel
        return cls(self, cross_kv, num_images, past, media_count, io_binding)


Past = dict[str, Any]  # name -> np.ndarray or ort.OrtValue (IOBinding outputs)


class OrtStepModel(BaseStepModel):
    """StepModel over the decoder graph; owns the self-attention KV cache between steps.

    It may start from a cached state (`past` of length S, `media_count` images already seen):
    `step` then runs only the tokens the attention mask says are new (BaseStepModel). With
    IOBinding (default where available) each step's `present.*` OrtValues are bound as the next
    step's `past_key_values.*` inputs and never copied through numpy; the graph's Concat still
    builds present = past + new inside onnxruntime. `io_binding=False` (or an onnxruntime
    without it) uses plain `session.run` with numpy arrays; both paths run the same kernels on
    the same values, so their outputs are identical.
    """

    def __init__(
        self,
        engine: OnnxFlamingo,
        cross_kv: dict[str, np.ndarray],
        num_images: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        media_count: np.ndarray | None = None,
        io_binding: bool = True,
    ) -> None:
        super().__init__(
            engine.media_token_id, num_images, media_count, engine.media_reset_token_id
        )
        self.engine = engine
        self.session = engine.sessions["decoder"]
        self.cross_kv = cross_kv
        dims = engine.dims
        self.past_names = [n for i in range(dims.num_layers) for n in past_names(i)]
        if past is None:
            shape = (self.batch, dims.num_kv_heads, 0, dims.head_dim)
            empty = np.zeros(shape, dtype=engine.float_dtype)
            past = {n: empty for n in self.past_names}
        self._past: Past = {n: past[n] for n in self.past_names}
        self.uses_position_ids = dims.uses_position_ids
        # row of `cross_kv` each current row attends with: beams share their prompt's images, so
        # a reorder moves this map; the K/V rows are gathered only when a step needs all of them
        self._cross_rows = np.arange(self.batch)
        self._binding = None
        if io_binding and hasattr(self.session, "io_binding"):
            try:
                self._binding = self.session.io_binding()
            except Exception:  # an onnxruntime build without IOBinding: plain session.run
                self._binding = None
        self._bound_cross: dict[str, np.ndarray] | None = None
        self._feed_buffers: dict[str, tuple[np.ndarray, Any]] = {}  # name -> (bound array, _)
        self._checked: tuple | None = None  # the last decode step's in-graph check (its key)
        self._cross_memo: tuple | None = None  # the last _cross_for answer (its key)
        self._steady: tuple | None = None  # a decode step's media state, while it holds
        # decode steps attend to each row's current image only (runtime.decoding)
        self.current_image_only = True
        self._local: tuple[dict, tuple, dict[str, np.ndarray]] | None = None  # current image's
        self._output_names = engine.decoder_spec.output_names
        form = engine.manifest.graphs["decoder"].form
        self.in_graph_indices = form.indices == "in-graph"

    @property
    def uses_io_binding(self) -> bool:
        return self._binding is not None

    @property
    def past_length(self) -> int:
        v = self._past[self.past_names[0]]
        return int(v.shape()[2] if isinstance(v, ort.OrtValue) else v.shape[2])

    @property
    def past(self) -> dict[str, np.ndarray]:
        """The KV cache as numpy arrays (views of onnxruntime's buffers: read, don't keep)."""
        return {k: v.numpy() if isinstance(v, ort.OrtValue) else v for k, v in self._past.items()}

    def past_arrays(self) -> dict[str, np.ndarray]:
        """An owned copy of the KV cache (for snapshots that outlive this model)."""
        return {k: np.array(v, copy=True) for k, v in self.past.items()}

    def _forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, all_positions: bool
    ) -> np.ndarray:
        """Run new tokens; returns logits (N, T, V), or (N, 1, V) of the last position unless
        `all_positions`; a view valid until the next call."""
        t = input_ids.shape[1]
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_position_ids:
            feed["position_ids"] = position_ids(attention_mask, t)
        held = self._steady
        if (
            held is not None
            and t == 1
            and held[0] is self.cross_kv
            and held[1] is self._cross_rows
            and held[2] == self.current_image_only
            and not (input_ids == self.engine.media_token_id).any()
        ):
            media, cross = held[3], held[4]  # the media state the last step left, unchanged
        else:
            media, cross = self._cross_for(self.media(input_ids))
            if self.in_graph_indices:
                cross = self._check_in_graph(input_ids, attention_mask, media, cross)
            # after a one-token step past a prefill, a next token that is not an <image> leaves
            # the media state as it is (OpenFlamingo's count; IDEFICS' frozen index)
            steady = t == 1 and attention_mask.shape[1] > 1 and self.media.steady
            state = (self.cross_kv, self._cross_rows, self.current_image_only, media, cross)
            self._steady = state if steady else None
        if not self.in_graph_indices:
            feed["media_index"] = media
            feed["logits_index"] = logits_index(t, all_positions)
        return self._run(feed, cross)

    def _bind_inputs(self, feed: dict[str, np.ndarray], cross: dict[str, np.ndarray]) -> Any:
        """Bind this step's feeds, and the cross K/V where they changed; the IOBinding.

        Each feed is copied into a buffer of ours that stays bound while its shape holds (a
        decode step's (N, 1) ids, positions and media index, its logits index), so a step
        rebinds only what changed shape (the attention mask, one column longer)."""
        binding = self._binding
        buffers = self._feed_buffers
        for name, value in feed.items():
            held = buffers.get(name)
            if held is not None and held[0].shape == value.shape and held[0].dtype == value.dtype:
                np.copyto(held[0], value)
                continue
            array = np.array(value, order="C")  # a copy: the caller may reuse its array
            binding.bind_cpu_input(name, array)  # bound over `array` (kept alive here)
            buffers[name] = (array, None)
        if self._bound_cross is not cross:
            for name, value in cross.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            self._bound_cross = cross
        return binding

    def _run(self, feed: dict[str, np.ndarray], cross: dict[str, np.ndarray]) -> np.ndarray:
        """One decoder run over `feed` and `cross`; the presents become the cache."""
        if self._binding is None:
            feed.update(cross)
            feed.update(self.past)
            logits, *presents = self.session.run(None, feed)
            self._past = dict(zip(self.past_names, presents))
            return logits
        binding = self._bind_inputs(feed, cross)
        for name, value in self._past.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        # fresh outputs every step: the previous presents are this step's (bound) inputs
        binding.clear_binding_outputs()
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        self._past = dict(zip(self.past_names, presents))
        return logits.numpy()

    def _check_in_graph(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        media: np.ndarray,
        cross: dict[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """The cross K/V to feed a decoder with in-graph indices, checked to make the graph
        compute `media` (runtime.decoding.in_graph_media_index); rows that have seen no image
        get K/V of no keys (the graph then computes index 0). Raises DecoderFormError where
        the in-graph rule gives other indices. (Its logits are every new position's.)"""
        t = input_ids.shape[1]
        past = attention_mask.shape[1] - t
        # a decode step after a prefill: the rule gives every row `images` whatever the token
        # (before = images - is_media, count = is_media), so the check depends on (cross, media)
        # alone and holds for as long as they do
        key = (media.shape, media.tobytes()) if t == 1 and past > 0 else None
        done = self._checked
        if key is not None and done is not None and done[0] is cross and done[1] == key:
            return done[2]
        fed = cross
        if not media.any():
            cross = {k: v[:, :, :0] for k, v in cross.items()}
        keys = next(iter(cross.values())).shape[2] if cross else 0
        images = keys // self.engine.dims.num_latents
        expected = in_graph_media_index(input_ids, past, images, self.engine.media_token_id)
        if not np.array_equal(expected, media):
            raise DecoderFormError(
                "this export's decoder computes media indices in the graph (OpenFlamingo's "
                "rule: each token attends to the latest <image> before it, generated tokens to "
                "the last one), which cannot express this batch (rows with different image "
                "counts, or a row without images beside rows with them); run it with an export "
                "in the portable decoder form"
            )
        if key is not None:
            self._checked = (fed, key, cross)
        return cross

    def _cross_for(self, media: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(media_index, cross K/V) to feed: each row's current image's keys alone where every
        new token of a row attends to it (`current_image_offsets`), stacked once per image
        change; all images' keys otherwise."""
        # decode steps repeat one media index: the answer holds while media, rows and K/V do
        memo = self._cross_memo
        if memo is not None and memo[0] is self.cross_kv and memo[1] == self._memo_key(media):
            return memo[2]
        found = self._cross_for_uncached(media)
        # keyed by the state after the call: it may have gathered the K/V rows and reset the
        # row map, and a later reorder must not meet the pre-gather key
        self._cross_memo = (self.cross_kv, self._memo_key(media), found)
        return found

    def _memo_key(self, media: np.ndarray) -> tuple:
        rows = self._cross_rows
        return (self.current_image_only, media.shape, media.tobytes(), rows.tobytes())

    def _cross_for_uncached(self, media: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        keys = next(iter(self.cross_kv.values())).shape[2] if self.cross_kv else 0
        offsets = current_image_offsets(media, keys, self.engine.dims.num_latents)
        rows = self._cross_rows
        if not self.current_image_only or offsets is None:
            stored = next(iter(self.cross_kv.values())).shape[0] if self.cross_kv else len(rows)
            if not np.array_equal(rows, np.arange(stored)):  # rows moved: gather them now
                self.cross_kv = {k: v[rows] for k, v in self.cross_kv.items()}
                self._cross_rows = np.arange(len(rows))
            return media, self.cross_kv
        current = (tuple(int(o) for o in offsets), tuple(int(r) for r in rows))
        if self._local is None or self._local[0] is not self.cross_kv or self._local[1] != current:
            local = current_image_kv(
                self.cross_kv, current[0], self.engine.dims.num_latents, rows=current[1]
            )
            self._local = (self.cross_kv, current, local)
        return (media > 0).astype(np.int64), self._local[2]

    def _reorder(self, index: np.ndarray) -> None:
        self._past = {k: np.ascontiguousarray(v[index]) for k, v in self.past.items()}
        self._cross_rows = self._cross_rows[index]


class OrtInplaceStepModel(OrtStepModel):
    """StepModel over a decoder in the in-place KV form (runtime.spec.DecoderForm
    kv_cache="inplace"): each layer's K and V live in one preallocated (batch, kv_heads,
    capacity, head_dim) buffer bound as both `past_key_values.{i}.*` and `present.{i}.*`, so
    GroupQueryAttention writes the new positions in place and no step copies the cache. The
    capacity grows by doubling (one copy) when a step would pass it. Without IOBinding the
    buffers go through `session.run` (same kernels, the presents are new buffers).
    """

    GROWTH = 256  # capacity granularity in positions

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._logits: np.ndarray | None = None  # the bound logits buffer (IOBinding)
        self._logits_dtype = np.dtype(self.engine.decoder_spec.outputs[0].dtype)
        start = self.past  # (B, kv_heads, S, Dh) arrays: the given cache or empty
        self._length = next(iter(start.values())).shape[2]
        self._buffers: dict[str, np.ndarray] = {}
        self._grow(self._length + 1)
        for name, value in start.items():
            self._buffers[name][:, :, : self._length] = value

    @property
    def capacity(self) -> int:
        return next(iter(self._buffers.values())).shape[2] if self._buffers else 0

    def _grow(self, needed: int) -> None:
        """Buffers of at least `needed` positions (at least double the current), cache kept."""
        dims = self.engine.dims
        size = max(needed, 2 * self.capacity)
        size = -(-size // self.GROWTH) * self.GROWTH
        shape = (self.batch, dims.num_kv_heads, size, dims.head_dim)
        grown = {}
        for name in self.past_names:
            buf = np.zeros(shape, dtype=self.engine.float_dtype)
            if name in self._buffers:
                buf[:, :, : self._length] = self._buffers[name][:, :, : self._length]
            grown[name] = buf
        self._set_buffers(grown)

    def _set_buffers(self, buffers: dict[str, np.ndarray]) -> None:
        self._buffers = buffers
        # OrtValues over the numpy buffers (no copy): bound as input and output alike
        self._values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in buffers.items()}
        self._kv_bound = False

    @property
    def past_length(self) -> int:
        return self._length

    @property
    def past(self) -> dict[str, np.ndarray]:
        """The KV cache (views of the buffers: read, don't keep)."""
        if not hasattr(self, "_buffers"):  # during OrtStepModel.__init__
            return super().past
        return {k: v[:, :, : self._length] for k, v in self._buffers.items()}

    def _run(self, feed: dict[str, np.ndarray], cross: dict[str, np.ndarray]) -> np.ndarray:
        total = feed["attention_mask"].shape[1]
        if total > self.capacity:
            self._grow(total)
        if self._binding is None:
            feed.update(cross)
            feed.update(self._buffers)
            logits, *presents = self.session.run(None, feed)
            self._set_buffers(dict(zip(self.past_names, presents)))
            self._length = total
            return logits
        binding = self._bind_inputs(feed, cross)
        if not self._kv_bound:
            for past, present in zip(self.past_names, self._present_names):
                binding.bind_ortvalue_input(past, self._values[past])
                binding.bind_ortvalue_output(present, self._values[past])
            self._kv_bound = True
        # logits into a buffer of ours, rebound only when its shape changes (prefill -> decode)
        positions = feed["input_ids"].shape[1]
        if "logits_index" in feed:
            positions = len(feed["logits_index"])
        shape = (self.batch, positions, self.engine.dims.vocab_size)
        if self._logits is None or self._logits.shape != shape:
            self._logits = np.empty(shape, dtype=self._logits_dtype)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))
        self.session.run_with_iobinding(binding)
        self._length = total
        return self._logits

    @property
    def _present_names(self) -> list[str]:
        return self._output_names[1:]

    def _reorder(self, index: np.ndarray) -> None:
        self.batch = len(index)  # the new buffers' batch (BaseStepModel sets it again)
        self._set_buffers({k: np.ascontiguousarray(v[index]) for k, v in self._buffers.items()})
        self._cross_rows = self._cross_rows[index]
