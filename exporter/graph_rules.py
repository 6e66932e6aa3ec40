"""Version-agnostic TensorRT rules for exported graphs (the export tests' quick gate).

A thin view of `exporter.trt_rules` for the newest parser the project targets (TensorRT 10):
operator matrix, operators TensorRT cannot carry (ONNX Attention with past KV, Sequence/Optional,
integer-quantized ops, contrib domains) and symmetric Q/DQ. `flamingo-export check` runs the full
per-version rules (opset, types, INT64 range, profile coverage) on an export folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .trt_rules import (
    ERROR,
    OP_REASONS,
    RULES,
    GraphIndex,
    check_operators,
    check_quantization,
)

# Operators the onnx-tensorrt parser of TensorRT 10.0-10.3 imports (docs/operators.md).
TRT_ONNX_OPS = RULES["10"].ops
# Named explicitly because they are the usual ways an exporter goes wrong for TensorRT.
FORBIDDEN_OPS = OP_REASONS


@dataclass(frozen=True)
class Violation:
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} ({self.node or 'unnamed'}): {self.reason}"


def check_graph(model: onnx.ModelProto) -> list[Violation]:
    """Every rule violation in a loaded model (external data need not be loaded)."""
    rules = RULES["10"]
    findings = [
        *check_operators(model, rules),
        *check_quantization(GraphIndex(model), rules),
    ]
    return [Violation(f.where, f.subject, f.message) for f in findings if f.severity == ERROR]


def dynamic_dims(model: onnx.ModelProto) -> dict[str, list[str | int]]:
    """Graph input/output shapes with symbolic dims as names (what profiles must cover)."""

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        shape = value.type.tensor_type.shape
        return [d.dim_param if d.dim_param else d.dim_value for d in shape.dim]

    return {v.name: dims(v) for v in (*model.graph.input, *model.graph.output)}
