"""Static check of ONNX graphs against TensorRT's ONNX parser, per TensorRT version.

Checked without TensorRT (CI and this repository's machines have none): what the onnx-tensorrt
parser of TensorRT 8.5 (JetPack 5.1), 8.6 (JetPack 6.0) and 10.x (JetPack 6.1/6.2 ship 10.3)
documents it imports. Sources, read and transcribed as facts (op names, opset ranges, types,
restrictions), not copied:

* onnx/onnx-tensorrt `docs/operators.md` on branch 8.5-GA (fdeeaca, 2023-02-01), 8.6-GA
  (ee0b139, 2024-04-04) and 10.1-GA (96e7811, 2024-06-17; its header reads "TensorRT 10.0
  supports operators in the inclusive range of opset 9 to opset 20").
* onnx/onnx-tensorrt `docs/Changelog.md`: 8.6 EA "Added support for GroupNormalization,
  LayerNormalization, IsInf", 8.6 EA "TopK with dynamic K", 9.0 EA "INT64 ... The ONNX parser no
  longer automatically casts INT64 to INT32" and "ONNX local functions", 9.0 GA "FP8 and BF16",
  10.0 EA "INT4 quantization", 10.3 GA "tensor axes inputs for Slice".
* The parsers' importers: 8.5-GA `builtin_op_importers.cpp` has no LayerNormalization importer;
  an op without importer goes to `FallbackPluginImporter`, which looks for a *plugin* named after
  the op and fails with "Plugin not found" (kUNSUPPORTED_NODE). Q/DQ importers (8.6-GA, 10.1-GA)
  refuse non-zero zero points ("TensorRT only supports symmetric quantization") and UINT8.

"10" means the 10.0-10.3 parser (the Jetson floor, JetPack 6.1/6.2). Later 10.x parse more (opset
22 from 10.9, 24 from 10.13, the opset-23 `Attention` op without past/present KV): a graph that
passes "10" passes those too; the reverse is not checked.

Findings are errors (the parser or the builder will refuse, or the result is wrong) or warnings
(it builds, but something is worth knowing). `check_export` runs every rule on every graph of an
export folder, loading the graphs without their external data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from runtime.manifest import Manifest, load_manifest, safe_join
from runtime.spec import ModelDims

from .profiles import Limits, ProfileError, check_consistency, graph_profiles

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# ---------------------------------------------------------------------------------------------
# Per-version tables (transcribed from docs/operators.md; see the module docstring)
# ---------------------------------------------------------------------------------------------


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# "Supported: Y" rows of the 8.5-GA matrix.
_OPS_85 = _names(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor GRU Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample HardSigmoid HardSwish Identity If ImageScaler
    InstanceNormalization IsNaN LRN LSTM LeakyRelu Less LessOrEqual Log LogSoftmax Loop
    LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
    Transpose Trilu Unsqueeze Upsample Where Xor
    """
)
_ADDED_86 = frozenset({"GroupNormalization", "IsInf", "LayerNormalization"})
_ADDED_10 = frozenset({"CastLike", "DeformConv", "Gelu", "Hardmax", "Mish"})

# Why an op is refused, where the generic "not in the matrix" says too little.
OP_REASONS: dict[str, str] = {
    "Attention": (
        "the ONNX Attention op (opset 23) is not parsed by TensorRT 8.5-10.3, and later 10.x parse "
        "it only without past_key/past_value/present outputs: it cannot carry the KV cache; "
        "write attention from MatMul, Softmax and Concat"
    ),
    "MultiHeadAttention": "onnxruntime contrib attention op",
    "QLinearMatMul": "TensorRT takes explicit QuantizeLinear/DequantizeLinear, not QLinear* ops",
    "QLinearConv": "TensorRT takes explicit QuantizeLinear/DequantizeLinear, not QLinear* ops",
    "MatMulInteger": "integer matmul is not parsed by TensorRT; quantize with Q/DQ around MatMul",
    "ConvInteger": "integer conv is not parsed by TensorRT; quantize with Q/DQ around Conv",
    "DynamicQuantizeLinear": "dynamic (runtime-scale) quantization is not parsed by TensorRT",
}
_LAYERNORM_85 = (
    "not parsed natively by TensorRT 8.5 (LayerNormalization importer added in 8.6): the parser "
    "falls back to looking for a plugin named 'LayerNormalization' and fails ('Plugin not found'). "
    "Export with --opset 16 (LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div), or use "
    "JetPack 6 (TensorRT 8.6+)"
)

