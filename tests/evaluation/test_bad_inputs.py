"""Bad dataset files and options: one clear error naming the file and key (or line, or
option), raised before any export is opened or any generation runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from evaluation.datasets import load_task_data
from evaluation.rices import FeatureSource, Retriever
from evaluation.runner import EvalOptions, evaluate, plan
from evaluation.tasks import EvaluationError
from runtime.images import PreprocessConfig

from .builders import build_coco, build_hateful_memes, build_vqa


def _never_opened(export: Path) -> None:
    raise AssertionError(f"an export was opened ({export}) before the bad input was refused")


def _evaluate(task: str, data: Path, **options) -> None:
    evaluate(["unused"], task, data, EvalOptions(**options), _never_opened)


def _eval_cli(*args: str):
    return CliRunner().invoke(main, ["eval", *args])


DEEP = "[" * 100000 + "]" * 100000


# ------------------------------------------------------------------ strict JSON reading


@pytest.mark.parametrize(
    "content, expected",
    [
        (DEEP.encode(), r"dataset_coco\.json: invalid JSON \(nested too deeply"),
        (b'{"images": NaN}', r"dataset_coco\.json: invalid JSON \(NaN is not a JSON value"),
        (b"\xff\xfe{}", r"dataset_coco\.json: not UTF-8 text"),
    ],
)
def test_karpathy_file_is_read_strictly(tmp_path: Path, content: bytes, expected: str) -> None:
    data = build_coco(tmp_path / "coco")
    (data / "dataset_coco.json").write_bytes(content)
    with pytest.raises(EvaluationError, match=expected):
        _evaluate("coco", data)


@pytest.mark.parametrize(
    "line, expected",
    [
        (DEEP.encode(), r"train\.jsonl:2: invalid JSON \(nested too deeply"),
        (b'{"id": ' + b"9" * 5000 + b"}", r"train\.jsonl:2: invalid JSON \(Exceeds the limit"),
        (b'{"id": 1, "text": "\xff"}', r"train\.jsonl: not UTF-8 text"),
    ],
)
def test_hateful_memes_jsonl_is_read_strictly(tmp_path: Path, line: bytes, expected: str) -> None:
    data = build_hateful_memes(tmp_path / "hm")
    lines = (data / "train.jsonl").read_bytes().splitlines()
    (data / "train.jsonl").write_bytes(b"\n".join([lines[0], line, *lines[1:]]))
    with pytest.raises(EvaluationError, match=expected):
        _evaluate("hateful_memes", data)


# ------------------------------------------------------------------ every file checked at load


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("caption", 5, r"annotations\[0\]: 'caption' must be str, got int"),
        ("image_id", [1], r"annotations\[0\]: 'image_id' must be int or str, got list"),
    ],
)
def test_caption_annotations_are_checked_before_generation(
    tmp_path: Path, key: str, value: object, expected: str
) -> None:
    data = build_coco(tmp_path / "coco")
    path = data / "annotations" / "captions_val2014.json"
    doc = json.loads(path.read_text())
    doc["annotations"][0][key] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match=r"captions_val2014\.json: " + expected):
        _evaluate("coco", data, shots=(0,))


def test_caption_references_must_cover_the_test_images(tmp_path: Path) -> None:
    data = build_coco(tmp_path / "coco")
    path = data / "annotations" / "captions_val2014.json"
    doc = json.loads(path.read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != doc["images"][0]["id"]]
    path.write_text(json.dumps(doc))
    expected = r"no reference captions .* \[1010\] of .*dataset_coco\.json"
    with pytest.raises(EvaluationError, match=expected):
        load_task_data("coco", data)


def test_vqa_test_answers_are_checked_at_load(tmp_path: Path) -> None:
    data = build_vqa(tmp_path / "v", "vqav2")
    path = data / "v2_mscoco_val2014_annotations.json"
    doc = json.loads(path.read_text())
    doc["annotations"][1]["answers"][3]["answer"] = ["two"]
    path.write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match=r"annotations\[1\]\.answers\[3\]: 'answer' must"):
        _evaluate("vqav2", data)


# ------------------------------------------------------------------ image paths


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.jpg", "sub/../../outside.jpg"])
def test_karpathy_filename_must_stay_inside_data(tmp_path: Path, name: str) -> None:
    data = build_coco(tmp_path / "coco")
    path = data / "dataset_coco.json"
    doc = json.loads(path.read_text())
    doc["images"][3]["filename"] = name
    path.write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match=r"images\[3\]: image .* must be a relative path"):
        load_task_data("coco", data)


def test_a_symlink_out_of_data_is_refused(tmp_path: Path) -> None:
    data = build_coco(tmp_path / "coco")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"not yours")
    doc = json.loads((data / "dataset_coco.json").read_text())
    image = data / doc["images"][2]["filepath"] / doc["images"][2]["filename"]
    image.unlink()
    image.symlink_to(outside)
    with pytest.raises(EvaluationError, match=r"images\[2\]: image .* resolves to .*secret\.jpg"):
        load_task_data("coco", data)


def test_a_linked_image_folder_is_allowed(tmp_path: Path) -> None:
    """DIR/train2014 may be a link to the images on another disk."""
    data = build_coco(tmp_path / "coco")
    (data / "train2014").rename(tmp_path / "elsewhere")
    (data / "train2014").symlink_to(tmp_path / "elsewhere")
    assert all(r["image"].is_file() for r in load_task_data("coco", data).train)


def test_a_fifo_is_not_a_regular_file(tmp_path: Path) -> None:
    data = build_hateful_memes(tmp_path / "hm")
    records = load_task_data("hateful_memes", data)
    for r in records.train + records.test:
        r["image"].unlink()
        os.mkfifo(r["image"])
    with pytest.raises(EvaluationError, match=r"is not a regular file \(item"):
        plan(records, EvalOptions(shots=(0,), num_samples=4, query_set_size=4))


# ------------------------------------------------------------------ options


def test_seeds_outside_numpys_range_are_refused_up_front(tmp_path: Path) -> None:
    export = str(tmp_path)  # not an export: nothing may get as far as opening it
    for seed in ("-5", "99999999999999999999"):
        result = _eval_cli(export, "--task", "demo", "--seed", seed)
        assert result.exit_code == 2 and "--seed" in result.output, result.output
    result = _eval_cli(export, "--task", "demo", "--seed", "4294967295", "--trials", "2")
    assert result.exit_code == 1 and "4294967295 .. 4294967296" in result.output, result.output
    with pytest.raises(EvaluationError, match=r"must lie in \[0, 4294967295\]"):
        EvalOptions(seed=2**32 - 3, trials=4).validate()
    EvalOptions(seed=2**32 - 2, trials=2).validate()


@pytest.mark.parametrize(
    "report, expected",
    [
        ("{tmp}", "is a folder"),
        ("{tmp}/missing/r.md", "does not exist"),
        ("", "expected a file name"),
        ("{tmp}/r.png", "the plot is written beside it"),
        ("{tmp}/taken/r.md", "is a folder"),  # the plot's path r.png is a folder
    ],
)
def test_report_path_is_checked_before_the_run(tmp_path: Path, report: str, expected: str) -> None:
    (tmp_path / "taken" / "r.png").mkdir(parents=True)
    result = _eval_cli(str(tmp_path), "--task", "demo", "--report", report.format(tmp=tmp_path))
    assert result.exit_code in (1, 2) and expected in result.output, result.output
    assert "--report" in result.output and "Traceback" not in result.output


def test_duplicate_shots_are_refused(tmp_path: Path) -> None:
    result = _eval_cli(str(tmp_path), "--task", "demo", "--shots", "2,2")
    assert result.exit_code == 1 and "listed twice: [2, 2]" in result.output, result.output


def test_roc_auc_of_one_class_is_refused_before_generation(tmp_path: Path) -> None:
    data = build_hateful_memes(tmp_path / "hm")
    records = load_task_data("hateful_memes", data)
    with pytest.raises(EvaluationError, match=r"ROC AUC is undefined: the 1 test item\(s\)"):
        plan(records, EvalOptions(shots=(0,), num_samples=1, query_set_size=4))


def test_rices_refuses_more_shots_than_train_records(tmp_path: Path) -> None:
    data = build_hateful_memes(tmp_path / "hm", n_train=4)
    records = load_task_data("hateful_memes", data)
    features = FeatureSource(PreprocessConfig(), lambda x: x.reshape(len(x), -1)[:, :16] + 1.0)
    retriever = Retriever(features, [r["image"] for r in records.train])
    assert len(retriever.find([records.test[0]["image"]], 4)[0]) == 4
    with pytest.raises(EvaluationError, match="5 demonstrations cannot be chosen by RICES from 4"):
        plan(records, EvalOptions(shots=(5,), rices=True), retriever)
    assert np.isfinite(retriever.train).all()


def test_an_idefics_export_is_refused_before_it_is_opened(idefics_export: Path) -> None:
    """open_flamingo's protocol (its templates, text-only 0-shot demonstrations) does not
    apply to IDEFICS: the command says so instead of scoring prompts IDEFICS never saw."""
    with pytest.raises(EvaluationError, match=r"prompt format 'idefics'.*open_flamingo 2\.0\.1"):
        evaluate([idefics_export], "demo", None, EvalOptions(), _never_opened)
    result = _eval_cli(str(idefics_export), "--task", "demo")
    assert result.exit_code != 0
    assert "prompt format 'idefics'" in result.output and "Traceback" not in result.output
