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

Every file is read strictly (`runtime.schema`: UTF-8, valid JSON, not nested past the parser,
no NaN) and every field the evaluation uses is type-checked here, at load, before anything
runs: the metric's references too (`TaskData.references`: the COCO-format caption file, the
test VQA answers). Every image path must stay inside DIR after resolving symlinks (or inside
the task's image folder, which may be a link into another disk). Errors are
`EvaluationError`s naming the file (and line of a JSONL file), the record and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.schema import load_json, parse_json, read_text

from .tasks import TASKS, EvaluationError, TaskSpec

__all__ = ["CaptionReferences", "TaskData", "load_task_data", "read_coco_captions",
           "read_vqa_answers"]  # fmt: skip


@dataclass
class CaptionReferences:
    """A COCO-format caption file: image ids in the file's order, reference captions per id."""

    order: list[Any]
    captions: dict[Any, list[str]]


@dataclass
class TaskData:
    """A benchmark's records and the files its metric reads."""

    task: TaskSpec
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)
    # what the metric scores against: CaptionReferences, or the VQA answers per question id
    references: Any = None


def _read_json(path: Path) -> Any:
    return load_json(path, EvaluationError)


def _inside(folder: Path, root: Path) -> tuple[Path, ...]:
    """Where `folder`'s images may resolve to: DIR, or the folder itself (it may be a link)."""
    return (Path(os.path.realpath(root)), Path(os.path.realpath(folder)))


def _image_path(folder: Path, name: str, inside: tuple[Path, ...], where: str) -> Path:
    """`folder / name`, refused unless it resolves (symlinks followed) under one of `inside`
    (`_inside`): a record cannot name a file elsewhere on the machine."""
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise EvaluationError(
            f"{where}: image {name!r} must be a relative path inside {folder} (no '..')"
        )
    path = folder / relative
    resolved = Path(os.path.realpath(path))
    if not any(resolved.is_relative_to(p) for p in inside):
        raise EvaluationError(f"{where}: image {path} resolves to {resolved}, outside {inside[0]}")
    return path


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
    path: Path, split: str, dataset_name: str, train_dir: Path, val_dir: Path | None, root: Path
) -> list[dict[str, Any]]:
    """Caption records of one Karpathy split ("train" or "test"); images inside `root`."""
    out = []
    inside = {d: _inside(d, root) for d in (train_dir, val_dir) if d is not None}
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
        out.append(
            {
                "image": _image_path(folder, filename, inside[folder], where),  # type: ignore[index,arg-type]
                "caption": caption,
                "image_id": image_id,
            }
        )
    return out


