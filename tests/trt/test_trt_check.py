"""`flamingo-export check`: the tiny exports against each TensorRT parser, the TensorRT 8.5 +
LayerNormalization finding and its --opset 16 workaround, and hand-made graphs every rule must
refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from cli.main import main
from runtime.manifest import load_manifest
from runtime.spec import ModelDims
from tests.conftest import FAMILIES
from trt.profiles import Limits
from trt.rules import ERROR, WARNING, Finding, check_export, check_graph, check_model

F = TensorProto.FLOAT


def _errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets)


def _x(name: str = "x", dtype: int = F, shape=(2, 4)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


# ---------------------------------------------------------------------------------------------
# The tiny exports
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_exports_pass_tensorrt_10_and_86(tiny_export, family: str) -> None:
    out = tiny_export(family)
    for version in ("10", "8.6"):
        report = check_export(out, version)
        assert report.ok, report.format()
        assert [g.name for g in report.graphs] == ["vision", "decoder"]
    assert check_export(out, "10").warnings == 0
    # TensorRT 8.x binds the int64 inputs as int32: said once, as a warning (not a failure)
    notes = [f for g in check_export(out, "8.6").graphs for f in g.findings]
    assert [(f.severity, f.subject) for f in notes] == [(WARNING, "INT64 inputs")]
    result = CliRunner().invoke(main, ["check", str(out), "--trt-version", "10"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output


@pytest.mark.parametrize("family", FAMILIES)
def test_tensorrt_85_rejects_layernormalization_of_opset_17_exports(tiny_export, family) -> None:
    """A real finding: TensorRT 8.5 (JetPack 5) has no LayerNormalization importer."""
    out = tiny_export(family)
    report = check_export(out, "8.5")
    assert not report.ok
    errors = [f for g in report.graphs for f in g.findings if f.severity == ERROR]
    assert {f.subject for f in errors} == {"LayerNormalization"}
    vision = next(g for g in report.graphs if g.name == "vision")
    ln = next(f for f in vision.findings if f.subject == "LayerNormalization")
    assert ln.count == 2 * 2 + 1 + 6 * 3 + 1  # 2 ViT blocks x 2, ln_pre, resampler 6 x 3, norm
    assert "8.6" in ln.message and "--opset 16" in ln.message and "plugin" in ln.message
    result = CliRunner().invoke(main, ["check", str(out), "--trt-version", "8.5"])
    assert result.exit_code == 1
    assert "LayerNormalization x" in result.output and "FAIL" in result.output
    data = json.loads(
        CliRunner().invoke(main, ["check", str(out), "--trt-version", "8.5", "--json"]).output
    )
    assert data["ok"] is False and data["trt_version"] == "8.5"
    assert data["errors"] == report.errors > 0


def test_opset_16_export_passes_tensorrt_85_and_computes_the_same(tiny_model, tmp_path) -> None:
    """The JetPack 5 workaround: opset 16 decomposes LayerNorm; same outputs on onnxruntime."""
    from exporter.export import ExportOptions, export_model
    from runtime.engine import OnnxFlamingo

    model, tok, _, _ = tiny_model("mpt")
    outs = {}
    for opset in (16, 17):
        out = tmp_path / f"opset{opset}"
        export_model(model, tok, out, ExportOptions(opset=opset), progress=None)
        outs[opset] = out
    report = check_export(outs[16], "8.5")
    assert report.ok, report.format()
    ops = {
        n.op_type
        for n in onnx.load(str(outs[16] / "vision.onnx"), load_external_data=False).graph.node
    }
    assert "LayerNormalization" not in ops
    a, b = OnnxFlamingo(outs[16]), OnnxFlamingo(outs[17])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    fa, fb = a.encode_images(pixels), b.encode_images(pixels)
    for name in fa:
        assert np.abs(fa[name] - fb[name]).max() < 1e-5, name
    kv = a.rows_cross_kv(fa, [[0, 1]])
    ids = np.array([[tok.convert_tokens_to_ids("<image>"), 5, 6, 7]], dtype=np.int64)
    mask = np.ones_like(ids)
    la = a.step_model(kv, np.array([2])).run(ids, mask)
    lb = b.step_model(kv, np.array([2])).run(ids, mask)
    assert np.abs(la - lb).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Hand-made graphs each rule must refuse
# ---------------------------------------------------------------------------------------------


def test_onnx_attention_op_is_rejected_with_the_kv_reason() -> None:
    q = _x("q", shape=(1, 2, 3, 4))
    node = helper.make_node("Attention", ["q", "q", "q"], ["y"])
    model = _model([node], [q], [_x("y", shape=(1, 2, 3, 4))], opset=23)
    for version in ("8.5", "8.6", "10"):
        errors = _errors(check_model(model, version))
        att = [f for f in errors if f.subject == "Attention"]
        assert att and "past" in att[0].message and "MatMul" in att[0].message
        assert any(f.rule == "opset" for f in errors)  # opset 23 is beyond every table


def test_sequence_ops_and_types_are_rejected() -> None:
    node = helper.make_node("SequenceConstruct", ["x"], ["s"])
    seq_out = helper.make_tensor_sequence_value_info("s", F, [2, 4])
    model = _model([node], [_x()], [seq_out])
    errors = _errors(check_model(model, "10"))
    assert {"SequenceConstruct", "Sequence/Optional types"} <= {f.subject for f in errors}


def test_asymmetric_quantize_linear_is_rejected() -> None:
    scale = helper.make_tensor("scale", F, [], [0.1])
    zp = helper.make_tensor("zp", TensorProto.INT8, [], [3])
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q0")
    model = _model([node], [_x()], [_x("q", TensorProto.INT8)], [scale, zp])
    for version in ("8.5", "8.6", "10"):
        errors = _errors(check_model(model, version))
        assert [(f.rule, f.where) for f in errors] == [("quantization", "q0")]
        assert "symmetric" in errors[0].message
    assert any("asymmetric" in v.reason for v in check_graph(model))  # the export-test gate
    # symmetric (zero point 0) passes
    zp0 = helper.make_tensor("zp", TensorProto.INT8, [], [0])
    ok = _model([node], [_x()], [_x("q", TensorProto.INT8)], [scale, zp0])
    assert _errors(check_model(ok, "8.5")) == []


def test_uint8_quantization_without_zero_point_is_rejected() -> None:
    scale = helper.make_tensor("scale", F, [], [0.1])
    node = helper.make_node("QuantizeLinear", ["x", "scale"], ["q"])  # ONNX default: UINT8
    model = _model([node], [_x()], [_x("q", TensorProto.UINT8)], [scale])
    errors = _errors(check_model(model, "10"))
    assert any(f.subject == "QuantizeLinear UINT8" for f in errors)


def test_matmulinteger_is_rejected() -> None:
    a = _x("a", TensorProto.INT8)
    w = helper.make_tensor("w", TensorProto.INT8, [4, 3], [1] * 12)
    node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
    model = _model([node], [a], [_x("y", TensorProto.INT32, (2, 3))], [w])
    for version in ("8.5", "10"):
        errors = _errors(check_model(model, version))
        assert any(f.subject == "MatMulInteger" and "Q/DQ" in f.message for f in errors)
    assert check_graph(model)[0].op_type == "MatMulInteger"


def test_contrib_domain_op_is_rejected() -> None:
    node = helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")
    model = _model([node], [_x(shape=(4, 4))], [_x("y", shape=(4, 4))], domains=["com.microsoft"])
    errors = _errors(check_model(model, "10"))
    assert [f.subject for f in errors] == ["com.microsoft::FusedMatMul"]


def test_opset_21_is_refused_by_86_and_only_warned_by_10() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_x("y")], opset=21)
    errors = _errors(check_model(model, "8.6"))
    assert [(f.rule, f.subject) for f in errors] == [("opset", "opset 21")]
    assert "17" in errors[0].message
    findings = check_model(model, "10")
    assert [(f.rule, f.severity) for f in findings] == [("opset", WARNING)]
    model22 = _model([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_x("y")], opset=22)
    assert _errors(check_model(model22, "10"))


def test_int4_blocked_dequantize_is_tensorrt_10_only() -> None:
    w = helper.make_tensor("w", TensorProto.INT4, [4, 256], [1] * 1024)
    scale = helper.make_tensor("s", TensorProto.FLOAT16, [4, 2], [1.0] * 8)
    dq = helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=1, block_size=128)
    mm = helper.make_node("MatMul", ["x", "wf"], ["y"])
    x = _x("x", TensorProto.FLOAT16, (2, 4))
    y = _x("y", TensorProto.FLOAT16, (2, 256))
    model = _model([dq, mm], [x], [y], [w, scale], opset=21)
    assert _errors(check_model(model, "10")) == []
    errors = _errors(check_model(model, "8.6"))
    assert {f.rule for f in errors} >= {"opset", "dtypes", "quantization"}
    assert any("TensorRT 10" in f.message for f in errors if f.rule == "dtypes")


def test_symbolic_dim_without_profile_is_rejected(tiny_export) -> None:
    manifest = load_manifest(tiny_export("llama"), verify_hashes=False)
    dims = ModelDims.from_config(manifest.model)
    limits = Limits.resolve(manifest.limits)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "chunk"])
    unnamed = helper.make_tensor_value_info("extra", F, [None, 4])
    node = helper.make_node("Identity", ["input_ids"], ["y"])
    model = _model([node], [ids, unnamed], [_x("y", TensorProto.INT64, ("batch", "chunk"))])
    errors = _errors(check_model(model, "10", graph_name="decoder", dims=dims, limits=limits))
    assert [(f.rule, f.subject) for f in errors] == [
        ("profiles", "chunk"),
        ("profiles", "extra[0]"),
    ]
    assert "prefill" in errors[0].message and "decode" in errors[0].message


def test_int64_initializer_beyond_int32_is_rejected_before_tensorrt_9() -> None:
    big = helper.make_tensor("big", TensorProto.INT64, [1], [2**31 + 5])
    node = helper.make_node("Add", ["x", "big"], ["y"])
    x = _x("x", TensorProto.INT64, (1,))
    model = _model([node], [x], [_x("y", TensorProto.INT64, (1,))], [big])
    for version in ("8.5", "8.6"):
        errors = _errors(check_model(model, version))
        assert [(f.rule, f.where) for f in errors] == [("int64", "big")]
        assert str(2**31 + 5) in errors[0].message
    assert _errors(check_model(model, "10")) == []  # INT64 is native from TensorRT 9
    # INT64_MAX as a Slice end means "to the end": clamping keeps it, no finding
    ends = helper.make_tensor("ends", TensorProto.INT64, [1], [2**63 - 1])
    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    sl = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])
    model = _model([sl], [_x()], [_x("y", shape=(2, 3))], [starts, ends, axes])
    assert _errors(check_model(model, "8.5")) == []


def test_external_int64_constant_is_read_from_its_file(tmp_path: Path) -> None:
    values = np.array([1, 2**40], dtype=np.int64)
    big = onnx.numpy_helper.from_array(values, "big")
    node = helper.make_node("Add", ["x", "big"], ["y"])
    x = _x("x", TensorProto.INT64, (2,))
    model = _model([node], [x], [_x("y", TensorProto.INT64, (2,))], [big])
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)  # fmt: skip
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    errors = _errors(check_model(loaded, "8.6", base_dir=tmp_path))
    assert [f.rule for f in errors] == ["int64"]
    assert str(2**40) in errors[0].message


def test_per_op_restrictions() -> None:
    shape = helper.make_node("Shape", ["x"], ["s"])
    sl = helper.make_node("Slice", ["s", "one", "two"], ["axes"])
    unsq = helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="u")
    one = helper.make_tensor("one", TensorProto.INT64, [1], [0])
    two = helper.make_tensor("two", TensorProto.INT64, [1], [1])
    model = _model([shape, sl, unsq], [_x()], [_x("y", shape=(1, 2, 4))], [one, two])
    errors = _errors(check_model(model, "10"))
    assert [(f.rule, f.where) for f in errors] == [("constant-inputs", "u")]
    ln = helper.make_node(
        "LayerNormalization", ["x", "g"], ["y", "mean", "inv"], axis=-1, name="ln"
    )
    g = helper.make_tensor("g", F, [4], [1.0] * 4)
    model = _model([ln], [_x()], [_x("y"), _x("mean", shape=(2, 1)), _x("inv", shape=(2, 1))], [g])
    errors = _errors(check_model(model, "10"))
    assert [(f.subject, f.where) for f in errors] == [("LayerNormalization", "ln")]
    assert "first output" in errors[0].message


def test_double_is_a_warning_and_bf16_an_error_before_10() -> None:
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)
    model = _model([node], [_x()], [_x("y", TensorProto.DOUBLE)])
    findings = check_model(model, "8.6")
    assert {(f.severity, f.subject) for f in findings} == {(WARNING, "DOUBLE")}
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)
    model = _model([node], [_x()], [_x("y", TensorProto.BFLOAT16)])
    assert {f.subject for f in _errors(check_model(model, "8.6"))} == {"BFLOAT16"}
    assert _errors(check_model(model, "10")) == []


def test_check_cli_errors_are_clean(tiny_export, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["check", str(tmp_path)])
    assert result.exit_code != 0 and "not an export folder" in result.output
    out = tiny_export("gpt_neox")
    result = runner.invoke(main, ["check", str(out), "--max-seq-len", "999999"])
    assert result.exit_code != 0 and "exceeds the export's max_seq_len" in result.output
    result = runner.invoke(main, ["check", str(out), "--trt-version", "9"])
    assert result.exit_code == 2  # click: not one of 8.5, 8.6, 10


def test_check_cli_offers_every_version_with_parser_tables() -> None:
    """`--trt-version` lists the versions trt/parser_tables.py describes (trt.targets keeps them
    free of onnx, so that `flamingo-export` starts without importing it)."""
    from cli.trt import check
    from trt.parser_tables import RULES

    (option,) = [p for p in check.params if p.name == "trt_version"]
    assert list(option.type.choices) == list(RULES)
