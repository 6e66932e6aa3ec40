"""The precision rewrites of one fp32 graph: fp16 (norm statistics kept fp32), int8 W8A8 Q/DQ
or weight-only DQ, int4 blocked DQ or MatMulNBits, int8 embeddings (docs/quantization.md)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trt.graph_index import default_opset

# ------------------------------------------------------------------ precisions
from .graph import (
    IN_MEMORY,
    WeightStore,
    _consumers,
    _initializers,
    _is_large,
    _producers,
    fold_constant_unary,
    load_graph,
    logits_nodes,
    name_nodes,
    norm_statistic_nodes,
    save_graph,
    topological_sort,
    weight_nodes,
)
from .options import (
    INT4_OPSET,
    RECALIBRATE,
    WEIGHT_OPS,
    QuantizeError,
    QuantizeOptions,
)


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


def _deferred_to_inputs(
    model: onnx.ModelProto, blocked: set[str], weights: WeightStore
) -> list[tuple[int, TensorProto]]:
    """Take the deferred (streamed) initializers that onnxruntime's fp16 converter will convert
    out of the initializers and declare them graph inputs of the same type and shape.

    The converter reads an initializer's values to learn its shape (to_array(t).shape); a graph
    input it converts the same way (retyped to fp16, a Cast before each fp32 node reading it).
    Converted: read by a node outside the block lists at an input the converter does not keep
    float (ALWAYS_FLOAT_INPUTS), as in convert_float_to_float16. Returns (index, initializer)."""
    from onnxruntime.transformers.float16 import ALWAYS_FLOAT_INPUTS, DEFAULT_OP_BLOCK_LIST

    converted: set[str] = set()
    for node in model.graph.node:
        if node.op_type in DEFAULT_OP_BLOCK_LIST or node.name in blocked:
            continue
        float_only = ALWAYS_FLOAT_INPUTS.get(node.op_type, [])
        converted.update(n for i, n in enumerate(node.input) if i not in float_only)
    moved = [
        (i, t)
        for i, t in enumerate(model.graph.initializer)
        if t.data_type == TensorProto.FLOAT and t.name in converted and weights.deferred(t)
    ]
    for _, tensor in reversed(moved):
        model.graph.initializer.remove(tensor)
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for _, t in moved
    )
    return moved


def _inputs_to_initializers(model: onnx.ModelProto, moved: list[tuple[int, TensorProto]]) -> None:
    """Undo _deferred_to_inputs after conversion: each back at its index, typed as converted."""
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    names = {t.name for _, t in moved}
    kept = [v for v in model.graph.input if v.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for index, tensor in moved:
        tensor.data_type = types[tensor.name]
        model.graph.initializer.insert(index, tensor)


def to_fp16(
    model: onnx.ModelProto,
    keep: tuple[str, ...],
    keep_nodes: list[str],
    work: Path,
    weights: WeightStore = IN_MEMORY,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """fp16 weights/activations/I-O; `keep` categories and `keep_nodes` stay fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    fold_constant_unary(model, weights)
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
    # above 2 GB the converter's shape inference needs a path (a streamed graph holds no
    # weights: it stays in memory, where shape inference gives the same result)
    if weights is IN_MEMORY and _is_large(model):
        save_graph(model, work / "fp16-src.onnx")
        source = str(work / "fp16-src.onnx")
    moved = _deferred_to_inputs(model, set(block), weights) if weights is not IN_MEMORY else []
    converted = convert_float_to_float16(
        source,
        keep_io_types=keep_io or False,
        op_block_list=DEFAULT_OP_BLOCK_LIST,
        node_block_list=sorted(set(block)),
    )
    _inputs_to_initializers(converted, moved)
    removed = remove_fp16_round_trips(converted, set(block))
    topological_sort(converted)
    info = {"fp32_nodes": len(set(block)), "fp16_keep": list(keep), "fp16_round_trips": removed}
    return converted, info