def read_coco_captions(path: Path) -> CaptionReferences:
    """The reference captions of a COCO-format caption file (`images[].id`,
    `annotations[].image_id` and `.caption`), every field checked."""
    doc = _read_json(path)
    order = [
        _field(image, "id", f"{path}: images[{i}]", (int, str))
        for i, image in enumerate(_list(doc, "images", path))
    ]
    captions: dict[Any, list[str]] = {}
    for i, ann in enumerate(_list(doc, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        image_id = _field(ann, "image_id", where, (int, str))
        captions.setdefault(image_id, []).append(_field(ann, "caption", where, str))
    return CaptionReferences(order, captions)


def _vqa_image(
    folder: Path, dataset_name: str, image_id: Any, inside: tuple[Path, ...], where: str
) -> Path:
    if dataset_name in ("vqav2", "ok_vqa"):
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise EvaluationError(f"{where}: 'image_id' must be an int for {dataset_name}")
        name = f"COCO_{folder.name}_{image_id:012d}.jpg"
    elif dataset_name == "vizwiz":
        name = str(image_id)
    else:
        name = f"{image_id}.jpg"
    return _image_path(folder, name, inside, where)


def read_vqa_answers(path: Path) -> list[tuple[Any, list[dict[str, Any]]]]:
    """(question_id, answers) of each annotation of a VQA annotation file, in file order (the
    answers as the file has them: objects with a string 'answer')."""
    out = []
    for i, a in enumerate(_list(_read_json(path), "annotations", path)):
        where = f"{path}: annotations[{i}]"
        question_id = _field(a, "question_id", where, (int, str))
        answers = _field(a, "answers", where, list)
        for j, ans in enumerate(answers):
            _field(ans, "answer", f"{where}.answers[{j}]", str)
        if not answers:
            raise EvaluationError(f"{where}: 'answers' is empty")
        out.append((question_id, answers))
    return out


def read_vqa(
    questions_path: Path,
    annotations_path: Path,
    image_dir: Path,
    dataset_name: str,
    root: Path,
    annotations: list[tuple[Any, list[dict[str, Any]]]] | None = None,
) -> list[dict[str, Any]]:
    """VQA records: questions with the answers of the annotation at the same position
    (`annotations`: `read_vqa_answers(annotations_path)` if already read)."""
    questions = _list(_read_json(questions_path), "questions", questions_path)
    if annotations is None:
        annotations = read_vqa_answers(annotations_path)
    if len(annotations) != len(questions):
        raise EvaluationError(
            f"{annotations_path}: {len(annotations)} annotations for {len(questions)} questions "
            f"in {questions_path} (they are matched by position)"
        )
    inside = _inside(image_dir, root)
    out = []
    for i, (q, (answer_qid, answers)) in enumerate(zip(questions, annotations)):
        where = f"{questions_path}: questions[{i}]"
        question_id = _field(q, "question_id", where, (int, str))
        if answer_qid != question_id:
            raise EvaluationError(
                f"{annotations_path}: annotations[{i}]: question_id {answer_qid!r} but the "
                f"question at that position is {question_id!r} (annotations must be in "
                "question order)"
            )
        image_id = _field(q, "image_id", where, (int, str))
        out.append(
            {
                "image": _vqa_image(image_dir, dataset_name, image_id, inside, where),
                "question": _field(q, "question", where, str),
                "question_id": question_id,
                "answers": [a["answer"] for a in answers],
            }
        )
    return out


def read_hateful_memes(path: Path, image_dir: Path, root: Path) -> list[dict[str, Any]]:
    """Hateful Memes records from a JSONL file (`{id, img, label, text}` per line)."""
    inside = _inside(image_dir, root)
    out = []
    for n, line in enumerate(read_text(path, EvaluationError).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        record = parse_json(line, where, EvaluationError)
        label = _field(record, "label", where, int)
        if label not in (0, 1):
            raise EvaluationError(f"{where}: 'label' must be 0 or 1, got {label}")
        name = _field(record, "img", where, str).split("/")[-1]
        out.append(
            {
                "id": _field(record, "id", where, (int, str)),
                "image": _image_path(image_dir, name, inside, where),
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
    references: Any = None
    if spec.kind == "caption":
        train_dir = files.get("train_image_dir_path", files.get("image_dir_path"))
        args = (spec.dataset_name, train_dir, files.get("val_image_dir_path"), data_dir)
        train = read_karpathy(files["karpathy_json_path"], "train", *args)  # type: ignore[arg-type]
        test = read_karpathy(files["karpathy_json_path"], "test", *args)  # type: ignore[arg-type]
        references = read_coco_captions(files["annotations_json_path"])
        known = set(references.order) & set(references.captions)
        missing = [r["image_id"] for r in test if r["image_id"] not in known]
        if missing:
            raise EvaluationError(
                f"{files['annotations_json_path']}: no reference captions (or no images[] "
                f"entry) for the test image id(s) {missing[:5]} of "
                f"{files['karpathy_json_path']} (the two files disagree)"
            )
    elif spec.kind == "vqa":
        train = read_vqa(files["train_questions_json_path"], files["train_annotations_json_path"],
                         files["train_image_dir_path"], spec.dataset_name, data_dir)  # fmt: skip
        test_annotations = files["test_annotations_json_path"]
        answers = read_vqa_answers(test_annotations)
        test = read_vqa(files["test_questions_json_path"], test_annotations,
                        files["test_image_dir_path"], spec.dataset_name, data_dir,
                        answers)  # fmt: skip
        references = dict(answers)
    elif spec.kind == "classification":
        images = files["image_dir_path"]
        train = read_hateful_memes(files["train_annotations_json_path"], images, data_dir)
        test = read_hateful_memes(files["test_annotations_json_path"], images, data_dir)
    else:
        raise EvaluationError(f"task {spec.name!r} has no data files (it generates its episodes)")
    for name, records in (("train", train), ("test", test)):
        if not records:
            raise EvaluationError(f"{data_dir}: task {spec.name!r} has no {name} records")
    return TaskData(spec, train, test, files, references)