# ONNX element types by name.
_T = TensorProto
FLOAT_TYPES = {_T.FLOAT, _T.FLOAT16}
QUANTIZED_TYPES = {_T.INT8, _T.INT4, _T.FLOAT8E4M3FN}


@dataclass(frozen=True)
class ParserRules:
    """What one TensorRT version's ONNX parser takes."""

    version: str
    release: str  # the exact release(s) this describes
    jetpack: str
    source: str
    opset_min: int
    opset_max: int
    opset_tolerated: int  # above opset_max but accepted with a warning (see note)
    opset_note: str
    ops: frozenset[str]
    dtypes: frozenset[int]  # element types the parser imports at all
    int64_native: bool  # False: INT64 is cast to INT32 (values clamped to +-INT_MAX)
    quantized: frozenset[int]  # DequantizeLinear input / QuantizeLinear output types
    weight_only_gemm: bool  # DQ(int8/int4 weight) -> GEMM with float activations (10.0 "WoQ")
    local_functions: bool
    einsum_ellipsis: bool  # Einsum equations with "..." are parsed
    # op -> {input index: restriction} for inputs that must be build-time constants
    constant_inputs: dict[str, dict[int, str]] = field(hash=False)


_CONST_COMMON = {
    "CumSum": {1: "`axis` must be an initializer"},
    "Squeeze": {1: "`axes` must be an initializer"},
    "Unsqueeze": {1: "`axes` must be a constant tensor"},
}
_CONST_SLICE = {"Slice": {3: "`axes` must be an initializer"}}
_REDUCE_OPS = _names(
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
    "ReduceSum ReduceSumSquare"
)

_RULES_85 = ParserRules(
    version="8.5",
    release="TensorRT 8.5 (JetPack 5.1.x ships 8.5.2)",
    jetpack="5.1.x",
    source="onnx/onnx-tensorrt docs/operators.md @ 8.5-GA (fdeeaca)",
    opset_min=7,
    opset_max=17,
    opset_tolerated=17,
    opset_note="TensorRT 8.5 supports operators up to opset 17",
    ops=_OPS_85,
    dtypes=frozenset(
        {_T.DOUBLE, _T.FLOAT, _T.FLOAT16, _T.INT8, _T.BOOL, _T.INT32, _T.INT64, _T.UINT8}
    ),
    int64_native=False,
    quantized=frozenset({_T.INT8}),
    weight_only_gemm=False,
    local_functions=False,
    einsum_ellipsis=False,
    constant_inputs={
        **_CONST_COMMON,
        **_CONST_SLICE,
        "TopK": {1: "`K` input must be an initializer"},
        "InstanceNormalization": {1: "`scale` must be an initializer", 2: "`B` too"},
    },
)
RULES: dict[str, ParserRules] = {
    "8.5": _RULES_85,
    # 8.6 = 8.5 plus three importers; TopK's K and InstanceNormalization's inputs may be tensors
    "8.6": replace(
        _RULES_85,
        version="8.6",
        release="TensorRT 8.6 (JetPack 6.0 ships 8.6.2)",
        jetpack="6.0",
        source="onnx/onnx-tensorrt docs/operators.md @ 8.6-GA (ee0b139)",
        opset_note="TensorRT 8.6 supports operators up to opset 17",
        ops=_OPS_85 | _ADDED_86,
        constant_inputs={**_CONST_COMMON, **_CONST_SLICE},
    ),
    "10": ParserRules(
        version="10",
        release="TensorRT 10.0-10.3 (JetPack 6.1/6.2 ship 10.3.0)",
        jetpack="6.1, 6.2",
        source=("onnx/onnx-tensorrt docs/operators.md @ 10.1-GA (96e7811) + Changelog 10.2/10.3"),
        opset_min=9,
        opset_max=20,
        opset_tolerated=21,
        opset_note=(
            "TensorRT 10.0-10.3 document opsets 9-20; opset 21 is what INT4 blocked "
            "DequantizeLinear needs and the 10.x Q/DQ importer reads it (block_size), so 21 "
            "is accepted with a warning"
        ),
        ops=_OPS_85 | _ADDED_86 | _ADDED_10,
        dtypes=frozenset(
            {
                _T.DOUBLE,
                _T.FLOAT,
                _T.FLOAT16,
                _T.BFLOAT16,
                _T.INT32,
                _T.INT64,
                _T.FLOAT8E4M3FN,
                _T.INT8,
                _T.INT4,
                _T.UINT8,
                _T.BOOL,
            }
        ),
        int64_native=True,
        quantized=frozenset({_T.INT8, _T.FLOAT8E4M3FN, _T.INT4}),
        weight_only_gemm=True,
        local_functions=True,
        einsum_ellipsis=True,
        constant_inputs={
            **_CONST_COMMON,
            **{op: {1: "`axes` must be an initializer"} for op in _REDUCE_OPS},
            "Pad": {3: "`axes` must be an initializer"},
            "Dropout": {2: "`is_training` must be an initializer and evaluate to False"},
            "OneHot": {1: "`depth` must be a build-time constant"},
        },
    ),
}
TRT_VERSIONS = tuple(RULES)