_CHUNK_ELEMENTS = 1 << 22  # elements per step of the per-channel int8 conversion


def _int8_per_channel(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8, one scale per index of `axis` (the channel axis): scale = max|w| / 127
    over the other axis, all-zero channels get scale 1. Computed over blocks of channels, so
    the temporaries stay small next to a vocabulary-sized table (same values as at once)."""
    channels = weights.shape[axis]
    q = np.empty(weights.shape, np.int8)
    scale = np.empty(channels, np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, weights.shape[1 - axis]))
    for start in range(0, channels, step):
        index = (slice(None),) * axis + (slice(start, start + step),)
        block = weights[index]
        amax = np.abs(block).max(axis=1 - axis)
        s = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q[index] = np.clip(np.rint(block / np.expand_dims(s, 1 - axis)), -127, 127)
        scale[start : start + step] = s
    return q, scale


class _WeightsOnDemand:
    """onnxruntime's per-node int4 quantizer, given each MatMul weight only while it quantizes
    that node: a streamed graph holds no weights, so the weight is read into a graph of its own
    (the quantizer looks initializers up in the graph stack it is given) and what the quantizer
    makes there is handed to the store, then added to the real graph. (A protobuf message keeps
    the memory of every byte string ever set in it until it is freed: no weight enters the
    long-lived graph.)"""

    def __init__(self, inner: Any, weights: WeightStore) -> None:
        self.inner, self.weights = inner, weights

    def quantize(self, node: onnx.NodeProto, graph_stack: list[onnx.GraphProto]) -> Any:
        graph = graph_stack[-1]
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        tensor = next((t for t in graph.initializer if t.name == name), None) if name else None
        if tensor is None or not self.weights.deferred(tensor):
            before = len(graph.initializer)
            out = self.inner.quantize(node, graph_stack)
            self.weights.added(list(graph.initializer[before:]))
            return out
        own = onnx.GraphProto()
        weight = own.initializer.add()
        weight.name, weight.data_type = name, tensor.data_type
        weight.dims.extend(tensor.dims)
        weight.raw_data = self.weights.array(tensor).tobytes()
        out = self.inner.quantize(node, [own])
        made = list(own.initializer[1:])
        self.weights.added(made)
        graph.initializer.extend(made)
        return out


def _dequantize_initializer(
    model: onnx.ModelProto, tensor: TensorProto, axis: int, weights: WeightStore = IN_MEMORY
) -> onnx.NodeProto:
    """Replace a 2-D float initializer by its int8 per-channel form and return the
    DequantizeLinear node that recomputes it under the same name (for the caller to insert)."""
    name = tensor.name
    q, scale = _int8_per_channel(weights.array(tensor), axis)
    model.graph.initializer.remove(tensor)
    new = [
        numpy_helper.from_array(q, f"{name}_int8"),
        numpy_helper.from_array(scale, f"{name}_scale"),
        numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}_zero_point"),
    ]
    del q
    weights.added(new)  # before they are copied into the graph (see _WeightsOnDemand)
    model.graph.initializer.extend(new)
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


def quantize_embeddings(
    model: onnx.ModelProto, skip: set[str], weights: WeightStore = IN_MEMORY
) -> list[str]:
    """Gather tables (and the tied LM head sharing them) -> int8 per row + DequantizeLinear.

    Weight-only (the Gather output is float): symmetric, zero point 0, axis 0, which for a
    tied LM head is one scale per vocabulary entry, i.e. per output channel.
    """
    return _dequantize_inputs(model, set(embedding_nodes(model)) - skip, 0, 0, weights)


def _dequantize_inputs(
    model: onnx.ModelProto,
    nodes: set[str],
    index: int,
    axis: int,
    weights: WeightStore = IN_MEMORY,
) -> list[str]:
    """Input `index` (an initializer) of every node in `nodes` -> int8 per channel along `axis`
    behind a DequantizeLinear placed first in the graph; shared initializers once. Returns
    the initializer names."""
    inits = _initializers(model)
    names: list[str] = []
    for node in model.graph.node:
        if node.name in nodes and node.input[index] not in names:
            names.append(node.input[index])
    for i, name in enumerate(names):
        model.graph.node.insert(i, _dequantize_initializer(model, inits[name], axis, weights))
    return names


def to_int8_weight_only(
    model: onnx.ModelProto,
    options: QuantizeOptions,
    keep_nodes: list[str],
    weights: WeightStore = IN_MEMORY,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """int8 weights (per output channel, symmetric) behind DequantizeLinear; float activations.

    Only MatMul weights [K, N] (axis 1 = output channel); Conv and Gemm stay float (the
    vision stem and nothing else here). A weight shared by several MatMuls is quantized once.
    """
    kept = set(keep_nodes)
    op_of = {n.name: n.op_type for n in model.graph.node}
    targets = [n for n in weight_nodes(model) if n not in kept and op_of[n] == "MatMul"]
    _dequantize_inputs(model, set(targets), 1, 1, weights)
    embeddings = quantize_embeddings(model, kept, weights) if options.quantize_embeddings else []
    info = {
        "mode": "weight-only",
        "weight_nodes": len(targets),
        "activations": "float (not quantized)",
        "weights": "per-channel, symmetric",
        "embeddings_int8": embeddings,
    }
    return model, info


def to_int8_dynamic(
    model: onnx.ModelProto,
    options: QuantizeOptions,
    keep_nodes: list[str],
    work: Path,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """onnxruntime's dynamic quantization (quantize_dynamic): int8 weights per output channel,
    activations quantized at run time per tensor (uint8, DynamicQuantizeLinear), so each weight
    MatMul runs as an int8 GEMM (onnxruntime's CPU EP: DynamicQuantizeMatMul, VNNI where the CPU
    has it); no calibration. Weight MatMuls only (`MatMulConstBOnly`: attention's
    activation x activation products stay float); Conv/Gemm stay float. onnxruntime only
    (TensorRT has no DynamicQuantizeLinear)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_of = {n.name: n.op_type for n in model.graph.node}
    kept = set(keep_nodes)
    targets = [n for n in weight_nodes(model) if n not in kept and op_of[n] == "MatMul"]
    big = _is_large(model)
    src, dst = work / "int8-dynamic-src.onnx", work / "int8-dynamic.onnx"
    save_graph(model, src)
    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=targets,
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QInt8,
        use_external_data_format=big,
        # DefaultTensorType: outputs of contrib ops (the in-place decoder form's
        # GroupQueryAttention) have no inferred type; quantized graphs are fp32 (_check_source)
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT},
    )
    quantized = load_graph(dst)
    embeddings = quantize_embeddings(quantized, kept) if options.quantize_embeddings else []
    info = {
        "mode": "dynamic",
        "weight_nodes": len(targets),
        "activations": "per-tensor, uint8, quantized at run time",
        "weights": "per-channel, symmetric",
        "embeddings_int8": embeddings,
    }
    return quantized, info


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
    model: onnx.ModelProto,
    options: QuantizeOptions,
    keep_nodes: list[str],
    work: Path,
    weights: WeightStore = IN_MEMORY,
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
        # above 2 GB: convert the structure only, then reattach the weights (a streamed
        # graph holds no weights: it is the structure)
        if weights is IN_MEMORY and _is_large(model):
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
    if weights is not IN_MEMORY:
        quantizer.node_quantizer = _WeightsOnDemand(quantizer.node_quantizer, weights)
    quantizer.process()
    out = quantizer.model.model
    embeddings = (
        quantize_embeddings(out, set(keep_nodes), weights) if options.quantize_embeddings else []
    )
    info = {
        "format": "blocked DequantizeLinear (opset 21)" if qdq else "MatMulNBits (com.microsoft)",
        "block_size": options.block_size,
        "weights": "blockwise, symmetric",
        "weight_nodes": len(targets),
        "embeddings_int8": embeddings,
    }
    return out, info
