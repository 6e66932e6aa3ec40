"""`flamingo-export bench` on the tiny export: the report's structure and its ratios.

Timing values are never asserted (shared CI machines); only that every number is there, finite
and consistent, and that all backends decoded the same fixed number of tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.harness import RATIO_METRICS, BenchError, BenchOptions, ModelFiles, run_bench
from bench.report import format_table
from cli.main import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CASES = ("runtime_uncached", "runtime_cached", "reference", "oracle")
TIME_METRICS = ("vision_ms_per_image", "prefill_ms", "decode_ms_per_token", "total_ms")


@pytest.fixture(scope="module")
def report(tiny_paths: Callable, tiny_export: Callable) -> dict:
    paths = tiny_paths("llama")
    files = ModelFiles(paths.lm_dir, paths.vision_path, paths.checkpoint_path)
    options = BenchOptions(shots=(0, 4), new_tokens=4, repeats=1, warmup=1, threads=1, settle_ms=0)
    return run_bench(tiny_export("llama"), options, files, oracle=True)


def test_report_structure(report: dict) -> None:
    json.dumps(report)  # JSON-ready
    assert [r["shots"] for r in report["results"]] == [0, 4]
    assert report["settings"]["threads"] == 1
    assert set(report["memory"]["model_rss_bytes"]) == {"runtime", "reference", "oracle"}
    for r in report["results"]:
        assert r["images"] == r["shots"] + 1
        assert set(r["cases"]) == set(CASES)
        for name, m in r["cases"].items():
            assert m["new_tokens"] == 4, name  # the stop token is off: a fixed count
            assert m["prompt_tokens"] == r["prompt_tokens"]
            assert len(m["total_ms_runs"]) == 1
            for key in (*TIME_METRICS, "tokens_per_s", "ttft_ms"):
                assert math.isfinite(m[key]) and m[key] > 0, (name, key)
            assert m["peak_rss_bytes"] > 0
        # all backends decoded the same greedy tokens as the runtime
        assert all(r["same_tokens_as_runtime_uncached"].values())
    four = report["results"][1]["cases"]
    assert four["runtime_cached"]["cached_tokens"] > 0  # the demos came from the prefix cache
    assert four["runtime_cached"]["images_encoded"] == 1
    assert four["runtime_uncached"]["cached_tokens"] == 0
    assert four["runtime_uncached"]["images_encoded"] == 5


def test_ratios_are_runtime_over_baseline(report: dict) -> None:
    for r in report["results"]:
        assert set(r["ratios"]) == {"reference", "oracle"}
        for baseline, modes in r["ratios"].items():
            assert set(modes) == {"uncached", "cached"}
            for mode, ratios in modes.items():
                assert set(ratios) == set(RATIO_METRICS)
                runtime, base = r["cases"][f"runtime_{mode}"], r["cases"][baseline]
                for key in RATIO_METRICS:  # one repeat: the median of paired ratios is the ratio
                    want = runtime[key] / base[key]  # of values rounded to 1 µs
                    assert ratios[key] == pytest.approx(want, rel=0.02, abs=1e-3)
    summary = report["summary"]
    assert set(summary["cached_query_vs_0shot_total"]) == {"0", "4"}
    assert set(summary["speedup_vs_oracle_end_to_end"]["4"]) == {"uncached", "cached"}
    table = format_table(report)
    assert "open_flamingo generate" in table and "| 4 | cached |" in table
    # each ratio sits under its own header (the header is built from RATIO_METRICS)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| shots | runtime | vs"))
    row = next(line for line in lines if line.startswith("| 4 | uncached | open_flamingo"))
    cells = dict(zip(header.split("|")[4:-1], row.split("|")[4:-1]))
    decode = report["results"][1]["ratios"]["oracle"]["uncached"]["decode_ms_per_token"]
    assert cells[" decode/tok "].strip() == f"{decode:.2f}"


def test_cli_bench_runtime_only(tiny_export: Callable) -> None:
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny_export("llama")),
            "--shots",
            "0,1",
            "--max-new-tokens",
            "3",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--settle-ms",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["shots"] for r in out["results"]] == [0, 1]
    assert all(r["ratios"] == {} for r in out["results"])
    assert set(out["results"][1]["cases"]) == {"runtime_uncached", "runtime_cached"}


def test_cli_bench_option_errors(tiny_export: Callable) -> None:
    export = str(tiny_export("llama"))
    bad = CliRunner().invoke(main, ["bench", export, "--shots", "0,x"])
    assert bad.exit_code != 0 and "comma-separated integers" in bad.output
    missing = CliRunner().invoke(main, ["bench", export, "--reference"])
    assert missing.exit_code != 0 and "--lm, --vision and --checkpoint" in missing.output
    negative = CliRunner().invoke(main, ["bench", export, "--settle-ms", "-1"])
    assert negative.exit_code != 0 and "--settle-ms" in negative.output


def test_bench_against_other_exports(tiny_export: Callable, tmp_path: Path) -> None:
    """An int8 export benched with its fp32 export as baseline (twice: names stay apart)."""
    from precision.quantize import QuantizeOptions, quantize_export

    fp32 = tiny_export("llama")
    int8 = tmp_path / "int8"
    quantize_export(fp32, int8, QuantizeOptions("int8", "int8", int8_mode="weight-only"))
    result = CliRunner().invoke(
        main,
        ["bench", str(int8), "--baseline-export", str(fp32), "--baseline-export", str(fp32),
         "--shots", "1", "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0",
         "--threads", "1", "--settle-ms", "0", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    names = [f"export:{fp32.name}", f"export:{fp32.name}#2"]
    assert out["model"]["precision"] == {"vision": "int8", "decoder": "int8"}
    r = out["results"][0]
    assert set(r["cases"]) == {"runtime_uncached", "runtime_cached", *names}
    assert set(r["ratios"]) == set(names)
    ratio = r["ratios"][names[0]]["uncached"]["decode_ms_per_token"]
    want = (
        r["cases"]["runtime_uncached"]["decode_ms_per_token"]
        / r["cases"][names[0]]["decode_ms_per_token"]
    )
    assert ratio == pytest.approx(want, rel=0.02, abs=1e-3)
    speedup = out["summary"][f"speedup_vs_{names[0]}_decode"]["1"]["uncached"]
    assert speedup == pytest.approx(1 / ratio, rel=1e-3)
    # exports load no torch: their memory baseline has no framework share
    assert set(out["memory"]["model_rss_bytes"]) == {"runtime", *names}


def test_cli_bench_refuses_what_cannot_run_before_timing(tiny_export: Callable) -> None:
    """Non-finite pauses and prompts past the export's limits are one line before any run
    (--settle-ms nan/inf gave a traceback, --shots 100000 built prompts for minutes)."""
    export = str(tiny_export("mpt"))
    runner = CliRunner()
    for args, message, code in (
        (["--settle-ms", "nan"], "not a finite number", 2),
        (["--settle-ms", "inf"], "not in the range", 2),
        (["--shots", "100000"], "this export takes at most", 1),
        (["--shots", "0", "--max-new-tokens", "100000"], "exceed this export's context", 1),
    ):
        result = runner.invoke(main, ["bench", export, *args])
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_limit_options_refuse_zero() -> None:
    """`plan --max-seq-len 0` used to fall back to the default silently."""
    runner = CliRunner()
    for args in (["--max-seq-len", "0"], ["--max-images", "0"], ["--max-batch", "0"]):
        result = runner.invoke(main, ["plan", "--preset", "openflamingo-3b", *args])
        assert result.exit_code == 2 and "x>=1" in result.output, (args, result.output)


def test_bench_options_refuse_a_non_finite_pause() -> None:
    for settle in (float("nan"), float("inf"), -1.0):
        with pytest.raises(BenchError, match="--settle-ms must be within"):
            BenchOptions(settle_ms=settle).validate()


def test_oracle_without_an_hf_vision_tower_fails_before_loading(
    tiny_paths: Callable, tiny_export: Callable, tmp_path: Path
) -> None:
    from bench.harness import BenchError

    paths = tiny_paths("llama")
    vision = tmp_path / "open_clip.safetensors"  # no vision_hf/ beside it
    vision.write_bytes(Path(paths.vision_path).read_bytes())
    files = ModelFiles(paths.lm_dir, vision, paths.checkpoint_path)
    said: list[str] = []
    with pytest.raises(BenchError, match="give --oracle-vision DIR"):
        run_bench(tiny_export("llama"), BenchOptions(), files, oracle=True, progress=said.append)
    assert said == []  # nothing loaded, nothing measured


def test_other_exports_against_pytorch_and_their_own_floor(
    tiny_paths: Callable, tiny_export: Callable, tmp_path: Path
) -> None:
    """A baseline export is paired with the PyTorch reference like the runtime
    (`export_ratios`), and runtime_bench's per-precision table inverts those ratios and puts
    each precision's decode next to its own weight floor."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import runtime_bench

    fp32 = tiny_export("llama")
    int8 = runtime_bench.precision_export(fp32, "int8-dynamic")
    assert int8 == fp32.with_name(f"{fp32.name}-int8-dynamic") and int8.is_dir()
    paths = tiny_paths("llama")
    files = ModelFiles(paths.lm_dir, paths.vision_path, paths.checkpoint_path)
    options = BenchOptions(shots=(1,), new_tokens=3, repeats=1, warmup=0, threads=1, settle_ms=0)
    report = run_bench(int8, options, files, oracle=False, baseline_exports=[fp32])
    (r,) = report["results"]
    name = f"export:{fp32.name}"
    ratio = r["export_ratios"][name]["reference"]["prefill_ms"]
    want = r["cases"][name]["prefill_ms"] / r["cases"]["reference"]["prefill_ms"]
    assert ratio == pytest.approx(want, rel=0.02, abs=1e-3)
    exports = {"int8-dynamic": int8, "fp32": fp32}
    weights = {v: runtime_bench.decode_weight_bytes(p) for v, p in exports.items()}
    assert weights["int8-dynamic"]["per_step_bytes"] < weights["fp32"]["per_step_bytes"] / 2
    rows = runtime_bench.precision_table(report, list(exports), exports, weights, 10.0)
    assert [row["precision"] for row in rows] == ["int8-dynamic", "fp32"]
    for row in rows:
        floor = weights[row["precision"]]["per_step_bytes"] / 1e10 * 1e3
        assert row["floor_ms"] == pytest.approx(floor, rel=1e-3, abs=1e-3)
        assert math.isfinite(row["speedup_vs_reference_total_ms"])
    assert rows[1]["speedup_vs_reference_prefill_ms"] == pytest.approx(1 / ratio, rel=1e-2)


def test_bench_reference_on_an_idefics_export(idefics_export: Path) -> None:
    """`bench --reference --model DIR`: the IDEFICS reference beside its export, on prompts in
    the export's format (runtime.idefics), the same tokens; --oracle (open_flamingo) refused."""
    folder = idefics_export.parent / "tiny"
    args = ["bench", str(idefics_export), "--shots", "0,2", "--max-new-tokens", "3",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--settle-ms", "0"]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--reference", "--model", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for row in out["results"]:
        assert set(row["cases"]) == {"runtime_uncached", "runtime_cached", "reference"}
        assert all(row["same_tokens_as_runtime_uncached"].values()), row
    result = CliRunner().invoke(main, [*args, "--oracle", "--model", str(folder)])
    assert result.exit_code == 2 and "--oracle runs the published open_flamingo" in result.output
    # another model's folder is refused, not timed (breaker pass 2)
    from fixtures.idefics import build_tiny_idefics

    other = build_tiny_idefics(idefics_export.parent / "other", use_resampler=False)
    result = CliRunner().invoke(main, [*args, "--reference", "--model", str(other)])
    assert result.exit_code == 1, result.output
    assert "is not the one" in result.output and "Traceback" not in result.output
