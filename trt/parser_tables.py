"""What TensorRT's ONNX parser imports, per TensorRT version: the tables trt/rules.py checks.

Transcribed without TensorRT (none on CI or this repository's machines), as facts (op names,
opset ranges, types, restrictions), not copied, for the parsers of TensorRT 8.5 (JetPack 5.1),
8.6 (JetPack 6.0) and 10.x (JetPack 6.1/6.2 ship 10.3). Sources: onnx/onnx-tensorrt
`docs/operators.md` on branches 8.5-GA (fdeeaca, 2023-02-01), 8.6-GA (ee0b139, 2024-04-04) and
10.1-GA (96e7811, 2024-06-17: "TensorRT 10.0 supports operators in the inclusive range of opset
9 to opset 20"); its `docs/Changelog.md` (8.6 EA: GroupNormalization, LayerNormalization, IsInf,
TopK with dynamic K; 9.0 EA: INT64 no longer cast to INT32, ONNX local functions; 9.0 GA: FP8,
BF16; 10.0 EA: INT4; 10.3 GA: tensor axes inputs for Slice); the importers (8.5-GA has no
LayerNormalization importer, so the fallback fails with "Plugin not found"; the 8.6-GA/10.1-GA
Q/DQ importers refuse non-zero zero points and UINT8). "10" means the 10.0-10.3 parser (the
Jetson floor). Later 10.x parse more (opset 22 from 10.9, 24 from 10.13, the opset-23 `Attention`
op without past/present KV): a graph that passes "10" passes those too; the reverse is unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from onnx import TensorProto

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
LAYERNORM_85_REASON = (
    "not parsed natively by TensorRT 8.5 (LayerNormalization importer added in 8.6): the parser "
    "falls back to looking for a plugin named 'LayerNormalization' and fails ('Plugin not found'). "
    "Export with --opset 16 (LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div), or use "
    "JetPack 6 (TensorRT 8.6+)"
)

_T = TensorProto
# element types a quantized tensor may have (any version; ParserRules.quantized: which it takes)
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


def opset_advice() -> str:
    """Which TensorRT parsers take export's default opset 17, for `export --opset`'s help.

    Derived from RULES: opset 17 exports LayerNorm as `LayerNormalization`, which only the
    parsers listing it in `ops` import (8.5 has no importer: LAYERNORM_85_REASON).
    """
    ok = [r for r in RULES.values() if "LayerNormalization" in r.ops]
    not_ok = [r for r in RULES.values() if "LayerNormalization" not in r.ops]
    first = min(ok, key=lambda r: tuple(int(p) for p in r.version.split(".")))
    text = (
        f"ONNX opset. 17 (LayerNormalization) parses on TensorRT {first.version}+, i.e. "
        f"JetPack {first.jetpack} and later"
    )
    if not_ok:
        older = ", ".join(f"TensorRT {r.version} (JetPack {r.jetpack})" for r in not_ok)
        text += f"; {older} needs --opset 16"
    return text + "."