# ---------------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------------

ERROR, WARNING = "error", "warning"
RULE_ORDER = (
    "opset",
    "operators",
    "constant-inputs",
    "quantization",
    "dtypes",
    "int64",
    "profiles",
)


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    subject: str  # op type, tensor name or dim name the finding is about
    message: str
    where: str = ""  # node or tensor name

    def key(self) -> tuple[str, str, str, str]:
        return (self.rule, self.severity, self.subject, self.message)


@dataclass
class GroupedFinding:
    """Findings with the same rule/subject/message, counted (24 LayerNorms are one line)."""

    rule: str
    severity: str
    subject: str
    message: str
    count: int
    examples: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "subject": self.subject,
            "message": self.message,
            "count": self.count,
            "examples": self.examples,
        }


def group(findings: Iterable[Finding], examples: int = 3) -> list[GroupedFinding]:
    out: dict[tuple[str, str, str, str], GroupedFinding] = {}
    for f in findings:
        g = out.get(f.key())
        if g is None:
            g = out[f.key()] = GroupedFinding(f.rule, f.severity, f.subject, f.message, 0, [])
        g.count += 1
        if f.where and len(g.examples) < examples and f.where not in g.examples:
            g.examples.append(f.where)
    order = {r: i for i, r in enumerate(RULE_ORDER)}
    return sorted(
        out.values(), key=lambda g: (order.get(g.rule, 99), g.severity != ERROR, g.subject)
    )


# ---------------------------------------------------------------------------------------------
# Graph access helpers
# ---------------------------------------------------------------------------------------------


def _type_name(elem_type: int) -> str:
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


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
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
                    value = _attr(node, "value")
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


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def check_opset(model: onnx.ModelProto, rules: ParserRules) -> list[Finding]:
    opset = default_opset(model)
    subject = f"opset {opset}"
    if opset > rules.opset_tolerated:
        return [
            Finding(
                "opset",
                ERROR,
                subject,
                f"above what TensorRT {rules.version} parses ({rules.opset_note}); export with "
                f"--opset {min(rules.opset_max, 17)}",
            )
        ]
    if opset > rules.opset_max:
        return [Finding("opset", WARNING, subject, rules.opset_note)]
    if opset < rules.opset_min:
        return [
            Finding(
                "opset",
                WARNING,
                subject,
                f"below opset {rules.opset_min}: TensorRT {rules.version} does not guarantee it",
            )
        ]
    return []


