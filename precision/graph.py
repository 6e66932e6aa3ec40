"""ONNX graph access the precision rewrites share: load/save (external data past the protobuf
limit), node naming and matching, weight/norm/logits node sets, spec from a graph, and the
`WeightStore` hook through which the streamed export feeds weights one at a time."""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.export import (
    ONNX_PROTO_LIMIT,
)
from runtime.spec import GraphSpec

from .options import (
    _LAYOUT_OPS,
    WEIGHT_OPS,
    QuantizeError,
)


class WeightStore:
    """Where the rewrites read initializer values and put the ones they create.

    The default holds everything in the graph (today's fp32 -> quantize route); the streaming
    export (precision.streaming) reads each weight from the checkpoint when a rewrite asks for
    it and moves large new initializers out of memory as they are made."""

    def deferred(self, tensor: TensorProto) -> bool:
        """Whether the initializer's values are not in the graph (read through `array`)."""
        return False

    def array(self, tensor: TensorProto) -> np.ndarray:
        return numpy_helper.to_array(tensor)

    def added(self, tensors: list[TensorProto]) -> None:
        """New initializers a rewrite just put into the graph."""


IN_MEMORY = WeightStore()


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


def fold_constant_unary(model: onnx.ModelProto, weights: WeightStore = IN_MEMORY) -> int:
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
        value = fn(weights.array(src).astype(np.float64)).astype(np.float32)
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


def exceeds_proto_limit(payload_bytes: int) -> bool:
    """Whether a graph with this many initializer bytes is saved with external data."""
    return payload_bytes >= ONNX_PROTO_LIMIT - (64 << 20)


def _is_large(model: onnx.ModelProto) -> bool:
    return exceeds_proto_limit(_payload_bytes(model))
