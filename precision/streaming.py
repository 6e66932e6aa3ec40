"""`export --precision fp16 | int8 --int8-mode weight-only | int4` with bounded memory.

Today's route exports the fp32 graphs from the loaded model, then quantizes them: the whole
fp32 model, then whole fp32 graphs, are in memory. Here no weight is in memory longer than its
own conversion:
1. the model files are read for shapes only (`flamingo.lazy`, through `loaders.resolve_flamingo`
   so every check of loading applies);
2. each fp32 graph is traced without its large weights (`exporter.skeleton`): the export's
   graph proto, each large initializer a placeholder that knows which checkpoint tensor (and
   view of it) holds its values;
3. the precision rewrites of `precision.quantize` run on that graph unchanged; where one needs a
   weight's values (int8 per-channel scales, onnxruntime's int4 block quantizer) `StreamedWeights`
   reads that one tensor from the checkpoint, and moves the large tensors the rewrite makes to a
   spool file at once; fp16 (onnxruntime's converter) only retypes a placeholder;
4. `write_graph` writes the result as `precision.quantize.save_graph` would (inline, or one
   `<graph>.onnx.data` file in initializer order), converting each remaining weight from the
   checkpoint (fp32, or fp16 by onnxruntime's own conversion function) one tensor at a time.
The graphs are those of the fp32 export quantized by `quantize_export` (tests/precision/
test_streaming.py compares them); W8A8 int8 needs calibration activations of the fp32 graph
and keeps that route. Written atomically (`exporter.export.write_atomically`).
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from exporter.decoder_forms import apply_form
from exporter.export import (
    ExportOptions,
    check_free_space,
    check_output,
    write_atomically,
    write_manifest,
)
from exporter.skeleton import (
    LAYER_GROUP,
    PLACEHOLDER_LOCATION,
    SMALL_PARAM_BYTES,
    Skeleton,
    build_model,
    fingerprint,
    fingerprint_key,
    is_placeholder,
    trace_skeletons,
)
from flamingo.lazy import SourceFiles, read_lazy_state_dict
from flamingo.loaders import ResolvedFlamingo, resolve_flamingo
from runtime.manifest import GraphEntry, Manifest
from runtime.spec import PORTABLE, ModelDims, decoder_spec, vision_spec

from .graph import WeightStore, exceeds_proto_limit
from .options import QuantizeError, QuantizeOptions
from .quantize import rewrite_graph, written_graph

Progress = Any  # Callable[[str], None]

_FILE_KEYS = ("lm_dir", "vision_path", "checkpoint_path")  # an OpenFlamingo model's files
EVICT_BYTES = 1 << 20  # new initializers at least this large go to the spool file at once
_CHUNK_ELEMENTS = 1 << 22  # elements converted (fp16) or copied per step when writing
_BYTES_PER_ELEMENT = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2}


def streams(options: QuantizeOptions) -> bool:
    """Whether `export` at these options streams: some graph below fp32 and no W8A8 or
    dynamic int8 (W8A8 needs activations of the fp32 graph to calibrate; dynamic is
    onnxruntime's quantize_dynamic over a whole fp32 graph)."""
    precisions = (options.vision, options.decoder)
    if all(p == "fp32" for p in precisions):
        return False
    return not ("int8" in precisions and options.int8_mode in ("w8a8", "dynamic"))


# bytes per weight as written, per precision (int4: 4 bits plus an fp32 scale per block of 32)
_WRITTEN_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}


def output_size(resolved: ResolvedFlamingo, options: QuantizeOptions) -> int:
    """At least the bytes the streamed export writes, checked against the free space before
    the slow part: every weight once, at the smaller of the two graphs' precisions."""
    per_weight = min(_WRITTEN_BYTES[options.precision(g)] for g in ("vision", "decoder"))
    return int(sum(t.numel() for t in resolved.tensors.values()) * per_weight)


def tensor_group(param: str) -> str:
    """The progress unit of a parameter: its layer (`lang_model.layers.12`) or its module."""
    m = LAYER_GROUP.match(param)
    return m[1] if m else param.rsplit(".", 1)[0]