def check_operators(model: onnx.ModelProto, rules: ParserRules) -> list[Finding]:
    out = []
    for node in all_nodes(model.graph):
        op, where = node.op_type, _node_name(node)
        if node.domain not in ("", "ai.onnx"):
            out.append(
                Finding(
                    "operators",
                    ERROR,
                    f"{node.domain}::{op}",
                    f"operator from domain {node.domain!r} (onnxruntime contrib ops and other "
                    "custom domains are not TensorRT ops)",
                    where,
                )
            )
        elif op.startswith(("Sequence", "Optional")) or op in (
            "SplitToSequence",
            "ConcatFromSequence",
        ):
            out.append(
                Finding(
                    "operators",
                    ERROR,
                    op,
                    "Sequence/Optional types are not supported by TensorRT",
                    where,
                )
            )
        elif op == "LayerNormalization" and op not in rules.ops:
            out.append(Finding("operators", ERROR, op, _LAYERNORM_85, where))
        elif op not in rules.ops:
            reason = OP_REASONS.get(op, f"not in TensorRT {rules.version}'s ONNX operator matrix")
            out.append(Finding("operators", ERROR, op, reason, where))
        elif op == "LayerNormalization" and sum(1 for o in node.output if o) > 1:
            out.append(
                Finding(
                    "operators",
                    ERROR,
                    op,
                    "only the first output Y is supported (Mean/InvStdDev outputs are not)",
                    where,
                )
            )
        elif op == "Einsum" and not rules.einsum_ellipsis and "..." in _attr(node, "equation", ""):
            out.append(Finding("operators", ERROR, op, "ellipsis is not supported", where))
        elif op == "ScatterND" and _attr(node, "reduction", "none") != "none":
            out.append(Finding("operators", ERROR, op, "`reduction` is not supported", where))
    if model.functions:
        names = ", ".join(f.name for f in model.functions)
        if not rules.local_functions:
            out.append(
                Finding(
                    "operators",
                    ERROR,
                    "local functions",
                    f"ONNX local functions ({names}) are parsed from TensorRT 9.0 on",
                )
            )
        for fn in model.functions:
            for node in fn.node:
                if node.domain in ("", "ai.onnx") and node.op_type not in rules.ops:
                    out.append(
                        Finding(
                            "operators",
                            ERROR,
                            node.op_type,
                            f"inside local function {fn.name!r}: not in TensorRT "
                            f"{rules.version}'s ONNX operator matrix",
                            _node_name(node),
                        )
                    )
    seq_types = [
        v.name
        for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)
        if v.type.WhichOneof("value") in ("sequence_type", "optional_type", "map_type")
    ]
    for name in seq_types:
        out.append(
            Finding(
                "operators",
                ERROR,
                "Sequence/Optional types",
                "Sequence/Optional/Map values are not supported by TensorRT",
                name,
            )
        )
    return out


def check_constant_inputs(index: GraphIndex, rules: ParserRules) -> list[Finding]:
    out = []
    for node in all_nodes(index.model.graph):
        for i, restriction in rules.constant_inputs.get(node.op_type, {}).items():
            if i < len(node.input) and node.input[i] and not index.is_constant(node.input[i]):
                out.append(
                    Finding(
                        "constant-inputs",
                        ERROR,
                        node.op_type,
                        f"{restriction} (input {i} {node.input[i]!r} is computed)",
                        _node_name(node),
                    )
                )
    return out


def _q_output_type(node: onnx.NodeProto, index: GraphIndex) -> int | None:
    """ONNX output type of a QuantizeLinear: output_dtype attr, else the zero point's type,
    else UINT8 (the spec's default)."""
    output_dtype = _attr(node, "output_dtype", 0)
    if output_dtype:
        return int(output_dtype)
    if len(node.input) > 2 and node.input[2]:
        zp = index.constant_tensor(node.input[2])
        return zp.data_type if zp is not None else None
    return TensorProto.UINT8


