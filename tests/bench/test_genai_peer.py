"""benchmarks/genai_peer.py: onnxruntime-genai drives the in-graph indices decoder form of each
LM family to our runtime's greedy tokens (its shared KV buffer on the in-place form too); the
--json report carries its fields. Timings are reported, never asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import FAMILIES

pytest.importorskip("onnxruntime_genai")  # installed by `make venv` (the bench extra)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import genai_peer  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", ["in-graph", "inplace,in-graph"])
def test_genai_decodes_our_tokens(tiny_export: Callable, family: str, form: str, tmp_path) -> None:
    parser_args = [str(tiny_export(family)), "--form", form, "--shots", "2"]
    parser_args += ["--max-new-tokens", "12", "--repeats", "1", "--threads", "1"]
    report = genai_peer.run(genai_peer.parse_args(parser_args), tmp_path)
    assert report["tokens_identical"] is True
    assert len(report["ours"]["tokens"]) == 12
    assert report["ours"]["tokens"] == report["genai"]["tokens"]
    assert math.isfinite(report["speed_ratio"]) and report["speed_ratio"] > 0
    paired = report["speed_ratio_paired"]
    assert 0 < paired["min"] <= paired["median"] <= paired["max"]


@pytest.mark.slow
def test_genai_peer_json_on_the_demo_export(demo_export: Path) -> None:
    """The script as documented: one JSON object on stdout, exit 0 when tokens are identical."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "genai_peer.py"), str(demo_export), "--json",
         "--max-new-tokens", "8", "--repeats", "1"],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["tokens_identical"] is True
    for key in ("speed_ratio", "end_to_end_ratio"):
        assert math.isfinite(report[key]) and report[key] > 0
    assert report["form"] == {"kv_cache": "concat", "indices": "in-graph"}
    assert report["threads"] >= 1 and report["cpu"]


def test_decode_forms_bench_reports_each_form(tiny_export: Callable, capsys) -> None:
    """benchmarks/decode_forms_bench.py: both forms decode the same tokens at each shot count,
    every figure is there and finite (timings never asserted)."""
    import decode_forms_bench

    args = [str(tiny_export("mpt")), "--shots", "0,2", "--repeats", "2", "--json"]
    more = ["--max-new-tokens", "4", "--threads", "1", "--probe-mb", "64"]
    assert decode_forms_bench.main([*args, *more]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["shots"] for r in report["rows"]] == [0, 2]
    for row in report["rows"]:
        assert row["tokens_identical"] is True
        for form in ("portable", "inplace"):
            figures = row[form]
            for key, v in figures.items():
                values = v if isinstance(v, list) else [v]
                assert all(math.isfinite(x) for x in values), key
                if key != "outside_run_ms":  # a difference of two timings: may be <= 0
                    assert all(x > 0 for x in values), key
            assert len(figures["repeat_ms_per_token"]) == 2  # one per repeat
            low, high = figures["vs_weights_floor_range"]
            assert low <= figures["vs_weights_floor"] <= high
    assert len(report["bandwidth_probes"]) == 2  # each repeat measured its own bandwidth
    assert report["floor_ms"] > 0 and report["cpu"]


def test_decode_forms_bench_times_each_precision_and_form(
    tiny_export: Callable, capsys, tmp_path: Path
) -> None:
    """`--precision`: each precision x form is timed; the forms of one precision give its
    tokens exactly, and each precision has its own weight floor (int8 reads fewer bytes)."""
    import decode_forms_bench

    args = [str(tiny_export("llama")), "--shots", "1", "--repeats", "1", "--json"]
    more = ["--precision", "fp32,int8-weight-only", "--workdir", str(tmp_path), "--probe-mb", "64"]
    assert decode_forms_bench.main([*args, *more, "--max-new-tokens", "4", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["rows"]
    assert row["tokens_identical"] is True
    names = [f"{p} {f}" for p in ("fp32", "int8-weight-only") for f in ("portable", "inplace")]
    assert all(row[n]["decode_ms_per_token"] > 0 for n in names)
    weights = report["weights_per_step_bytes_by_precision"]
    assert 0 < weights["int8-weight-only"] < weights["fp32"] / 2
    for n in names:
        precision = n.split()[0]
        floor = weights[precision] / (report["bandwidth_gbs"] * 1e9) * 1e3
        assert row[n]["floor_ms"] == pytest.approx(floor, rel=1e-2, abs=1e-3)


def test_bandwidth_probe_reads_at_a_finite_rate() -> None:
    """benchmarks/bandwidth.py: both readers report a positive rate, `gbs` the higher."""
    from bandwidth import ReadProbe

    probe = ReadProbe(threads=2, size_bytes=32 << 20)
    try:
        out = probe.measure(repeats=1)
    finally:
        probe.close()
    rates = (out["numpy_max_gbs"], out["onnxruntime_gemv_gbs"])
    assert all(math.isfinite(r) and r > 0 for r in rates)
    assert out["gbs"] == max(rates)


def test_bandwidth_cli_json_names_the_machine(capsys) -> None:
    """`bandwidth.py --json`: the rounds, their median/min/max, and the CPU, threads, load
    average and date every figure must carry."""
    import bandwidth

    assert bandwidth.main(["--threads", "1", "--rounds", "2", "--size-mb", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["rounds"]) == 2 and report["threads"] == 1
    assert report["min_gbs"] <= report["median_gbs"] <= report["max_gbs"]
    assert report["cpu"] and report["date"] and len(report["loadavg"]) == 3


@pytest.mark.parametrize(
    "args",
    [["--probe-mb", "0"], ["--repeats", "0"], ["--max-new-tokens", "1"], ["--shots", "x"],
     ["--forms", "bogus"], ["--threads", "-1"], ["/nonexistent/export"]],
)  # fmt: skip
def test_decode_forms_bench_refuses_bad_arguments(args: list[str], capsys) -> None:
    """Each bad argument is one usage line naming it (exit 2), before any work."""
    import decode_forms_bench

    with pytest.raises(SystemExit) as exit_info:
        decode_forms_bench.main(args)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
