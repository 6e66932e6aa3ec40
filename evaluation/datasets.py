"""Readers of the benchmarks' official files, giving the records open_flamingo's datasets give.

`load_task_data(task, DIR)` reads the files `evaluation.tasks.TASKS[task].files` names under
DIR (one file or folder per OpenFlamingo evaluate.py argument, named as in its
`scripts/run_eval.sh`) into train and test lists of dicts with the keys of
`open_flamingo/eval/eval_datasets.py`'s `__getitem__`, the image as a path (opened when used):

* captions (Karpathy `dataset_coco.json` / `dataset_flickr30k.json`): train = split "train"
  (not "restval"), test = split "test"; `{image, caption (first sentence's raw), image_id}`
  (COCO: `cocoid`; Flickr30k: the file name without extension);
* VQA (questions JSON + annotations JSON, matched by position as OpenFlamingo does; we check
  that the question ids agree): `{image, question, question_id, answers}`; image files
  `COCO_<folder>_<image_id:012d>.jpg` (VQAv2, OK-VQA), `<image_id>` (VizWiz),
  `<image_id>.jpg` (TextVQA);
* Hateful Memes (JSONL): `{id, image, ocr, class_name ("yes" if label 1 else "no"), class_id}`.

Errors are `EvaluationError`s naming the file, the record and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tasks import TASKS, EvaluationError, TaskSpec

__all__ = ["TaskData", "load_task_data"]


@dataclass
class TaskData:
    """A benchmark's records and the files its metric reads."""

    task: TaskSpec
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EvaluationError(f"{path}: cannot read ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvaluationError(f"{path}: not valid JSON ({e})") from e


def _field(record: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(record, dict):
        raise EvaluationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise EvaluationError(f"{where}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
        raise EvaluationError(
            f"{where}: {key!r} must be {_names(kind)}, got {type(value).__name__}"
        )
    return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _tuple(kind))


def _list(doc: Any, key: str, path: Path) -> list[Any]:
    return _field(doc, key, str(path), list)


def read_karpathy(
    path: Path, split: str, dataset_name: str, train_dir: Path, val_dir: Path | None
) -> list[dict[str, Any]]:
    """Caption records of one Karpathy split ("train" or "test")."""
    out = []
    for i, image in enumerate(_list(_read_json(path), "images", path)):
        where = f"{path}: images[{i}]"
        if _field(image, "split", where, str) != split:
            continue
        filename = _field(image, "filename", where, str)
        sentences = _field(image, "sentences", where, list)
        if not sentences:
            raise EvaluationError(f"{where}: 'sentences' is empty")
        caption = _field(sentences[0], "raw", f"{where}.sentences[0]", str)
        if dataset_name == "coco":
            folder = train_dir if _field(image, "filepath", where, str) == "train2014" else val_dir
            image_id: Any = _field(image, "cocoid", where, int)
        else:
            folder, image_id = train_dir, filename.split(".")[0]
        out.append({"image": folder / filename, "caption": caption, "image_id": image_id})  # type: ignore[operator]
    return out


def _vqa_image(folder: Path, dataset_name: str, image_id: Any, where: str) -> Path:
    if dataset_name in ("vqav2", "ok_vqa"):
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise EvaluationError(f"{where}: 'image_id' must be an int for {dataset_name}")
        return folder / f"COCO_{folder.name}_{image_id:012d}.jpg"
    if dataset_name == "vizwiz":
        return folder / str(image_id)
    return folder / f"{image_id}.jpg"


def read_vqa(
    questions_path: Path, annotations_path: Path, image_dir: Path, dataset_name: str
) -> list[dict[str, Any]]:
    """VQA records: questions with the answers of the annotation at the same position."""
    questions = _list(_read_json(questions_path), "questions", questions_path)
    annotations = _list(_read_json(annotations_path), "annotations", annotations_path)
    if len(annotations) != len(questions):
        raise EvaluationError(
            f"{annotations_path}: {len(annotations)} annotations for {len(questions)} questions "
            f"in {questions_path} (they are matched by position)"
        )
    out = []
    for i, (q, a) in enumerate(zip(questions, annotations)):
        where_q, where_a = (
            f"{questions_path}: questions[{i}]",
            f"{annotations_path}: annotations[{i}]",
        )
        question_id = _field(q, "question_id", where_q, (int, str))
        if _field(a, "question_id", where_a, (int, str)) != question_id:
            raise EvaluationError(
                f"{where_a}: question_id {a['question_id']!r} but the question at that position "
                f"is {question_id!r} (annotations must be in question order)"
            )
        answers = [
            _field(ans, "answer", f"{where_a}.answers[{j}]", str)
            for j, ans in enumerate(_field(a, "answers", where_a, list))
        ]
        if not answers:
            raise EvaluationError(f"{where_a}: 'answers' is empty")
        out.append(
            {
                "image": _vqa_image(image_dir, dataset_name, _field(q, "image_id", where_q,
                                                                    (int, str)), where_q),
                "question": _field(q, "question", where_q, str),
                "question_id": question_id,
                "answers": answers,
            }
        )  # fmt: skip
    return out


def read_hateful_memes(path: Path, image_dir: Path) -> list[dict[str, Any]]:
    """Hateful Memes records from a JSONL file (`{id, img, label, text}` per line)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EvaluationError(f"{path}: cannot read ({e.strerror or e})") from e
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{where}: not valid JSON ({e.msg})") from None
        label = _field(record, "label", where, int)
        if label not in (0, 1):
            raise EvaluationError(f"{where}: 'label' must be 0 or 1, got {label}")
        out.append(
            {
                "id": _field(record, "id", where, (int, str)),
                "image": image_dir / _field(record, "img", where, str).split("/")[-1],
                "ocr": _field(record, "text", where, str),
                "class_name": "yes" if label == 1 else "no",
                "class_id": label,
            }
        )
    return out


def _resolve(task: TaskSpec, data_dir: Path) -> dict[str, Path]:
    files = {key: data_dir / rel for key, rel in task.files.items()}
    for key, path in files.items():
        folder = key.endswith("dir_path")
        if not (path.is_dir() if folder else path.is_file()):
            raise EvaluationError(
                f"{data_dir}: task {task.name!r} needs the {'folder' if folder else 'file'} "
                f"{task.files[key]} (open_flamingo's --{task.dataset_name}_{key}); not found"
            )
    return files


def load_task_data(task: str | TaskSpec, data_dir: str | Path) -> TaskData:
    """Train and test records of `task` from DIR's official files (see the module docstring)."""
    spec = TASKS[task] if isinstance(task, str) else task
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvaluationError(f"{data_dir}: data folder not found")
    files = _resolve(spec, data_dir)
    if spec.kind == "caption":
        train_dir = files.get("train_image_dir_path", files.get("image_dir_path"))
        args = (spec.dataset_name, train_dir, files.get("val_image_dir_path"))
        train = read_karpathy(files["karpathy_json_path"], "train", *args)  # type: ignore[arg-type]
        test = read_karpathy(files["karpathy_json_path"], "test", *args)  # type: ignore[arg-type]
    elif spec.kind == "vqa":
        train = read_vqa(files["train_questions_json_path"], files["train_annotations_json_path"],
                         files["train_image_dir_path"], spec.dataset_name)  # fmt: skip
        test = read_vqa(files["test_questions_json_path"], files["test_annotations_json_path"],
                        files["test_image_dir_path"], spec.dataset_name)  # fmt: skip
    elif spec.kind == "classification":
        train = read_hateful_memes(files["train_annotations_json_path"], files["image_dir_path"])
        test = read_hateful_memes(files["test_annotations_json_path"], files["image_dir_path"])
    else:
        raise EvaluationError(f"task {spec.name!r} has no data files (it generates its episodes)")
    for name, records in (("train", train), ("test", test)):
        if not records:
            raise EvaluationError(f"{data_dir}: task {spec.name!r} has no {name} records")
    return TaskData(spec, train, test, files)
