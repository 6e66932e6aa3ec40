"""Static rules an exported graph must satisfy to be buildable by TensorRT's ONNX parser.

Checked without TensorRT (CI has none): operator allowlist of the onnx-tensorrt parser, no
operator TensorRT cannot carry (ONNX Attention with past, Sequence/Optional types, integer
quantized ops, contrib domains), symmetric Q/DQ, dynamic dimensions declared by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import numpy_helper

# Operators the onnx-tensorrt parser imports (TensorRT 8.6 / 10.x, opset <= 17 semantics).
TRT_ONNX_OPS = frozenset(
    [
        "Abs",
        "Acos",
        "Acosh",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "Asin",
        "Asinh",
        "Atan",
        "Atanh",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Ceil",
        "Celu",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "Cosh",
        "CumSum",
        "DepthToSpace",
        "DequantizeLinear",
        "Div",
        "Dropout",
        "Einsum",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "EyeLike",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "GroupNormalization",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "If",
        "InstanceNormalization",
        "IsInf",
        "IsNaN",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "Loop",
        "LRN",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "Min",
        "Mod",
        "Mul",
        "Neg",
        "NonZero",
        "Not",
        "OneHot",
        "Or",
        "Pad",
        "Pow",
        "PRelu",
        "QuantizeLinear",
        "Range",
        "Reciprocal",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Relu",
        "Reshape",
        "Resize",
        "RoiAlign",
        "Round",
        "ScatterElements",
        "ScatterND",
        "Selu",
        "Shape",
        "Shrink",
        "Sigmoid",
        "Sign",
        "Sin",
        "Sinh",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tan",
        "Tanh",
        "ThresholdedRelu",
        "Tile",
        "TopK",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Where",
        "Xor",
    ]
)

# Named explicitly because they are the usual ways an exporter goes wrong for TensorRT.
FORBIDDEN_OPS = {
    "Attention": "the ONNX Attention op cannot carry past/present KV in TensorRT",
    "MultiHeadAttention": "contrib attention op (onnxruntime only)",
    "QLinearMatMul": "TensorRT takes explicit Q/DQ, not QLinear* ops",
    "QLinearConv": "TensorRT takes explicit Q/DQ, not QLinear* ops",
    "MatMulInteger": "integer matmul is not parsed by TensorRT; use Q/DQ",
    "ConvInteger": "integer conv is not parsed by TensorRT; use Q/DQ",
    "DynamicQuantizeLinear": "dynamic quantization is not parsed by TensorRT",
}


@dataclass(frozen=True)
class Violation:
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} ({self.node or 'unnamed'}): {self.reason}"


def check_graph(model: onnx.ModelProto) -> list[Violation]:
    """Every rule violation in a loaded model (external data need not be loaded)."""
    out: list[Violation] = []
    for node in model.graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            out.append(Violation(node.name, op, f"operator from domain {node.domain!r}"))
        elif op in FORBIDDEN_OPS:
            out.append(Violation(node.name, op, FORBIDDEN_OPS[op]))
        elif op.startswith(("Sequence", "Optional")) or op == "SplitToSequence":
            out.append(Violation(node.name, op, "Sequence/Optional types are not supported"))
        elif op not in TRT_ONNX_OPS:
            out.append(Violation(node.name, op, "not imported by TensorRT's ONNX parser"))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is not None and numpy_helper.to_array(zp).any():
                out.append(Violation(node.name, node.op_type, "non-zero zero point (asymmetric)"))
    return out


def dynamic_dims(model: onnx.ModelProto) -> dict[str, list[str | int]]:
    """Graph input/output shapes with symbolic dims as names (what profiles must cover)."""

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        shape = value.type.tensor_type.shape
        return [d.dim_param if d.dim_param else d.dim_value for d in shape.dim]

    return {v.name: dims(v) for v in (*model.graph.input, *model.graph.output)}