@dataclass(frozen=True)
class Spooled:
    """A rewrite-made initializer whose bytes wait in the spool file."""

    offset: int
    length: int


class StreamedWeights(WeightStore):
    """The values behind a skeleton's placeholders, read from the checkpoint when asked.

    fp32 values are `as_strided` views of the parameter (held while more of its views are
    still to be read); placeholders retyped to fp16 convert on the way out; initializers a
    rewrite makes are spooled when large. Records a fingerprint of every view it reads.
    """

    def __init__(
        self,
        skeleton: Skeleton,
        tensors: dict[str, torch.Tensor],
        files: SourceFiles,
        spool: Path,
        say: Progress,
    ) -> None:
        self.views = dict(skeleton.views)
        self.tensors, self.files, self.say = tensors, files, say
        self.label = skeleton.name
        self.spooled: dict[str, Spooled] = {}
        self.fingerprints: dict[str, tuple] = {}
        self._spool = open(spool, "w+b")  # noqa: SIM115 (closed by close())
        self._spool_size = 0
        self._uses = Counter(v.param for v in self.views.values())
        self._cached: tuple[str, torch.Tensor] | None = None
        self._groups = list(dict.fromkeys(tensor_group(v.param) for v in self.views.values()))
        self._seen: set[str] = set()
        self._start = time.perf_counter()

    # -- WeightStore

    def deferred(self, tensor: TensorProto) -> bool:
        return is_placeholder(tensor)

    def array(self, tensor: TensorProto) -> np.ndarray:
        if not self.deferred(tensor):
            return numpy_helper.to_array(tensor)
        if tensor.name in self.spooled:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            data = b"".join(self._spooled_chunks(self.spooled[tensor.name]))
            return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))
        if tensor.data_type != TensorProto.FLOAT:
            raise QuantizeError(f"{self.label} graph: {tensor.name} was retyped before use")
        return self.fp32(tensor.name).numpy()

    def added(self, tensors: list[TensorProto]) -> None:
        for tensor in tensors:
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < EVICT_BYTES:
                continue
            data = tensor.raw_data
            self._spool.seek(self._spool_size)
            self._spool.write(data)
            self.spooled[tensor.name] = Spooled(self._spool_size, len(data))
            self._spool_size += len(data)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", PLACEHOLDER_LOCATION

    # -- values

    def fp32(self, name: str) -> torch.Tensor:
        """The fp32 values of a placeholder taken from the checkpoint (contiguous)."""
        view = self.views[name]
        param = self._param(view.param)
        values = torch.as_strided(param, view.size, view.stride, view.offset).contiguous()
        self.fingerprints[name] = (fingerprint_key(view), fingerprint(values))
        return values

    def _param(self, key: str) -> torch.Tensor:
        self._uses[key] -= 1
        if self._cached is not None and self._cached[0] == key:
            value = self._cached[1]
        else:
            self._cached = None
            self._progress(key)
            value = self.files.materialize(self.tensors[key]).to(torch.float32).contiguous()
        self._cached = (key, value) if self._uses[key] > 0 else None
        return value

    def _progress(self, key: str) -> None:
        group = tensor_group(key)
        if group in self._seen:
            return
        self._seen.add(group)
        self.say(
            f"{self.label} graph: {group} ({len(self._seen)}/{len(self._groups)} tensor groups, "
            f"{self.files.bytes_read / 2**30:.2f} GiB read, "
            f"{time.perf_counter() - self._start:.0f} s)"
        )

    def nbytes(self, tensor: TensorProto) -> int:
        """Bytes of a placeholder's data as written."""
        if tensor.name in self.spooled:
            return self.spooled[tensor.name].length
        if tensor.data_type not in _BYTES_PER_ELEMENT:
            raise QuantizeError(f"{self.label} graph: {tensor.name} has no values to write")
        return self.views[tensor.name].numel * _BYTES_PER_ELEMENT[tensor.data_type]

    def chunks(self, tensor: TensorProto) -> Iterator[bytes]:
        """A placeholder's data as written (fp16: onnxruntime's float16 conversion, which is
        elementwise, so converting in chunks gives the same bytes)."""
        if tensor.name in self.spooled:
            yield from self._spooled_chunks(self.spooled[tensor.name])
            return
        values = self.fp32(tensor.name).reshape(-1).numpy()
        if tensor.data_type == TensorProto.FLOAT:
            for start in range(0, values.size, _CHUNK_ELEMENTS):
                yield values[start : start + _CHUNK_ELEMENTS].tobytes()
        elif tensor.data_type == TensorProto.FLOAT16:
            from onnxruntime.transformers.float16 import convert_np_to_float16

            for start in range(0, values.size, _CHUNK_ELEMENTS):
                yield convert_np_to_float16(values[start : start + _CHUNK_ELEMENTS]).tobytes()
        else:
            raise QuantizeError(
                f"{self.label} graph: {tensor.name} was retyped to "
                f"{helper.tensor_dtype_to_string(tensor.data_type)}; only fp32 and fp16 "
                "weights are converted while writing"
            )

    def _spooled_chunks(self, spooled: Spooled) -> Iterator[bytes]:
        step = 16 << 20
        for start in range(0, spooled.length, step):
            self._spool.seek(spooled.offset + start)
            yield self._spool.read(min(step, spooled.length - start))

    def release(self) -> None:
        self._cached = None

    def close(self) -> None:
        self._cached = None
        self._spool.close()


