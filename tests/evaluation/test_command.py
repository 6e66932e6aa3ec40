"""`flamingo-export eval`: JSON and report shapes, several exports in one run, clear errors,
torch-free; and the demo task: its accuracy table as one call, equal to the PyTorch model's
answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main

from .builders import build_coco, build_vqa

ROOT = Path(__file__).resolve().parents[2]


def _eval(*args: str, **kw) -> object:
    return CliRunner().invoke(main, ["eval", *args], **kw)


def test_json_has_scores_per_shot_and_trial_and_every_prediction(tiny_export, tmp_path) -> None:
    export = str(tiny_export("llama"))
    data = build_vqa(tmp_path / "vqa", "vqav2")
    result = _eval(export, export, "--task", "vqav2", "--data", str(data), "--shots", "0,2",
                   "--trials", "2", "--seed", "9", "--num-samples", "4", "--query-set-size", "6",
                   "--json", "--report", str(tmp_path / "r.md"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "vqav2, 2 trial(s) x shots 0,2 (4 runs)" in result.stderr  # not "4 trial(s)"
    out = json.loads(result.stdout)
    assert out["task"] == "vqav2" and out["metric"] == "VQA accuracy"
    assert out["protocol"]["trial_seeds"] == [9, 10] and out["protocol"]["num_beams"] == 3
    first, second = out["exports"]
    assert set(first["scores"]) == {"0", "2"} and len(first["scores"]["2"]["trials"]) == 2
    assert [(t["shots"], t["seed"]) for t in first["trials"]] == [(0, 9), (0, 10), (2, 9), (2, 10)]
    assert all(len(t["predictions"]) == 4 for t in first["trials"])
    assert set(first["trials"][0]["predictions"][0]) == {"id", "prediction"}
    assert first["trials"] == [  # the same plan on the same engine: the same answers
        {**t, "seconds": f["seconds"]} for t, f in zip(second["trials"], first["trials"])
    ]
    report = (tmp_path / "r.md").read_text()
    assert "(+0.00)" in report and "![VQA accuracy vs shots](r.png)" in report
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_one_line_and_name_what(tiny_export, tmp_path) -> None:
    export = str(tiny_export("llama"))
    result = _eval(export, "--task", "coco")
    assert result.exit_code == 1 and "needs --data DIR" in result.output
    assert "train2014, val2014, dataset_coco.json" in result.output and "{" not in result.output
    result = _eval(export, "--task", "textvqa", "--data", str(tmp_path))
    assert result.exit_code == 1 and "train_images" in result.output
    result = _eval(export, "--task", "demo", "--data", str(tmp_path))
    assert result.exit_code == 1 and "no --data" in result.output
    result = _eval(export, "--task", "demo", "--shots", "1,x")
    assert result.exit_code == 2 and "comma-separated" in result.output
    data = build_coco(tmp_path / "coco")
    result = _eval(export, "--task", "coco", "--data", str(data), "--shots", "0",
                   env={"PATH": str(tmp_path / "no-java")})  # fmt: skip
    assert result.exit_code == 1 and "CIDEr needs Java" in result.output
    result = _eval(export, "--task", "coco", "--data", str(data), "--num-samples", "99")
    assert result.exit_code == 1 and "--num-samples 99 exceeds the 6 test records" in result.output
    assert "Traceback" not in result.output


def test_eval_runs_without_torch(tiny_export, tmp_path) -> None:
    data = build_vqa(tmp_path / "vqa", "vizwiz")
    code = f"""
import json, sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from click.testing import CliRunner
from cli.main import main
args = ["eval", {str(tiny_export("llama"))!r}, "--task", "vizwiz", "--data", {str(data)!r},
        "--shots", "0,1", "--num-samples", "3", "--query-set-size", "4", "--rices", "--json"]
result = CliRunner().invoke(main, args, catch_exceptions=False)
assert result.exit_code == 0, result.output
assert len(json.loads(result.stdout)["exports"][0]["trials"]) == 2
assert not [m for m in sys.modules if sys.modules[m] is not None
            and m.split(".")[0] in ("torch", "transformers")]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.export import export_model
    from flamingo.loaders import load_flamingo

    files = ROOT / "models" / "demo"
    model, tokenizer, _ = load_flamingo(
        files / "lm", files / "open_clip_model.safetensors", files / "checkpoint.safetensors"
    )
    out = tmp_path_factory.mktemp("demo") / "export"
    export_model(model, tokenizer, out, progress=None)
    return out


@pytest.mark.slow
def test_demo_task_is_one_call_and_equals_the_pytorch_model(demo_export) -> None:
    """The README accuracy table's protocol (held-out episodes of seed 1234, greedy, exact
    match) on the export: the same answers as `demo.train.predict` on the PyTorch model."""
    import torch

    from demo.task import eval_episodes
    from demo.train import load_demo, predict

    n = 30
    result = _eval(str(demo_export), "--task", "demo", "--shots", "0,4", "--num-samples",
                   str(n), "--json", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    trials = json.loads(result.stdout)["exports"][0]["trials"]
    model, tokenizer = load_demo(ROOT / "models" / "demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for trial in trials:
            episodes = eval_episodes(n, 1234, trial["shots"])
            expected = predict(model, tokenizer, episodes)
            assert [p["prediction"] for p in trial["predictions"]] == expected
            hits = [e == ep.answer for e, ep in zip(expected, episodes)]
            assert trial["score"] == pytest.approx(100 * sum(hits) / n)
            assert set(trial["breakdown"]) <= {"colour", "shape", "count", "position", "size"}
    finally:
        torch.set_num_threads(threads)
    assert trials[1]["score"] >= 80 > trials[0]["score"]  # the demonstrations name the attribute