def check_quantization(index: GraphIndex, rules: ParserRules) -> list[Finding]:
    """Symmetric Q/DQ with supported quantized types; INT4 only as blocked weight DQ."""
    out = []
    for node in all_nodes(index.model.graph):
        op = node.op_type
        if op not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        where = _node_name(node)
        if len(node.input) > 2 and node.input[2]:
            zp = index.constant_tensor(node.input[2])
            values = index.array(zp) if zp is not None else None
            if zp is None:
                out.append(
                    Finding(
                        "quantization",
                        WARNING,
                        op,
                        "zero point is computed at runtime: symmetry cannot be checked statically",
                        where,
                    )
                )
            elif values is not None and np.any(values.astype(np.float64) != 0):
                out.append(
                    Finding(
                        "quantization",
                        ERROR,
                        op,
                        "non-zero zero point (asymmetric quantization): TensorRT only supports "
                        "symmetric Q/DQ (zero point 0)",
                        where,
                    )
                )
        if op == "QuantizeLinear":
            qtype = _q_output_type(node, index)
        else:
            src = index.constant_tensor(node.input[0])
            qtype = src.data_type if src is not None else None
            if qtype is None and len(node.input) > 2 and node.input[2]:
                zp = index.constant_tensor(node.input[2])
                qtype = zp.data_type if zp is not None else None
        if qtype is not None and qtype not in rules.quantized:
            allowed = ", ".join(sorted(_type_name(t) for t in rules.quantized))
            out.append(
                Finding(
                    "quantization",
                    ERROR,
                    f"{op} {_type_name(qtype)}",
                    f"TensorRT {rules.version} quantizes to {allowed} only"
                    + (" (UINT8 is asymmetric)" if qtype == TensorProto.UINT8 else ""),
                    where,
                )
            )
        block_size = _attr(node, "block_size", 0)
        if qtype == TensorProto.INT4 or block_size:
            if op == "QuantizeLinear" and qtype == TensorProto.INT4:
                out.append(
                    Finding(
                        "quantization",
                        ERROR,
                        op,
                        "INT4 is weight-only in TensorRT: use a blocked DequantizeLinear on an "
                        "INT4 initializer, not a QuantizeLinear of activations",
                        where,
                    )
                )
            elif op == "DequantizeLinear" and not index.is_constant(node.input[0]):
                out.append(
                    Finding(
                        "quantization",
                        ERROR,
                        op,
                        "blocked/INT4 DequantizeLinear must dequantize a constant weight",
                        where,
                    )
                )
        elif (
            op == "DequantizeLinear"
            and not rules.weight_only_gemm
            and index.is_constant(node.input[0])
            and _feeds_float_gemm(node, index)
        ):
            out.append(
                Finding(
                    "quantization",
                    WARNING,
                    "weight-only DequantizeLinear",
                    f"int8 weight into a GEMM whose activation is not quantized: TensorRT "
                    f"{rules.version} documents int8 GEMMs with Q/DQ on both inputs; weight-only "
                    "GEMMs arrive in 10.0 (it may fold the weight to float: no speed-up)",
                    where,
                )
            )
    return out


def _feeds_float_gemm(dq: onnx.NodeProto, index: GraphIndex) -> bool:
    """A DequantizeLinear output used as a MatMul/Gemm input whose other input is float."""
    for user, i in index.consumers.get(dq.output[0], []):
        if user.op_type not in ("MatMul", "Gemm") or i > 1:
            continue
        other = index.producer.get(user.input[1 - i])
        if other is None or other.op_type != "DequantizeLinear":
            return True
    return False


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor: inputs, outputs, initializers, inferred values."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is a best effort: the types below still stand
        inferred = model
    types = {}
    g = inferred.graph
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def check_dtypes(index: GraphIndex, rules: ParserRules) -> list[Finding]:
    model = index.model
    out = []
    types = _value_types(model)
    for node in all_nodes(model.graph):
        if node.op_type == "Constant":
            value = _attr(node, "value")
            if isinstance(value, onnx.TensorProto):
                types[node.output[0]] = value.data_type
        if node.op_type == "Cast":
            types.setdefault(node.output[0], int(_attr(node, "to", 0)))
    graph_io = {v.name for v in (*model.graph.input, *model.graph.output)}
    seen_unsupported: set[tuple[int, str]] = set()
    for name, t in sorted(types.items()):
        if t not in rules.dtypes:
            extra = ""
            if t in (TensorProto.INT4, TensorProto.FLOAT8E4M3FN, TensorProto.BFLOAT16):
                extra = " (INT4/FP8/BF16 need TensorRT 10, JetPack 6.1+)"
            seen_unsupported.add((t, name))
            out.append(
                Finding(
                    "dtypes",
                    ERROR,
                    _type_name(t),
                    f"TensorRT {rules.version}'s parser does not import {_type_name(t)}{extra}",
                    name,
                )
            )
        elif t == TensorProto.DOUBLE:
            out.append(
                Finding(
                    "dtypes",
                    WARNING,
                    "DOUBLE",
                    "cast down to FLOAT by the parser, values clamped to +-FLT_MAX",
                    name,
                )
            )
        elif t == TensorProto.UINT8 and name not in graph_io:
            out.append(
                Finding(
                    "dtypes",
                    ERROR,
                    "UINT8",
                    "TensorRT takes UINT8 only as a network input or output",
                    name,
                )
            )
    # Quantized types live only between Q and DQ (TensorRT: "support is available only through
    # quantization from a floating-point type").
    for name, t in types.items():
        if t not in QUANTIZED_TYPES or (t, name) in seen_unsupported:
            continue
        for consumer, i in index.consumers.get(name, []):
            zero_point = consumer.op_type == "QuantizeLinear" and i == 2
            if consumer.op_type not in ("DequantizeLinear", "Identity") and not zero_point:
                out.append(
                    Finding(
                        "dtypes",
                        ERROR,
                        _type_name(t),
                        f"quantized tensor consumed by {consumer.op_type}: TensorRT uses "
                        f"{_type_name(t)} only through Q/DQ",
                        name,
                    )
                )
    if not rules.int64_native:
        int64_io = [
            v.name
            for v in model.graph.input
            if v.type.tensor_type.elem_type == TensorProto.INT64
            and v.name not in index.initializers
        ]
        if int64_io:
            shown = ", ".join(int64_io[:4]) + (", ..." if len(int64_io) > 4 else "")
            out.append(
                Finding(
                    "dtypes",
                    WARNING,
                    "INT64 inputs",
                    f"TensorRT {rules.version} binds INT64 inputs as INT32 ({shown}): the runtime "
                    "must pass int32 (trt/engine.py does)",
                )
            )
    return out


