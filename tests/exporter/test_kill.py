"""A handful of random kills of `export` and `quantize` (benchmarks/kill_trials.py, which the
README's figures come from with 100+ trials): OUT is never partial or lost, SIGTERM leaves
nothing behind, and what SIGKILL leaves is reclaimed by the next run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "kill_trials.py"


@pytest.mark.slow
def test_random_kills_keep_the_invariants(tiny_paths, tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("kill_trials", HARNESS)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    p = tiny_paths("mpt")
    model = ["--lm", str(p.lm_dir), "--vision", str(p.vision_path),
             "--checkpoint", str(p.checkpoint_path)]  # fmt: skip
    # export/quantize x SIGKILL/SIGTERM, the last two replacing an existing OUT (--force)
    summary = harness.run_trials(6, model, tmp_path, seed=1, say=lambda _m: None)
    broken = [r for r in summary["records"] if not r["ok"]]
    assert not broken, broken
    assert summary["out_invalid"] == summary["out_absent_with_force"] == 0
    assert summary["left_after_sigterm"] == summary["left_after_rerun"] == 0
    assert summary["killed_while_writing"] >= 2  # the rest finished first: still checked