# ------------------------------------------------------------------ writing


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """onnx.external_data_helper.set_external_data, for a tensor whose data is already written."""
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _fill(tensor: TensorProto, data: bytes) -> None:
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    tensor.raw_data = data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_GRAPH_TAG, _INITIALIZER_TAG, _RAW_DATA_TAG = b"\x3a", b"\x2a", b"\x4a"  # fields 7, 5, 9


def _save_inline(model: onnx.ModelProto, path: Path, weights: StreamedWeights) -> None:
    """The bytes `onnx.save` writes for `model` with every placeholder's data inline, without
    holding them: the model is serialized with each placeholder's raw_data empty (its last
    field: dims, data_type, name, raw_data), then written with each empty raw_data replaced by
    the data streamed from `weights` and the enclosing lengths (initializer, graph) grown to
    match. Protobuf writes known fields in field-number order, so the result is the file
    `onnx.save` writes (the equality tests compare the two routes' files)."""
    deferred = [t for t in model.graph.initializer if weights.deferred(t)]
    sizes = [weights.nbytes(t) for t in deferred]
    for tensor in deferred:
        _fill(tensor, b"")
    buffer = io.BytesIO()
    onnx.save(model, buffer)
    empty_model = buffer.getvalue()
    graph = model.graph.SerializeToString()
    start = empty_model.find(graph)
    head = _GRAPH_TAG + _varint(len(graph))
    if start < 0 or empty_model[start - len(head) : start] != head:
        raise QuantizeError(f"{path.name}: cannot lay out the graph for streaming (protobuf)")
    pieces: list[tuple[int, int, bytes]] = []  # (offset in graph, length replaced, new header)
    pos = 0
    for tensor, size in zip(deferred, sizes):
        body = tensor.SerializeToString()  # ..., name, raw_data (tag 9, length 0)
        if not body.endswith(_RAW_DATA_TAG + b"\x00"):
            raise QuantizeError(f"{tensor.name}: raw_data is not the last field written")
        entry = _INITIALIZER_TAG + _varint(len(body)) + body
        at = graph.find(entry, pos)
        if at < 0:
            raise QuantizeError(f"{tensor.name}: initializer not found in the serialized graph")
        data_head = _RAW_DATA_TAG + _varint(size)
        grown = len(body) - 2 + len(data_head) + size
        pieces.append((at, len(entry), _INITIALIZER_TAG + _varint(grown) + body[:-2] + data_head))
        pos = at + len(entry)
    graph_size = len(graph) + sum(len(h) + n - length for (_, length, h), n in zip(pieces, sizes))
    with open(path, "wb") as f:
        f.write(empty_model[: start - len(head)])
        f.write(_GRAPH_TAG + _varint(graph_size))
        pos = 0
        for (at, length, header), tensor in zip(pieces, deferred):
            f.write(graph[pos:at])
            f.write(header)
            for chunk in weights.chunks(tensor):
                f.write(chunk)
            pos = at + length
        f.write(graph[pos:])
        f.write(empty_model[start + len(graph) :])
    for tensor in deferred:  # placeholders again: the data is in the file, not in memory
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", PLACEHOLDER_LOCATION


