"""quantize/sensitivity inputs checked before the slow part: --keep-node globs that match no
node, unusable calibration caches, bad --budget values; all one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import main
from precision.quantize import QuantizeError, QuantizeOptions, check_keep_nodes, graph_node_names
from runtime.manifest import load_manifest


def _cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_keep_node_patterns_must_match(tiny_export, tmp_path) -> None:
    src = tiny_export("llama")
    manifest = load_manifest(src)
    names = graph_node_names(src / "decoder.onnx")
    check_keep_nodes(src, manifest, (names[3], "*MatMul*"))  # real names and globs pass
    for pattern in ("MatMull_1*", "[", "nothing"):
        with pytest.raises(QuantizeError) as info:
            check_keep_nodes(src, manifest, ("*MatMul*", pattern))
        assert f"--keep-node {pattern!r} matches no node" in str(info.value)
    result = _cli("quantize", str(src), "--precision", "int4", "--keep-node", "MatMull_1*",
                  "-o", str(tmp_path / "q"))  # fmt: skip
    assert result.exit_code == 1 and "matches no node in vision.onnx or decoder.onnx" in (
        result.output
    )
    assert list(tmp_path.iterdir()) == []


def test_calibration_cache_checked_up_front(tiny_export, tmp_path) -> None:
    cache = tmp_path / "cache"
    good = QuantizeOptions(vision="int8", decoder="int8", calibration_cache=str(cache))
    good.validate()  # absent: calibrated and written later
    (tmp_path / "cache.vision.json").write_text("{oops")
    with pytest.raises(QuantizeError, match=r"cache\.vision\.json: invalid JSON"):
        good.validate()
    (tmp_path / "cache.vision.json").write_text("[1]")
    with pytest.raises(QuantizeError, match=r"not a calibration cache .*delete it to recalibrate"):
        good.validate()
    (tmp_path / "cache.vision.json").unlink()
    (tmp_path / "cache.decoder.json").mkdir()
    with pytest.raises(QuantizeError, match=r"cache\.decoder\.json: not a file"):
        good.validate()
    # weight-only int8 and fp16 read no cache: nothing to check
    QuantizeOptions(vision="fp16", decoder="int8", int8_mode="weight-only",
                    calibration_cache=str(cache)).validate()  # fmt: skip
    with pytest.raises(QuantizeError, match="--keep-node keeps nodes out of a reduced"):
        QuantizeOptions(vision="fp32", decoder="fp32", keep_nodes=("x",)).validate()
    result = _cli("quantize", str(tiny_export("mpt")), "--precision", "int8",
                  "--calibration-cache", str(cache), "-o", str(tmp_path / "q"))  # fmt: skip
    assert result.exit_code == 2 and "not a file" in result.output


def test_cache_from_another_method_is_refused(tiny_export, tmp_path) -> None:
    """A cache onnxruntime reads but cannot use (other calibration method) names the file."""
    cache = tmp_path / "c"
    base = ["quantize", str(tiny_export("mpt")), "--vision-precision", "int8",
            "--decoder-precision", "fp32", "--calibration-episodes", "1",
            "--calibration-decode-steps", "0", "--calibration-cache", str(cache)]  # fmt: skip
    assert _cli(*base, "-o", str(tmp_path / "a")).exit_code == 0
    assert json.loads((tmp_path / "c.vision.json").read_text())
    result = _cli(*base, "--calibration-method", "entropy", "-o", str(tmp_path / "b"))
    assert result.exit_code == 1
    assert "c.vision.json: not a usable calibration cache" in result.output
    assert not (tmp_path / "b").exists()


def test_sensitivity_budget_is_an_option_error(tiny_export, tmp_path) -> None:
    result = _cli("sensitivity", str(tiny_export("mpt")), "--precision", "int4",
                  "--budget", "foo=bar", "-o", str(tmp_path / "s"))  # fmt: skip
    assert result.exit_code != 0 and "bad threshold 'foo=bar'" in result.output
