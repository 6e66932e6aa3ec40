"""Static check of ONNX graphs against TensorRT's ONNX parser, per TensorRT version.

Checked without TensorRT, against the per-version tables of trt/parser_tables.py (sources
there). Findings are errors (the parser or the builder will refuse, or the result is wrong) or
warnings (it builds, but something is worth knowing). `check_export` runs every rule on every
graph of an export folder, loading the graphs without their external data, and returns a
trt/report.py `CheckReport`; `check_graph` is the quick gate of the export tests and quantize.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from runtime.manifest import Manifest, load_manifest, safe_join
from runtime.spec import DecoderForm, ModelDims

from .graph_index import GraphIndex, all_nodes, attribute, default_opset, node_name, type_name
from .parser_tables import LAYERNORM_85_REASON, OP_REASONS, QUANTIZED_TYPES, RULES, ParserRules
from .profiles import Limits, ProfileError, check_consistency, graph_profiles
from .report import ERROR, WARNING, CheckReport, Finding, GraphReport, group

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


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
        op, where = node.op_type, node_name(node)
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
            out.append(Finding("operators", ERROR, op, LAYERNORM_85_REASON, where))
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
        elif (
            op == "Einsum"
            and not rules.einsum_ellipsis
            and "..." in attribute(node, "equation", "")
        ):
            out.append(Finding("operators", ERROR, op, "ellipsis is not supported", where))
        elif op == "ScatterND" and attribute(node, "reduction", "none") != "none":
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
                            node_name(node),
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
                        node_name(node),
                    )
                )
    return out


def _q_output_type(node: onnx.NodeProto, index: GraphIndex) -> int | None:
    """ONNX output type of a QuantizeLinear: output_dtype attr, else the zero point's type,
    else UINT8 (the spec's default)."""
    output_dtype = attribute(node, "output_dtype", 0)
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
        where = node_name(node)
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
            allowed = ", ".join(sorted(type_name(t) for t in rules.quantized))
            out.append(
                Finding(
                    "quantization",
                    ERROR,
                    f"{op} {type_name(qtype)}",
                    f"TensorRT {rules.version} quantizes to {allowed} only"
                    + (" (UINT8 is asymmetric)" if qtype == TensorProto.UINT8 else ""),
                    where,
                )
            )
        block_size = attribute(node, "block_size", 0)
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
            value = attribute(node, "value")
            if isinstance(value, onnx.TensorProto):
                types[node.output[0]] = value.data_type
        if node.op_type == "Cast":
            types.setdefault(node.output[0], int(attribute(node, "to", 0)))
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
                    type_name(t),
                    f"TensorRT {rules.version}'s parser does not import {type_name(t)}{extra}",
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
                        type_name(t),
                        f"quantized tensor consumed by {consumer.op_type}: TensorRT uses "
                        f"{type_name(t)} only through Q/DQ",
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


def form_finding(form: DecoderForm) -> Finding:
    """The error of a decoder graph in a form TensorRT does not take (runtime.spec.DecoderForm:
    only the portable form has TensorRT's inputs and parseable ops)."""
    words = ",".join(w for w in (form.kv_cache, form.indices) if w not in ("concat", "inputs"))
    return Finding(
        "decoder-form",
        ERROR,
        words,
        f"decoder form '{words}' runs on onnxruntime only; re-export with --decoder-form "
        "portable for TensorRT (the findings below follow from the form)",
    )


def check_export(
    root: str | Path,
    version: str,
    *,
    max_batch: int | None = None,
    max_images: int | None = None,
    max_seq_len: int | None = None,
    manifest: Manifest | None = None,
    max_frames: int | None = None,
) -> CheckReport:
    """Check every graph of an export folder against one TensorRT version's parser."""
    if version not in RULES:
        raise ValueError(f"unknown TensorRT version {version!r} (known: {', '.join(RULES)})")
    root = Path(root)
    manifest = manifest or load_manifest(root, verify_hashes=False)
    dims = ModelDims.from_config(manifest.model)
    limits = Limits.resolve(manifest.limits, max_batch, max_images, max_seq_len, max_frames)
    reports = []
    for name, entry in manifest.graphs.items():
        path = safe_join(root, entry.file)
        model = onnx.load(os.fspath(path), load_external_data=False)
        findings = check_model(
            model, version, graph_name=name, dims=dims, limits=limits, base_dir=root
        )
        if not entry.form.portable:  # say why before the parser's findings follow from it
            findings.insert(0, form_finding(entry.form))
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