def _slice_sentinel_only(index: GraphIndex, name: str, values: np.ndarray) -> bool:
    """INT64 +-max used as Slice starts/ends ('to the end'): clamping to INT32 keeps the meaning
    as long as every dim is < 2^31."""
    consumers = index.consumers.get(name, [])
    if not consumers or not all(n.op_type == "Slice" and i in (1, 2) for n, i in consumers):
        return False
    outside = values[(values > INT32_MAX) | (values < INT32_MIN)]
    return bool(np.all((outside >= INT64_MAX - 1) | (outside <= INT64_MIN + 1)))


def check_int64(index: GraphIndex, rules: ParserRules) -> list[Finding]:
    """TensorRT < 9 casts INT64 to INT32, clamping: constants outside int32 change meaning."""
    if rules.int64_native:
        return []
    out = []
    named = {**index.constants, **index.initializers}
    for name, tensor in sorted(named.items()):
        if tensor.data_type != TensorProto.INT64:
            continue
        values = index.array(tensor)
        if values is None:
            out.append(
                Finding(
                    "int64",
                    WARNING,
                    name,
                    "INT64 constant in external data that could not be read: range unchecked",
                    name,
                )
            )
            continue
        if values.size == 0:
            continue
        lo, hi = int(values.min()), int(values.max())
        if lo >= INT32_MIN and hi <= INT32_MAX:
            continue
        if _slice_sentinel_only(index, name, values):
            continue
        out.append(
            Finding(
                "int64",
                ERROR,
                "INT64 out of INT32 range",
                f"TensorRT {rules.version} casts INT64 to INT32 and clamps to +-INT_MAX: values "
                f"in [{lo}, {hi}] would change",
                name,
            )
        )
    return out


def check_profiles(
    model: onnx.ModelProto, graph_name: str, dims: ModelDims, limits: Limits
) -> list[Finding]:
    """Every symbolic dim of every graph input has a range in every optimization profile."""
    try:
        profiles = graph_profiles(graph_name, dims, limits)
    except ProfileError as e:
        return [Finding("profiles", ERROR, graph_name, str(e))]
    out = []
    initializers = {t.name for t in model.graph.initializer}
    for v in model.graph.input:
        if v.name in initializers or not v.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            if d.dim_param:
                missing = [p.name for p in profiles if d.dim_param not in p.dims]
                if missing:
                    out.append(
                        Finding(
                            "profiles",
                            ERROR,
                            d.dim_param,
                            f"symbolic dim of input {v.name!r} (axis {axis}) has no range in "
                            f"optimization profile(s) {missing}",
                            v.name,
                        )
                    )
            elif not d.HasField("dim_value"):
                out.append(
                    Finding(
                        "profiles",
                        ERROR,
                        f"{v.name}[{axis}]",
                        "unnamed dynamic dim: no optimization profile can name it",
                        v.name,
                    )
                )
    for p in profiles:
        for problem in check_consistency(p):
            out.append(Finding("profiles", ERROR, p.name, problem))
    return out


