"""Small benchmarks in the official file formats, written for the tests (random images, words
the tiny tokenizers know), in the folder layout `evaluation.tasks.TASKS[...].files` names."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = [
    "a", "cat", "dog", "red", "blue", "small", "large", "photo", "of", "the", "on", "in", "with",
    "two", "one", "man", "woman", "car", "tree", "house", "sky", "water", "green",
]  # fmt: skip


def _image(path: Path, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (40, 48, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="JPEG", quality=92)


def _sentence(rng: random.Random, n: int = 5) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def build_coco(root: Path, n_train: int = 10, n_test: int = 6, seed: int = 0) -> Path:
    """dataset_coco.json (Karpathy) + annotations/captions_val2014.json + image folders."""
    rng = random.Random(seed)
    images, annotations = [], []
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        folder = "train2014" if split == "train" else "val2014"
        cocoid = 1000 + i
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        _image(root / folder / name, rng)
        sentences = [{"raw": _sentence(rng) + (" ." if k == 0 else ""), "tokens": []}
                     for k in range(3)]  # fmt: skip
        images.append({"filepath": folder, "filename": name, "cocoid": cocoid, "split": split,
                       "sentences": sentences})  # fmt: skip
        if split == "test":
            for k, s in enumerate(sentences):
                annotations.append({"image_id": cocoid, "id": cocoid * 10 + k, "caption": s["raw"]})
    images.append({"filepath": "train2014", "filename": "x.jpg", "cocoid": 1, "split": "restval",
                   "sentences": [{"raw": "never used"}]})  # fmt: skip
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    coco = {"info": {}, "licenses": [], "type": "captions",
            "images": [{"id": im["cocoid"]} for im in images if im["split"] == "test"],
            "annotations": annotations}  # fmt: skip
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(coco))
    return root


_VQA_META = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
             "data_subtype": "val2014", "license": {}}  # fmt: skip


def build_vqa(root: Path, task: str = "vqav2", n_train: int = 10, n_test: int = 6,
              seed: int = 0) -> Path:  # fmt: skip
    """VQA-format questions + annotations (10 answers each) for vqav2, textvqa or vizwiz."""
    from evaluation.tasks import TASKS

    files = TASKS[task].files
    rng = random.Random(seed)
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 500)):
        folder = root / files[f"{split}_image_dir_path"]
        questions, annotations = [], []
        for i in range(n):
            image_id = offset + i // 2  # two questions per image
            if task == "vqav2":
                name, ref = f"COCO_{folder.name}_{image_id:012d}.jpg", image_id
            elif task == "vizwiz":
                name = ref = f"VizWiz_{split}_{image_id:08d}.jpg"
            else:
                ref, name = f"{image_id:016x}", f"{image_id:016x}.jpg"
            if not (folder / name).exists():
                _image(folder / name, rng)
            qid = image_id * 10 + i % 2
            questions.append({"image_id": ref, "question": _sentence(rng, 4) + "?",
                              "question_id": qid})  # fmt: skip
            words = [rng.choice([*WORDS[:6], "two", "Two.", "the cat", "one"]) for _ in range(10)]
            answers = [{"answer": w, "answer_confidence": "yes", "answer_id": k + 1}
                       for k, w in enumerate(words)]  # fmt: skip
            annotations.append({"question_id": qid, "image_id": ref, "question_type": "what",
                                "answer_type": "other", "answers": answers,
                                "multiple_choice_answer": words[0]})  # fmt: skip
        (root / files[f"{split}_questions_json_path"]).write_text(
            json.dumps({**_VQA_META, "questions": questions})
        )
        (root / files[f"{split}_annotations_json_path"]).write_text(
            json.dumps({**_VQA_META, "annotations": annotations})
        )
    return root


def build_hateful_memes(root: Path, n_train: int = 10, n_test: int = 8, seed: int = 0) -> Path:
    """img/*.png + train.jsonl + dev_seen.jsonl (both labels in the test split)."""
    rng = random.Random(seed)
    for name, n, offset in (("train.jsonl", n_train, 100), ("dev_seen.jsonl", n_test, 900)):
        lines = []
        for i in range(n):
            meme = offset + i
            _image(root / "img" / f"{meme:05d}.png", rng)
            lines.append(json.dumps({"id": meme, "img": f"img/{meme:05d}.png",
                                     "label": i % 2, "text": _sentence(rng, 6)}))  # fmt: skip
        (root / name).write_text("\n".join(lines) + "\n")
    return root
