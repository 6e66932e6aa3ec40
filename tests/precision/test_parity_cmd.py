"""`flamingo-export parity`: numbers as JSON and Markdown, exit status from the thresholds, the
PyTorch model as reference, and usage errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from precision.parity import (
    ErrorStats,
    OnnxBackend,
    ParityError,
    answer_text,
    gate,
    measure,
    parse_thresholds,
    thresholds_for,
)
from precision.quantize import QuantizeOptions, quantize_export

QUICK = ["--episodes", "3", "--decode-steps", "4"]


@pytest.fixture(scope="module")
def fp16_export(tiny_export: Callable, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parity-fp16") / "out"
    quantize_export(tiny_export("mpt"), out, QuantizeOptions("fp16", "fp16"))
    return out


def _json(output: str) -> dict:
    return json.loads(output[output.index("{") :])


def test_parity_json_report_and_gate(
    tiny_export: Callable, fp16_export: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    ref = str(tiny_export("mpt"))
    report = tmp_path / "report.md"
    result = runner.invoke(
        main, ["parity", ref, str(fp16_export), *QUICK, "--json", "--report", str(report)]
    )
    assert result.exit_code == 0, result.output
    data = _json(result.stdout)
    assert data["precisions"] == {"vision": "fp16", "decoder": "fp16"}
    m = data["metrics"]
    assert set(m["vision"]) >= {"image_latents", "cross_attn.1.key"}
    assert m["decoder"]["top1"] >= 0.995 and m["decoder"]["cosine"] > 0.9999
    assert 0.0 <= m["pipeline"]["greedy_exact_match"] <= 1.0
    assert data["sizes"]["decoder"]["ratio"] < 0.6 and data["failures"] == []
    text = report.read_text()
    assert "| decoder | logits |" in text and "Result: PASS" in text
    assert "matplotlib" in text or (tmp_path / "report.png").is_file()

    # an unreachable bar: exit status 1, the missed threshold named
    result = runner.invoke(
        main, ["parity", ref, str(fp16_export), *QUICK, "--thresholds", "fp16.decoder_cosine=1"]
    )
    assert result.exit_code == 1
    assert "decoder_cosine" in result.output and "FAIL" in result.output


def test_parity_against_pytorch_reference(tiny_export: Callable, tiny_paths: Callable) -> None:
    paths = tiny_paths("mpt")
    result = CliRunner().invoke(
        main,
        ["parity", str(tiny_export("mpt")), "--lm", str(paths.lm_dir),
         "--vision", str(paths.vision_path), "--checkpoint", str(paths.checkpoint_path),
         *QUICK, "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    m = _json(result.stdout)["metrics"]
    assert m["decoder"]["max_abs"] < 1e-4 and m["decoder"]["top1"] == 1.0
    assert m["pipeline"]["greedy_exact_match"] == 1.0
    assert all(v["max_abs"] < 1e-4 for v in m["vision"].values())


def test_parity_usage_errors(tiny_export: Callable, fp16_export: Path) -> None:
    runner = CliRunner()
    ref = str(tiny_export("mpt"))
    result = runner.invoke(main, ["parity", ref])
    assert result.exit_code == 2 and "give REFERENCE and CANDIDATE" in result.output
    result = runner.invoke(main, ["parity", ref, str(fp16_export), "--lm", ref])
    assert result.exit_code == 2 and "only CANDIDATE" in result.output
    result = runner.invoke(main, ["parity", ref, "--lm", ref])
    assert result.exit_code == 2 and "needs --lm, --vision and --checkpoint" in result.output
    result = runner.invoke(main, ["parity", ref, str(fp16_export), "--thresholds", "top5=1"])
    assert result.exit_code == 1 and "bad threshold" in result.output
    result = runner.invoke(main, ["parity", ref, str(fp16_export), "--data", "nowhere"])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_thresholds_and_nan_never_pass() -> None:
    assert parse_thresholds("top1=0.9,int8.greedy=0.5")["int8"] == {"top1": 0.9, "greedy": 0.5}
    assert parse_thresholds("top1=0.9")["fp16"] == {"top1": 0.9}
    with pytest.raises(ParityError, match="not a number"):
        parse_thresholds("top1=high")
    with pytest.raises(ParityError, match="bad threshold"):
        parse_thresholds("int9.top1=1")
    for bad in ("top1=nan", "top1=inf", "greedy=1.5", "vision_cosine=-2", "task_delta=-inf"):
        with pytest.raises(ParityError, match=r"lies in \["):  # NaN used to be accepted
            parse_thresholds(bad)
    stats = ErrorStats()
    stats.add([1.0, 2.0], [float("nan"), 2.0])
    assert math.isnan(stats.cosine)
    metrics = {
        "vision": {"image_latents": {"cosine": float("nan")}},
        "decoder": {"cosine": 1.0, "top1": 1.0},
        "pipeline": {"cosine": 1.0, "greedy_exact_match": 1.0},
    }
    assert gate(metrics, {"vision_cosine": 0.9, "top1": 0.9}) == ["vision_cosine nan < 0.9"]
    zeros = ErrorStats()
    zeros.add([1.0, 2.0], [0.0, 0.0])  # an all-zero output is no match
    assert zeros.cosine == 0.0


def test_task_delta_is_gated_only_with_labels_and_from_counts() -> None:
    metrics = {
        "vision": {"image_latents": {"cosine": 1.0}},
        "decoder": {"cosine": 1.0, "top1": 1.0},
        "pipeline": {"cosine": 1.0, "greedy_exact_match": 1.0},
        "task": None,
    }
    bounds = thresholds_for({"vision": "int8", "decoder": "int8"}, {})
    assert bounds["task_delta"] == -0.01 and gate(metrics, bounds) == []  # no labels: no gate
    # 2 of 200 answers lost is exactly the int8 bar (counts, not a float difference)
    metrics["task"] = {"episodes": 200, "reference": 0.94, "candidate": 0.93, "delta": -2 / 200}
    assert gate(metrics, bounds) == []
    metrics["task"]["delta"] = -3 / 200
    assert gate(metrics, bounds) == ["task_delta -0.015 < -0.01"]
    int4 = thresholds_for({"vision": "fp16", "decoder": "int4"}, {})
    assert int4["task_delta"] == -0.03  # the pipeline takes the lower bound of both graphs
    assert parse_thresholds("int8.task_delta=-0.02")["int8"] == {"task_delta": -0.02}


def test_answer_text_stops_at_the_first_stop_token(tiny_export: Callable) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_export("mpt") / "tokenizer" / "tokenizer.json"))
    ids = tok.encode(" red circle").ids
    stop = tok.token_to_id("<|endofchunk|>")
    assert answer_text(tok, [*ids, stop, *ids], [stop]) == "red circle"
    assert answer_text(tok, ids, [stop]) == "red circle"  # ran out of tokens: all of it


def test_task_accuracy_compares_each_sides_greedy_answer_with_the_label(
    tiny_export: Callable,
) -> None:
    """Labels that are each episode's own greedy answer score 1.0 on both sides, a wrong label
    0.0: the accuracy reads the labels, not the agreement between the two sides."""
    from dataclasses import replace

    from tokenizers import Tokenizer

    from precision.data import calibration_set
    from precision.parity import _greedy
    from runtime.generation import GenerationConfig
    from runtime.images import preprocess

    export = tiny_export("mpt")
    backend = OnnxBackend(export)
    tok = Tokenizer.from_file(str(export / "tokenizer" / "tokenizer.json"))
    stop = backend.manifest.special_tokens["eoc_token_id"]
    episodes = calibration_set("random", episodes=3, max_shots=1, seed=5).episodes
    assert all(e.answer for e in episodes)  # random captions / answers are labels too
    own = []
    for e in episodes:
        features = backend.encode(preprocess(list(e.images), backend.preprocess))
        ids = np.array([tok.encode(e.prompt).ids], dtype=np.int64)
        config = GenerationConfig(max_new_tokens=4, eos_token_ids=(stop,))
        seq = _greedy(backend, features, len(e.images), ids, config)
        own.append(replace(e, answer=answer_text(tok, seq, [stop])))
    task = measure(backend, backend, own, tok, decode_steps=4)["task"]
    assert task == {
        "episodes": 3, "reference": 1.0, "candidate": 1.0, "delta": 0.0, "lost": 0, "gained": 0
    }  # fmt: skip
    wrong = [replace(e, answer="certainly not this") for e in episodes]
    assert measure(backend, backend, wrong, tok, decode_steps=4)["task"]["candidate"] == 0.0


def test_parity_executors_make_every_session_and_agree(tiny_export: Callable) -> None:
    """Each executor's sessions come from OnnxFlamingo's session factory (checked against the
    spec), and an fp32 export computes the same logits under all three."""
    import onnxruntime as ort

    export = tiny_export("llama")
    pixels = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    logits = {}
    for executor in ("onnxruntime", "onnxruntime-unoptimized", "reference"):
        backend = OnnxBackend(export, executor=executor)
        sessions = backend.engine.sessions
        assert list(sessions) == ["vision", "decoder"]
        for session in sessions.values():
            is_ort = isinstance(session, ort.InferenceSession)
            assert is_ort == (executor != "reference")
            if executor == "onnxruntime-unoptimized":
                level = session.get_session_options().graph_optimization_level
                assert level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ids = np.array([[backend.engine.media_token_id, 5, 6, 7]], dtype=np.int64)
        step_model = backend.decoder(backend.encode(pixels), 1)
        logits[executor] = step_model.run(ids, np.ones_like(ids))
    for executor in ("onnxruntime-unoptimized", "reference"):
        assert np.abs(logits[executor] - logits["onnxruntime"]).max() < 1e-5, executor
    with pytest.raises(ParityError, match="executor 'tensorrt' is not one of"):
        OnnxBackend(export, executor="tensorrt")


def test_report_path_is_checked_before_any_work(tiny_export, tmp_path) -> None:
    """A report that could not be written (a folder, a missing folder, no name, a .png that
    its plot would overwrite) is refused before the exports are even opened."""
    export = str(tiny_export("mpt"))
    runner = CliRunner()
    for report, why in (
        (tmp_path, "is a folder"),
        (tmp_path / "missing" / "r.md", "does not exist"),
        (Path(""), "expected a file name"),
        (tmp_path / "r.png", "would overwrite it"),
    ):
        result = runner.invoke(main, ["parity", export, export, "--report", str(report)])
        assert result.exit_code == 2 and why in result.output, (report, result.output)
