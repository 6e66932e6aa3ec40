"""Quantize an fp32 export folder into a new, complete export folder (fp16, int8, int4).

Precision is decided in the ONNX file (TensorRT 10 deprecates weak typing, 11 drops the
FP16/INT8 builder flags): each precision is a graph rewrite that onnxruntime runs as is and
TensorRT builds strongly typed; the manifest's spec records every I/O dtype.
* fp16: norm statistics stay fp32 (``DEFAULT_FP16_KEEP``): x**2 overflows fp16 above
  |x| = 256, and LLM hidden states carry outliers that large.
* int8 ``w8a8`` (default): symmetric Q/DQ, per-channel weights, per-tensor activations
  calibrated on few-shot episodes; weight GEMMs only. TensorRT's int8 GEMM form.
* int8 ``weight-only``: per-channel int8 weights behind DequantizeLinear, no calibration; the
  CPU form (onnxruntime fuses it into MatMulNBits, and runs W8A8 slower than fp32).
* int4: weight-only, blockwise (32/64/128): blocked DequantizeLinear (opset 21, TensorRT 10+)
  or MatMulNBits (onnxruntime only). int8 and int4 keep embeddings int8 per row.
Written atomically like an export. Each form in detail: docs/quantization.md.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.export import (
    ONNX_PROTO_LIMIT,
    ExportError,
    ExportOptions,
    tool_versions,
)
from exporter.output import (
    check_free_space,
    make_work_folder,
    output_lock,
    unwinding_signals,
    writable_parent,
    write_atomically,
)
from runtime.manifest import PRECISIONS, GraphEntry, Manifest, load_manifest, safe_join
from runtime.schema import load_json
from runtime.spec import GraphSpec
from trt.graph_index import default_opset
from trt.rules import check_graph

Progress = Callable[[str], None]

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
INT4_FORMATS = ("qdq", "matmulnbits")
INT8_MODES = ("w8a8", "weight-only")
BLOCK_SIZES = (32, 64, 128)
FP16_KEEP_CHOICES = ("norm", "softmax", "logits")
# What stays fp32 in fp16 graphs by default: norm statistics only (docs/measurements.md).
DEFAULT_FP16_KEEP = ("norm",)
INT4_OPSET = 21  # blocked DequantizeLinear and INT4 tensors
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
# Ops that only move or reshape a tensor: walked through from `logits` back to its MatMul.
_LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast")


class QuantizeError(ExportError):
    """The quantization cannot proceed (bad option, unsuitable source, rule violation, ...)."""


@dataclass
class QuantizeOptions:
    """Per-graph precision and how to get there; recorded in the output manifest."""

    vision: str = "fp16"
    decoder: str = "fp16"
    calibration: str = "random"  # DATA path | random | demo (int8 only)
    method: str = "minmax"
    percentile: float = 99.999
    episodes: int = 16
    max_shots: int = 2
    decode_steps: int = 8
    seed: int = 0
    block_size: int = 128  # the field's default group (AWQ/GPTQ, MatMulNBits, ModelOpt)
    int4_format: str = "qdq"
    int8_mode: str = "w8a8"
    fp16_keep: tuple[str, ...] = DEFAULT_FP16_KEEP
    keep_nodes: tuple[str, ...] = ()  # node-name globs kept at the source precision
    quantize_embeddings: bool = True
    calibration_cache: str | None = None  # int8 ranges: reused if `<cache>.<graph>.json` exists
    force: bool = False

    def precision(self, graph: str) -> str:
        return {"vision": self.vision, "decoder": self.decoder}[graph]

    def validate(self) -> None:
        for name, p in (("vision", self.vision), ("decoder", self.decoder)):
            if p not in PRECISIONS:
                raise QuantizeError(f"{name} precision {p!r} is not one of {list(PRECISIONS)}")
        if self.method not in CALIBRATION_METHODS:
            raise QuantizeError(
                f"calibration method {self.method!r} is not one of {list(CALIBRATION_METHODS)}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise QuantizeError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.block_size not in BLOCK_SIZES:
            raise QuantizeError(
                f"int4 block size must be one of {BLOCK_SIZES}, got {self.block_size}"
            )
        if self.int4_format not in INT4_FORMATS:
            raise QuantizeError(f"int4 format {self.int4_format!r} is not one of {INT4_FORMATS}")
        if self.int8_mode not in INT8_MODES:
            raise QuantizeError(f"int8 mode {self.int8_mode!r} is not one of {INT8_MODES}")
        bad = [k for k in self.fp16_keep if k not in FP16_KEEP_CHOICES]
        if bad:
            raise QuantizeError(f"fp16 keep {bad} not among {list(FP16_KEEP_CHOICES)}")
        if self.episodes < 1:
            raise QuantizeError(f"the calibration set is empty: {self.episodes} episodes asked")
        if self.decode_steps < 0 or self.max_shots < 0:
            raise QuantizeError("decode steps and max shots must be >= 0")
        for graph in ("vision", "decoder"):
            cache = self.cache_file(graph)
            if cache is not None and (cache.exists() or cache.is_symlink()):
                check_calibration_cache(cache)
        # options that would be silently ignored contradict the precision asked for
        if self.keep_nodes and self.vision == self.decoder == "fp32":
            raise QuantizeError("--keep-node keeps nodes out of a reduced precision: give one")

    def cache_file(self, graph: str) -> Path | None:
        """`<calibration_cache>.<graph>.json` where the graph is calibrated (W8A8 int8)."""
        calibrated = self.precision(graph) == "int8" and self.int8_mode == "w8a8"
        if not calibrated or not self.calibration_cache:
            return None
        return Path(f"{self.calibration_cache}.{graph}.json")


RECALIBRATE = "delete it to recalibrate"


def check_calibration_cache(path: Path) -> None:
    """A calibration cache that exists must be a JSON object file (onnxruntime's tensor ranges)."""
    if not path.is_file():
        raise QuantizeError(
            f"{path}: not a file; a calibration cache is a JSON file ({RECALIBRATE})"
        )
    data = load_json(path, QuantizeError)
    if not isinstance(data, dict):
        raise QuantizeError(
            f"{path}: not a calibration cache (expected a JSON object of tensor ranges; "
            f"{RECALIBRATE})"
        )


# ------------------------------------------------------------------ graph helpers


def load_graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def _payload_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_graph(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write a graph; over the 2 GB protobuf limit its tensors go to `<graph>.onnx.data`."""
    if not _is_large(model):
        onnx.save(model, str(path))
        return []
    data = path.name + ".data"
    onnx.save(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data, size_threshold=1024,
    )  # fmt: skip
    return [data]


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name: node lists and keep-lists address nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def matched_nodes(model: onnx.ModelProto, patterns: tuple[str, ...]) -> list[str]:
    """Names of nodes matching any glob (the mixed-precision keep-list)."""
    return [
        n.name for n in model.graph.node if any(fnmatch.fnmatchcase(n.name, p) for p in patterns)
    ]


def weight_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm/Conv nodes whose weight (input 1) is a float initializer."""
    inits = _initializers(model)
    return [
        n.name
        for n in model.graph.node
        if n.op_type in WEIGHT_OPS
        and len(n.input) > 1
        and n.input[1] in inits
        and inits[n.input[1]].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
        and len(inits[n.input[1]].dims) >= 2
    ]


def norm_statistic_nodes(model: onnx.ModelProto) -> list[str]:
    """LayerNormalization nodes and decomposed norm statistics (Pow(x, 2) -> ReduceMean ->
    Add(eps) -> Sqrt -> Div/Reciprocal): what overflows or loses precision in fp16."""
    producers, consumers = _producers(model), _consumers(model)
    names = [n.name for n in model.graph.node if n.op_type == "LayerNormalization"]
    for node in model.graph.node:
        if node.op_type != "ReduceMean":
            continue
        src = producers.get(node.input[0])
        if src is None or src.op_type != "Pow":
            continue
        names += [src.name, node.name]
        cur = node
        while True:
            nxt = consumers.get(cur.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in ("Add", "Sqrt", "Div", "Reciprocal"):
                break
            cur = nxt[0]
            names.append(cur.name)
            if cur.op_type in ("Div", "Reciprocal"):
                break
    return names


def logits_nodes(model: onnx.ModelProto) -> list[str]:
    """The LM head: from the `logits` output back through layout ops to its MatMul."""
    producers = _producers(model)
    names, name = [], "logits"
    while name in producers:
        node = producers[name]
        names.append(node.name)
        if node.op_type not in _LAYOUT_OPS:
            break
        name = node.input[0]
    return names


_UNARY = {"Tanh": np.tanh, "Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "Neg": np.negative}


def fold_constant_unary(model: onnx.ModelProto) -> int:
    """Precompute unary ops on float initializers (the tanh of cross-attention gates) in
    fp32, so fp16 graphs carry the exact gate and no fp16 kernel is needed for it."""
    inits = _initializers(model)
    consumers = _consumers(model)
    graph_outputs = {o.name for o in model.graph.output}
    folded = 0
    for node in list(model.graph.node):
        fn = _UNARY.get(node.op_type)
        src = inits.get(node.input[0]) if fn is not None else None
        if src is None or src.data_type != TensorProto.FLOAT or node.output[0] in graph_outputs:
            continue
        value = fn(numpy_helper.to_array(src).astype(np.float64)).astype(np.float32)
        tensor = numpy_helper.from_array(value, node.output[0])
        model.graph.initializer.append(tensor)
        inits[tensor.name] = tensor
        model.graph.node.remove(node)
        if len(consumers.get(src.name, [])) == 1:
            model.graph.initializer.remove(src)
        folded += 1
    return folded


def spec_from_graph(model: onnx.ModelProto, base: GraphSpec) -> GraphSpec:
    """The source spec with each tensor's dtype read from the rewritten graph."""
    types = {}
    for v in (*model.graph.input, *model.graph.output):
        types[v.name] = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
    missing = [t.name for t in (*base.inputs, *base.outputs) if t.name not in types]
    if missing:
        raise QuantizeError(f"{base.name} graph lost inputs/outputs {missing[:4]}")
    return GraphSpec(
        base.name,
        tuple(replace(t, dtype=types[t.name]) for t in base.inputs),
        tuple(replace(t, dtype=types[t.name]) for t in base.outputs),
    )


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder nodes so each comes after its inputs' producers (converters append Casts last)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise QuantizeError(f"graph has a cycle or undefined inputs at {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


# ------------------------------------------------------------------ precisions


@contextlib.contextmanager
def quiet_onnxruntime_tools() -> Iterator[None]:
    """onnxruntime's quantizers log per node (INFO) and advise pre-processing (WARNING) on the
    root logger; our progress lines say what matters. (Pre-processing is skipped on purpose:
    its optimizer fuses into contrib ops TensorRT cannot parse.)"""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    loggers += [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                if n.startswith("onnxruntime")]  # fmt: skip
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the entropy calibrator print()s
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def remove_fp16_round_trips(model: onnx.ModelProto, fp32_nodes: set[str]) -> int:
    """Drop Cast(fp16) -> Cast(fp32) pairs between two fp32 nodes.

    The converter casts every blocked node's output to fp16 and back before the next blocked
    node, so a kept chain (x**2 -> mean -> +eps -> sqrt -> 1/.) would still round, and
    overflow, at each link. Consumers of such a round trip read the fp32 value directly.
    """
    producers = _producers(model)
    consumers = _consumers(model)
    rewired = 0
    for node in list(model.graph.node):
        if node.op_type != "Cast" or _cast_to(node) != TensorProto.FLOAT:
            continue
        down = producers.get(node.input[0])
        if down is None or down.op_type != "Cast" or _cast_to(down) != TensorProto.FLOAT16:
            continue
        src = producers.get(down.input[0])
        if src is None or src.name not in fp32_nodes:
            continue
        rewired += 1
        if node.output[0] in {o.name for o in model.graph.output}:  # keep the output's name
            node.op_type, node.input[0] = "Identity", down.input[0]
            del node.attribute[:]
            continue
        for user in consumers.get(node.output[0], []):
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = down.input[0]
        model.graph.node.remove(node)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for node in list(model.graph.node):  # Casts to fp16 nobody reads any more
        if node.op_type == "Cast" and node.output[0] not in used:
            model.graph.node.remove(node)
    return rewired


def _is_large(model: onnx.ModelProto) -> bool:
    return _payload_bytes(model) >= ONNX_PROTO_LIMIT - (64 << 20)


def to_fp16(
    model: onnx.ModelProto, keep: tuple[str, ...], keep_nodes: list[str], work: Path
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """fp16 weights/activations/I-O; `keep` categories and `keep_nodes` stay fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    fold_constant_unary(model)
    block = list(keep_nodes)
    if "norm" in keep:
        block += norm_statistic_nodes(model)
    if "softmax" in keep:
        block += [n.name for n in model.graph.node if n.op_type == "Softmax"]
    keep_io: list[str] = []
    if "logits" in keep and any(o.name == "logits" for o in model.graph.output):
        block += logits_nodes(model)
        keep_io.append("logits")
    source: onnx.ModelProto | str = model
    if _is_large(model):  # the converter's shape inference needs a path above 2 GB
        save_graph(model, work / "fp16-src.onnx")
        source = str(work / "fp16-src.onnx")
    converted = convert_float_to_float16(
        source,
        keep_io_types=keep_io or False,
        op_block_list=DEFAULT_OP_BLOCK_LIST,
        node_block_list=sorted(set(block)),
    )
    removed = remove_fp16_round_trips(converted, set(block))
    topological_sort(converted)
    info = {"fp32_nodes": len(set(block)), "fp16_keep": list(keep), "fp16_round_trips": removed}
    return converted, info


def _int8_per_channel(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8, one scale per index of `axis` (the channel axis): scale = max|w| / 127
    over the other axis, all-zero channels get scale 1."""
    amax = np.abs(weights).max(axis=1 - axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weights / np.expand_dims(scale, 1 - axis)), -127, 127).astype(np.int8)
    return q, scale


def _dequantize_initializer(
    model: onnx.ModelProto, tensor: TensorProto, axis: int
) -> onnx.NodeProto:
    """Replace a 2-D float initializer by its int8 per-channel form and return the
    DequantizeLinear node that recomputes it under the same name (for the caller to insert)."""
    name = tensor.name
    q, scale = _int8_per_channel(numpy_helper.to_array(tensor), axis)
    model.graph.initializer.remove(tensor)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(q, f"{name}_int8"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}_zero_point"),
        ]
    )
    return helper.make_node(
        "DequantizeLinear",
        [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
        [name],
        name=f"{name}_DequantizeLinear",
        axis=axis,
    )


def embedding_nodes(model: onnx.ModelProto) -> list[str]:
    """Gather nodes reading a 2-D float table initializer (token embeddings)."""
    inits = _initializers(model)
    out = []
    for node in model.graph.node:
        t = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2:
            out.append(node.name)
    return out


def quantize_embeddings(model: onnx.ModelProto, skip: set[str]) -> list[str]:
    """Gather tables (and the tied LM head sharing them) -> int8 per row + DequantizeLinear.

    Weight-only (the Gather output is float): symmetric, zero point 0, axis 0, which for a
    tied LM head is one scale per vocabulary entry, i.e. per output channel.
    """
    return _dequantize_inputs(model, set(embedding_nodes(model)) - skip, 0, axis=0)


def _dequantize_inputs(model: onnx.ModelProto, nodes: set[str], index: int, axis: int) -> list[str]:
    """Input `index` (an initializer) of every node in `nodes` -> int8 per channel along `axis`
    behind a DequantizeLinear placed first in the graph; shared initializers once. Returns
    the initializer names."""
    inits = _initializers(model)
    names: list[str] = []
    for node in model.graph.node:
        if node.name in nodes and node.input[index] not in names:
            names.append(node.input[index])
    for i, name in enumerate(names):
        model.graph.node.insert(i, _dequantize_initializer(model, inits[name], axis))
    return names


def to_int8_weight_only(
    model: onnx.ModelProto, options: QuantizeOptions, keep_nodes: list[str]
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """int8 weights (per output channel, symmetric) behind DequantizeLinear; float activations.

    Only MatMul weights [K, N] (axis 1 = output channel); Conv and Gemm stay float (the
    vision stem and nothing else here). A weight shared by several MatMuls is quantized once.
    """
    kept = set(keep_nodes)
    op_of = {n.name: n.op_type for n in model.graph.node}
    targets = [n for n in weight_nodes(model) if n not in kept and op_of[n] == "MatMul"]
    _dequantize_inputs(model, set(targets), 1, axis=1)
    embeddings = quantize_embeddings(model, kept) if options.quantize_embeddings else []
    info = {
        "mode": "weight-only",
        "weight_nodes": len(targets),
        "activations": "float (not quantized)",
        "weights": "per-channel, symmetric",
        "embeddings_int8": embeddings,
    }
    return model, info


def to_int8(
    model: onnx.ModelProto,
    graph: str,
    reader: Any,
    options: QuantizeOptions,
    keep_nodes: list[str],
    work: Path,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Static QDQ int8 (symmetric, per-channel weights, calibrated per-tensor activations)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    targets = [n for n in weight_nodes(model) if n not in set(keep_nodes)]
    big = _is_large(model)
    src, dst = work / "int8-src.onnx", work / "int8.onnx"
    save_graph(model, src)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[options.method]
    cache = options.cache_file(graph)
    cached = cache is not None and cache.is_file()
    try:
        quantize_static(
            str(src),
            str(dst),
            reader,
            calibration_cache_path=str(cache) if cache is not None else None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(WEIGHT_OPS),
            nodes_to_quantize=targets,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=big,
            calibrate_method=method,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "CalibPercentile": options.percentile,
                "CalibTensorRangeSymmetric": True,
                "CalibStridedMinMax": 1,  # one feed at a time (see precision.collect.FeedReader)
            },
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if not cached:
            raise
        # onnxruntime read our cache and could not use it (other method, other format)
        raise QuantizeError(
            f"{cache}: not a usable calibration cache ({type(e).__name__}: {e}); {RECALIBRATE}"
        ) from e
    quantized = load_graph(dst)
    embeddings = (
        quantize_embeddings(quantized, set(keep_nodes)) if options.quantize_embeddings else []
    )
    info = {
        "mode": "w8a8",
        "method": options.method,
        "weight_nodes": len(targets),
        "activations": "per-tensor, symmetric",
        "weights": "per-channel, symmetric",
        "embeddings_int8": embeddings,
    }
    if options.method == "percentile":
        info["percentile"] = options.percentile
    return quantized, info


def to_int4(
    model: onnx.ModelProto, options: QuantizeOptions, keep_nodes: list[str], work: Path
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Blockwise symmetric int4 weights: blocked DequantizeLinear (opset 21) or MatMulNBits."""
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    qdq = options.int4_format == "qdq"
    if qdq and default_opset(model) < INT4_OPSET:
        if _is_large(model):  # convert the structure only, then reattach the weights
            save_graph(model, work / "int4-src.onnx")
            skeleton = onnx.load(str(work / "int4-src.onnx"), load_external_data=False)
            model = version_converter.convert_version(skeleton, INT4_OPSET)
            onnx.external_data_helper.load_external_data_for_model(model, str(work))
        else:
            model = version_converter.convert_version(model, INT4_OPSET)
        name_nodes(model)
    op_of = {n.name: n.op_type for n in model.graph.node}
    kept = set(keep_nodes)
    targets = [n for n in weight_nodes(model) if n not in kept and op_of[n] == "MatMul"]
    config = DefaultWeightOnlyQuantConfig(
        block_size=options.block_size,
        is_symmetric=True,
        quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",),
    )
    quantizer = MatMulNBitsQuantizer(
        model, nodes_to_exclude=list(keep_nodes), nodes_to_include=targets, algo_config=config
    )
    quantizer.process()
    out = quantizer.model.model
    embeddings = quantize_embeddings(out, set(keep_nodes)) if options.quantize_embeddings else []
    info = {
        "format": "blocked DequantizeLinear (opset 21)" if qdq else "MatMulNBits (com.microsoft)",
        "block_size": options.block_size,
        "weights": "blockwise, symmetric",
        "weight_nodes": len(targets),
        "embeddings_int8": embeddings,
    }
    return out, info


# ------------------------------------------------------------------ the export folder


def _check_source(src: Path, out: Path) -> Manifest:
    manifest = load_manifest(src)
    not_fp32 = {k: g.precision for k, g in manifest.graphs.items() if g.precision != "fp32"}
    if not_fp32:
        raise QuantizeError(
            f"{src} is not an fp32 export (graphs {not_fp32}); quantize the fp32 export instead"
        )
    if out.absolute().resolve() == src.absolute().resolve():
        raise QuantizeError("--output must be a new folder, not the source export")
    if src.absolute().resolve() in out.absolute().resolve().parents:
        raise QuantizeError("--output must not be inside the source export")
    return manifest


def _needs_readers(options: QuantizeOptions) -> bool:
    """W8A8 int8 graphs need calibration unless their ranges are cached."""
    for graph in ("vision", "decoder"):
        calibrated = options.precision(graph) == "int8" and options.int8_mode == "w8a8"
        cache = options.cache_file(graph)
        if calibrated and (cache is None or not cache.is_file()):
            return True
    return False


def _calibration_readers(
    src: Path, options: QuantizeOptions, say: Progress
) -> tuple[dict[str, Any], dict[str, Any]]:
    """FeedReaders for the graphs quantized to int8 (vision and/or decoder), and the record of
    the calibration set for the manifest."""
    from precision.collect import EpisodeRunner, FeedReader
    from precision.data import calibration_set

    cal = calibration_set(
        options.calibration,
        episodes=options.episodes,
        max_shots=options.max_shots,
        seed=options.seed,
        progress=say,
    )
    say(
        f"calibration set: {len(cal.episodes)} episodes from {cal.source!r} "
        f"(seed {cal.seed}, {cal.skipped} images skipped)"
    )
    runner = EpisodeRunner(src, decode_steps=options.decode_steps)
    n_images = sum(len(e.images) for e in cal.episodes)
    readers = {
        "vision": FeedReader(
            lambda: runner.vision_feeds(cal.episodes),
            "vision",
            -(-n_images // runner.image_batch),
            say,
            every=1,
        ),
        "decoder": FeedReader(
            lambda: runner.decoder_feeds(cal.episodes),
            "decoder",
            len(cal.episodes) * (1 + options.decode_steps),
            say,
        ),
    }
    return readers, cal.describe()


def quantize_export(
    src: str | Path,
    out: str | Path,
    options: QuantizeOptions,
    progress: Progress | None = None,
) -> Manifest:
    """Write OUT: the export at SRC with each graph at its requested precision."""
    say = progress or (lambda _m: None)
    options.validate()
    src, out = Path(src), Path(out)
    source = _check_source(src, out)
    check_keep_nodes(src, source, options.keep_nodes)
    # the output is at most the source's size, and the int8/fp16 rewrites stage one copy of a
    # graph in the temporary folder: refuse a disk that cannot take that before the slow part
    check_free_space(out, sum(safe_join(src, f).stat().st_size for f in source.files))
    return write_atomically(
        out, options.force, lambda tmp: _quantize_into(src, source, tmp, options, say), say
    )


def graph_node_names(path: Path) -> list[str]:
    """The node names quantization addresses (`name_nodes`), without loading the weights."""
    model = onnx.load(str(path), load_external_data=False)
    name_nodes(model)
    return [n.name for n in model.graph.node]


def check_keep_nodes(src: Path, source: Manifest, patterns: tuple[str, ...]) -> None:
    """Every `--keep-node` glob must match a node of some graph: a typo would otherwise quantize
    the node it meant to keep, silently."""
    if not patterns:
        return
    names = {g: graph_node_names(safe_join(src, e.file)) for g, e in source.graphs.items()}
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for ns in names.values() for n in ns):
            files = " or ".join(e.file for e in source.graphs.values())
            raise QuantizeError(
                f"--keep-node {pattern!r} matches no node in {files} (node names are listed by "
                "`flamingo-export sensitivity`; globs use *, ? and [...])"
            )


def _quantize_into(
    src: Path, source: Manifest, tmp: Path, options: QuantizeOptions, say: Progress
) -> Manifest:
    readers: dict[str, Any] = {}
    calibration: dict[str, Any] | None = None
    if _needs_readers(options):
        readers, calibration = _calibration_readers(src, options, say)
    graphs: dict[str, GraphEntry] = {}
    record: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix=".quantize-work-", dir=tmp))
    try:
        for name, entry in source.graphs.items():
            precision = options.precision(name)
            start = time.perf_counter()
            say(f"{name} graph: fp32 -> {precision}...")
            model = load_graph(safe_join(src, entry.file))
            name_nodes(model)
            keep = matched_nodes(model, options.keep_nodes)
            info: dict[str, Any] = {"keep_nodes": keep} if keep else {}
            backends = ["onnxruntime", "tensorrt"]
            with quiet_onnxruntime_tools():
                if precision == "fp16":
                    model, more = to_fp16(model, options.fp16_keep, keep, work)
                elif precision == "int8" and options.int8_mode == "weight-only":
                    model, more = to_int8_weight_only(model, options, keep)
                elif precision == "int8":
                    model, more = to_int8(model, name, readers.get(name), options, keep, work)
                elif precision == "int4":
                    model, more = to_int4(model, options, keep, work)
                else:
                    more = {}
            if precision == "int4" and options.int4_format == "matmulnbits":
                backends = ["onnxruntime"]
            info.update(more)
            info["backends"] = backends
            if "tensorrt" in backends:
                violations = check_graph(model)
                if violations:
                    listed = "; ".join(str(v) for v in violations[:3])
                    raise QuantizeError(
                        f"{name} graph at {precision} breaks TensorRT rules: {listed}"
                    )
            path = tmp / entry.file
            external = save_graph(model, path)
            onnx.checker.check_model(str(path), full_check=False)
            spec = spec_from_graph(model, entry.spec)
            graphs[name] = GraphEntry(entry.file, precision, default_opset(model), spec, external)
            record[name] = info
            size = sum((tmp / f).stat().st_size for f in (entry.file, *external))
            say(
                f"{name} graph: {precision}, {size / 2**20:.2f} MiB "
                f"in {time.perf_counter() - start:.1f} s"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for rel in source.tokenizer_files:
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(safe_join(src, rel), dst)
    if calibration is not None:
        record["calibration"] = calibration
    if options.calibration_cache and "int8" in (options.vision, options.decoder):
        record["calibration_cache"] = str(options.calibration_cache)
    record["source"] = {"export": str(src.absolute()), "files": dict(source.files)}
    manifest = Manifest(
        model=source.model,
        special_tokens=source.special_tokens,
        preprocess=source.preprocess,
        graphs=graphs,
        limits=source.limits,
        tokenizer_files=list(source.tokenizer_files),
        tools=tool_versions(),
        quantization=record,
    )
    manifest.record_files(tmp)
    manifest.write(tmp)
    return manifest


def export_at_precision(
    model: Any,
    tokenizer: Any,
    out: str | Path,
    export_options: ExportOptions,
    options: QuantizeOptions,
    progress: Progress | None = None,
) -> Manifest:
    """`export --precision P`: the fp32 export written to a scratch folder beside OUT, then
    quantized into OUT (atomically, like every export); a plain export when all is fp32.

    `model`/`tokenizer` as `flamingo.loaders.load_flamingo` returns them. Raises ExportError
    (QuantizeError) before any export work when the options or OUT cannot be used.
    """
    from exporter.export import check_output, export_model

    out = Path(out)
    export_options.validate()
    options = replace(options, force=export_options.force)  # OUT is the export's to replace
    options.validate()
    if options.vision == options.decoder == "fp32":
        return export_model(model, tokenizer, out, export_options, progress=progress)
    from exporter.export import export_size

    check_output(out, options.force)
    # the fp32 export in the scratch folder, then OUT at most as large
    check_free_space(out, 2 * export_size(model))
    writable_parent(out)
    with unwinding_signals(), output_lock(out):
        check_output(out, options.force)
        scratch = make_work_folder(out, "fp32")
        try:
            export_model(model, tokenizer, scratch / "fp32", export_options, progress=progress)
            return quantize_export(scratch / "fp32", out, options, progress=progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