def write_graph(model: onnx.ModelProto, path: Path, weights: StreamedWeights) -> list[str]:
    """Write a streamed graph as `precision.quantize.save_graph` writes a graph in memory:
    inline below the protobuf limit, else every initializer of at least 1 KiB (onnx.save's
    threshold, measured as sys.getsizeof of its bytes) in `<graph>.onnx.data`, in initializer
    order. Placeholders are converted one at a time. Returns the data file names."""
    inits = model.graph.initializer
    sizes = [weights.nbytes(t) if weights.deferred(t) else len(t.raw_data) for t in inits]
    if not exceeds_proto_limit(sum(sizes)):
        _save_inline(model, path, weights)
        return []
    data_name = path.name + ".data"
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        for tensor, size in zip(inits, sizes):
            deferred = weights.deferred(tensor)
            if not deferred and not tensor.HasField("raw_data"):
                continue
            if sys.getsizeof(b"") + size < 1024:
                if deferred:
                    _fill(tensor, b"".join(weights.chunks(tensor)))
                continue
            if deferred:
                for chunk in weights.chunks(tensor):
                    data.write(chunk)
            else:
                data.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            _set_external(tensor, data_name, offset, size)
            offset += size
    onnx.save(model, str(path))
    return [data_name]


# ------------------------------------------------------------------ the export


def _duplicates(skeleton: Skeleton, weights: StreamedWeights) -> set[str]:
    """Parameters behind placeholders whose values equal another initializer's (same dtype,
    sizes and strides): torch's export stores such tensors once, so they must be traced with
    their values. Verified with torch.equal, as torch compares."""
    for name in skeleton.views:
        if name not in weights.fingerprints:
            weights.fp32(name)
    groups: dict[tuple, list[str]] = {}
    for name, (key, fp) in (*skeleton.traced_fingerprints.items(), *weights.fingerprints.items()):
        if fp is not None:
            groups.setdefault((key, fp), []).append(name)
    traced = {t.name: t for t in skeleton.model.graph.initializer if not is_placeholder(t)}

    def values(name: str) -> torch.Tensor:
        if name in traced:
            return torch.from_numpy(numpy_helper.to_array(traced[name]).copy())
        return weights.fp32(name)

    found: set[str] = set()
    for names in groups.values():
        if len(names) < 2 or all(n in traced for n in names):
            continue
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if (a in skeleton.views or b in skeleton.views) and torch.equal(
                    values(a), values(b)
                ):
                    found |= {skeleton.views[n].param for n in (a, b) if n in skeleton.views}
    return found


