"""Read-only access to a loaded ONNX model for the TensorRT checks: nodes (subgraphs included),
attributes, constants, producers and consumers, without loading external data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from runtime.manifest import safe_join


def type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Nodes of a graph and of its If/Loop/Scan bodies, depth first."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from all_nodes(sub)


def node_name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """An attribute's value (strings decoded), or default."""
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


class GraphIndex:
    """Constants, producers and consumers of a loaded model (external data not loaded)."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None = None) -> None:
        self.model = model
        self.base_dir = base_dir
        graph = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.constants: dict[str, onnx.TensorProto] = {}  # Constant node outputs
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        graphs = [graph]
        while graphs:
            g = graphs.pop()
            for t in g.initializer:
                self.initializers[t.name] = t
            for node in g.node:
                for i, name in enumerate(node.input):
                    if name:
                        self.consumers.setdefault(name, []).append((node, i))
                for name in node.output:
                    self.producer[name] = node
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    value = attribute(node, "value")
                    if isinstance(value, onnx.TensorProto):
                        self.constants[node.output[0]] = value
                graphs.extend(_subgraphs(node))

    def is_constant(self, name: str) -> bool:
        """What the parser imports as weights: initializers and Constant node outputs."""
        return name in self.initializers or name in self.constants

    def constant_tensor(self, name: str) -> onnx.TensorProto | None:
        return self.initializers.get(name) or self.constants.get(name)

    def array(self, tensor: onnx.TensorProto) -> np.ndarray | None:
        """Values of a tensor; external data is read from its file region (small int tensors
        only are asked for), None when it cannot be read."""
        if tensor.data_location == TensorProto.EXTERNAL:
            if self.base_dir is None:
                return None
            info = {e.key: e.value for e in tensor.external_data}
            try:
                path = safe_join(self.base_dir, info["location"])
                offset = int(info.get("offset", 0))
                length = int(info.get("length", 0)) or None
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                with open(path, "rb") as f:
                    f.seek(offset)
                    raw = f.read(length) if length else f.read()
                return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
            except (OSError, ValueError, KeyError):
                return None
        return numpy_helper.to_array(tensor)


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0