def check_model(
    model: onnx.ModelProto,
    version: str,
    *,
    graph_name: str | None = None,
    dims: ModelDims | None = None,
    limits: Limits | None = None,
    base_dir: Path | None = None,
) -> list[Finding]:
    """Every rule on one loaded model. Profile coverage needs graph_name, dims and limits."""
    rules = RULES[version]
    index = GraphIndex(model, base_dir)
    findings = [
        *check_opset(model, rules),
        *check_operators(model, rules),
        *check_constant_inputs(index, rules),
        *check_quantization(index, rules),
        *check_dtypes(index, rules),
        *check_int64(index, rules),
    ]
    if graph_name is not None and dims is not None and limits is not None:
        findings += check_profiles(model, graph_name, dims, limits)
    return findings


# ---------------------------------------------------------------------------------------------
# Whole export
# ---------------------------------------------------------------------------------------------


@dataclass
class GraphReport:
    name: str
    file: str
    opset: int
    nodes: int
    findings: list[GroupedFinding]

    @property
    def errors(self) -> int:
        return sum(f.count for f in self.findings if f.severity == ERROR)

    @property
    def warnings(self) -> int:
        return sum(f.count for f in self.findings if f.severity == WARNING)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "opset": self.opset,
            "nodes": self.nodes,
            "errors": self.errors,
            "warnings": self.warnings,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass
class CheckReport:
    version: str
    limits: Limits
    graphs: list[GraphReport]

    @property
    def errors(self) -> int:
        return sum(g.errors for g in self.graphs)

    @property
    def warnings(self) -> int:
        return sum(g.warnings for g in self.graphs)

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def to_dict(self) -> dict[str, Any]:
        rules = RULES[self.version]
        return {
            "trt_version": self.version,
            "release": rules.release,
            "source": rules.source,
            "limits": self.limits.to_dict(),
            "ok": self.ok,
            "errors": self.errors,
            "warnings": self.warnings,
            "graphs": {g.name: g.to_dict() for g in self.graphs},
        }

    def format(self) -> str:
        rules = RULES[self.version]
        lines = [
            f"TensorRT {self.version}: {rules.release}",
            f"  rules from {rules.source}",
            "  profiles for max_batch {max_batch}, max_images {max_images}, "
            "max_seq_len {max_seq_len}".format(**self.limits.to_dict()),
        ]
        for g in self.graphs:
            lines.append("")
            status = "ok" if not g.findings else f"{g.errors} error(s), {g.warnings} warning(s)"
            lines.append(f"{g.file}  (opset {g.opset}, {g.nodes} nodes): {status}")
            rule = None
            for f in g.findings:
                if f.rule != rule:
                    rule = f.rule
                    lines.append(f"  [{rule}]")
                times = f" x{f.count}" if f.count > 1 else ""
                lines.append(f"    {f.severity.upper():<7} {f.subject}{times}: {f.message}")
                if f.examples:
                    lines.append(f"            e.g. {', '.join(f.examples)}")
        lines.append("")
        verdict = (
            f"PASS: parsable by TensorRT {self.version} as far as static checks can tell"
            if self.ok
            else f"FAIL: TensorRT {self.version} would refuse or mis-build these graphs"
        )
        lines.append(f"{verdict} ({self.errors} error(s), {self.warnings} warning(s))")
        return "\n".join(lines)


def check_export(
    root: str | Path,
    version: str,
    *,
    max_batch: int | None = None,
    max_images: int | None = None,
    max_seq_len: int | None = None,
    manifest: Manifest | None = None,
) -> CheckReport:
    """Check every graph of an export folder against one TensorRT version's parser."""
    if version not in RULES:
        raise ValueError(f"unknown TensorRT version {version!r} (known: {', '.join(RULES)})")
    root = Path(root)
    manifest = manifest or load_manifest(root, verify_hashes=False)
    dims = ModelDims.from_config(manifest.model)
    limits = Limits.resolve(manifest.limits, max_batch, max_images, max_seq_len)
    reports = []
    for name, entry in manifest.graphs.items():
        path = safe_join(root, entry.file)
        model = onnx.load(os.fspath(path), load_external_data=False)
        findings = check_model(
            model, version, graph_name=name, dims=dims, limits=limits, base_dir=root
        )
        reports.append(
            GraphReport(
                name,
                entry.file,
                default_opset(model),
                sum(1 for _ in all_nodes(model.graph)),
                group(findings),
            )
        )
    return CheckReport(version, limits, reports)


# ---------------------------------------------------------------------------------------------
# The quick gate of the export tests and quantize: TensorRT 10's operator and Q/DQ rules
# ---------------------------------------------------------------------------------------------

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