def export_streaming(
    model_files: dict[str, Any],
    out: str | Path,
    export_options: ExportOptions,
    options: QuantizeOptions,
    progress: Progress | None = None,
    small_bytes: int = SMALL_PARAM_BYTES,
) -> Manifest:
    """`export --precision P` from the model files without loading the model (see module doc).

    `model_files`: `flamingo.loaders.resolve_flamingo`'s arguments (lm_dir, vision_path,
    checkpoint_path and its keywords), or `model_dir` (an HF IDEFICS folder, and optionally
    `preset`: `flamingo.idefics.resolve_idefics`'s). Raises ExportError (QuantizeError) before
    any work when the options or OUT cannot be used, LoadError when the files do not fit.
    """
    say = progress or (lambda _message: None)
    export_options.validate()
    options = replace(options, force=export_options.force)
    options.validate()
    if not streams(options):
        raise QuantizeError(
            "the streaming export writes fp16, int8 weight-only and int4 graphs; fp32, W8A8 "
            "and dynamic int8 go through the fp32 export (flamingo-export export without "
            "--precision, then quantize)"
        )
    out = Path(out)
    model_files = {k: v for k, v in model_files.items() if v is not None}
    keys = ("model_dir",) if "model_dir" in model_files else _FILE_KEYS
    check_output(out, options.force, inputs=[model_files[k] for k in keys])
    say("reading the shapes of the model files' tensors (no weights)...")
    if "model_dir" in model_files:
        from flamingo.idefics import resolve_idefics

        resolved = resolve_idefics(
            model_files["model_dir"], preset=model_files.get("preset"), reader=read_lazy_state_dict
        )
    else:
        resolved = resolve_flamingo(**model_files, reader=read_lazy_state_dict)
    for line in resolved.report.lines():
        say(line)
    export_options = export_options.with_model(resolved.config.to_dict(), say)
    check_free_space(out, output_size(resolved, options))
    source = {k: str(model_files[k]) for k in keys}
    return write_atomically(
        out,
        options.force,
        lambda tmp: _stream_into(resolved, source, tmp, export_options, options, say, small_bytes),
        say,
    )


def _stream_into(
    resolved: ResolvedFlamingo,
    source: dict[str, str],
    tmp: Path,
    export_options: ExportOptions,
    options: QuantizeOptions,
    say: Progress,
    small_bytes: int,
) -> Manifest:
    cfg = resolved.config
    dims = ModelDims.from_config(cfg.to_dict())
    forms = {"vision": PORTABLE, "decoder": export_options.decoder_form}
    specs = {
        "vision": vision_spec(dims, "float32"),
        "decoder": decoder_spec(dims, "float32", forms["decoder"]),
    }
    files = SourceFiles()
    work = Path(tempfile.mkdtemp(prefix=".stream-work-", dir=tmp))
    graphs: dict[str, GraphEntry] = {}
    record: dict[str, Any] = {}
    real: frozenset[str] = frozenset()
    try:
        model = build_model(cfg, resolved.tensors, files.materialize, small_bytes)
        for name in ("vision", "decoder"):
            precision = options.precision(name)
            start = time.perf_counter()
            while True:
                say(f"{name} graph: tracing its structure without weights (opset "
                    f"{export_options.opset})...")  # fmt: skip
                skeleton = trace_skeletons(model, export_options.opset, small_bytes, real,
                                           only=(name,), progress=say)[0]  # fmt: skip
                if not forms[name].portable:  # as export does to the file it traced
                    apply_form(skeleton.model, forms[name], cfg.to_dict(),
                               {"media_token_id": cfg.media_token_id})  # fmt: skip
                say(f"{name} graph: fp32 -> {precision}, weights streamed from the checkpoint...")
                weights = StreamedWeights(
                    skeleton, resolved.tensors, files, work / f"{name}.spool", say
                )
                try:
                    graph, info = rewrite_graph(
                        skeleton.model, name, options, None, work, weights, form=forms[name]
                    )
                    path = tmp / f"{name}.onnx"
                    external = write_graph(graph, path, weights)
                    duplicates = _duplicates(skeleton, weights)
                finally:
                    weights.close()
                if not duplicates:
                    break
                say(f"{name} graph: identical large tensors ({sorted(duplicates)[:2]}); tracing "
                    "again with their values, as the fp32 export stores them once")  # fmt: skip
                for stale in (path, *(tmp / f for f in external)):
                    stale.unlink(missing_ok=True)
                real |= duplicates
                model = build_model(cfg, resolved.tensors, files.materialize, small_bytes, real)
            graphs[name] = written_graph(
                path, graph, specs[name], precision, external, start, say, form=forms[name]
            )
            record[name] = info
        del model
    finally:
        files.close()
        shutil.rmtree(work, ignore_errors=True)
    record["source"] = {"model_files": source, "route": "streamed"}
    say("saving tokenizer...")
    return write_manifest(
        tmp, cfg, resolved.tokenizer, graphs, export_options, record,
        preprocess=resolved.preprocess, prompt=resolved.prompt_format,
    )  # fmt: skip
