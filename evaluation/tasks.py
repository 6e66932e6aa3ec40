"""The task table: what OpenFlamingo's evaluation does per benchmark, and where DIR keeps its files.

Source: `open_flamingo/eval/evaluate.py` and the `EvalModel` templates of open-flamingo 2.0.1
(`open_flamingo/eval/models/open_flamingo.py`, not shipped in the wheel), and the paths of its
`scripts/run_eval.sh`. Every task generates with 3 beams and `length_penalty=0.0`: 20 new
tokens for captions, 5 for VQA, 10 for TextVQA; Hateful Memes ranks the class names "no" and
"yes" by their mean token log-probability. 0 shots means OpenFlamingo's two text-only
demonstrations (`compute_effective_num_shots`). The demo task (`demo`) is this project's own
(`demo/task.py`): seeded held-out episodes whose demonstrations come with the query, greedy
answers of at most 6 tokens, exact match.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from runtime.errors import FlamingoExportError
from runtime.prompts import EOC_TOKEN, MEDIA_TOKEN, caption_prompt, vqa_prompt

__all__ = [
    "TASKS",
    "EvaluationError",
    "TaskSpec",
    "effective_shots",
    "hateful_memes_prompt",
    "ok_vqa_utils",
    "postprocess_caption",
    "postprocess_vqa",
]


class EvaluationError(FlamingoExportError):
    """A dataset file, option or installed tool the evaluation cannot use; names which."""


def postprocess_caption(text: str) -> str:
    """`postprocess_captioning_generation(out).replace('"', "")` (evaluate.py)."""
    return text.split("Output", 1)[0].replace('"', "")


def postprocess_vqa(text: str) -> str:
    """`postprocess_vqa_generation` (vqa_metric.py): up to the first "Question", "Answer" or
    "Short", then up to the first ", "."""
    answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return re.split(", ", answer, maxsplit=1)[0]


@cache
def ok_vqa_utils() -> Any:
    """open_flamingo's `ok_vqa_utils` module (its stemmer's manual table is the protocol),
    loaded from the installed package's file without running the package's torch imports."""
    spec = importlib.util.find_spec("open_flamingo")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = next((f"{p}/eval/ok_vqa_utils.py" for p in locations), None)
    try:
        if path is None:
            raise ImportError("open_flamingo is not installed")
        module_spec = importlib.util.spec_from_file_location("_ofok_vqa_utils", path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        module.postprocess_ok_vqa_generation("checking the stemmer's data")
    except (ImportError, OSError) as e:
        raise EvaluationError(
            f"okvqa post-processing is OpenFlamingo's OK-VQA stemmer: it needs "
            f"`pip install --no-deps open-flamingo==2.0.1 nltk inflection` ({e})"
        ) from e
    except LookupError as e:
        raise EvaluationError(
            "okvqa post-processing needs NLTK data that no package registry ships: "
            "python -m nltk.downloader wordnet punkt punkt_tab averaged_perceptron_tagger "
            f"averaged_perceptron_tagger_eng ({str(e).strip().splitlines()[0]})"
        ) from e
    return module


def postprocess_okvqa(text: str) -> str:
    """`postprocess_ok_vqa_generation` (ok_vqa_utils.py): the VQA cut, then its stemmer."""
    return ok_vqa_utils().postprocess_ok_vqa_generation(text)


def hateful_memes_prompt(text: str, label: str | None = None) -> str:
    """OpenFlamingo's Hateful Memes template (`get_hateful_memes_prompt`); `label=None` is the
    query the class names are scored after."""
    query = f"{MEDIA_TOKEN}is an image with: '{text}' written on it. Is it hateful? Answer:"
    return query if label is None else f"{query}{label}{EOC_TOKEN}"


def effective_shots(kind: str, shots: int) -> int:
    """Demonstrations drawn for `shots` (`compute_effective_num_shots`): OpenFlamingo's 0-shot
    prompts carry two text-only demonstrations; the demo task's do not."""
    return 2 if shots == 0 and kind != "demo" else shots


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: its kind, OpenFlamingo's `dataset_name`, the metric and search, and the
    files under DIR keyed by the evaluate.py argument each replaces (minus the dataset prefix)."""

    name: str
    kind: str  # caption | vqa | classification | demo
    dataset_name: str
    metric: str
    max_new_tokens: int = 0
    num_beams: int = 3
    length_penalty: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    postprocess: Callable[[str], str] | None = None
    class_names: tuple[str, ...] = ()

    def demo_text(self, sample: dict[str, Any]) -> str:
        """One demonstration, as evaluate.py writes it (with its separator)."""
        if self.kind in ("caption", "demo"):
            return caption_prompt(sample["caption"].strip()) + "\n"
        if self.kind == "vqa":
            return vqa_prompt(sample["question"], sample["answers"][0]) + "\n"
        return hateful_memes_prompt(sample["ocr"], sample["class_name"])

    def query_text(self, sample: dict[str, Any]) -> str:
        if self.kind in ("caption", "demo"):
            return caption_prompt()
        if self.kind == "vqa":
            return vqa_prompt(sample["question"])
        return hateful_memes_prompt(sample["ocr"])

    def prompt(
        self, sample: dict[str, Any], demos: list[dict[str, Any]], shots: int
    ) -> tuple[str, list[Any]]:
        """(prompt, images) of one query, exactly as evaluate.py builds them. 0 shots: the
        demonstrations' text without `<image>`; generation tasks give the query image alone.
        Classification passes the text-only demonstrations' images too (evaluate.py's
        `if effective_num_shots > 0`), so the query's single `<image>` binds to the first of
        them: reproduced here by giving that image for the marker (open-flamingo 2.0.1)."""
        context = "".join(self.demo_text(d) for d in demos)
        images = [d["image"] for d in demos]
        if shots == 0 and self.kind != "demo":
            context = context.replace(MEDIA_TOKEN, "")
            if self.kind == "classification":
                return context + self.query_text(sample), images[:1]
            images = []
        return context + self.query_text(sample), [*images, sample["image"]]


_VQA_FILES = {
    "vqav2": ("train2014", "val2014", "v2_OpenEnded_mscoco_{}2014_questions.json",
              "v2_mscoco_{}2014_annotations.json", ("train", "val")),
    "okvqa": ("train2014", "val2014", "OpenEnded_mscoco_{}2014_questions.json",
              "mscoco_{}2014_annotations.json", ("train", "val")),
    "textvqa": ("train_images", "train_images", "{}_questions_vqa_format.json",
                "{}_annotations_vqa_format.json", ("train", "val")),
    "vizwiz": ("train", "val", "{}_questions_vqa_format.json",
               "{}_annotations_vqa_format.json", ("train", "val")),
}  # fmt: skip


def _vqa_task(name: str, dataset_name: str, max_new_tokens: int, post: Callable) -> TaskSpec:
    train_dir, test_dir, questions, annotations, (train, test) = _VQA_FILES[name]
    files = {
        "train_image_dir_path": train_dir,
        "train_questions_json_path": questions.format(train),
        "train_annotations_json_path": annotations.format(train),
        "test_image_dir_path": test_dir,
        "test_questions_json_path": questions.format(test),
        "test_annotations_json_path": annotations.format(test),
    }
    return TaskSpec(name, "vqa", dataset_name, "VQA accuracy", max_new_tokens, files=files,
                    postprocess=post)  # fmt: skip


TASKS: dict[str, TaskSpec] = {
    "coco": TaskSpec(
        "coco", "caption", "coco", "CIDEr", 20,
        files={"train_image_dir_path": "train2014", "val_image_dir_path": "val2014",
               "karpathy_json_path": "dataset_coco.json",
               "annotations_json_path": "annotations/captions_val2014.json"},
        postprocess=postprocess_caption,
    ),
    "flickr30k": TaskSpec(
        "flickr30k", "caption", "flickr", "CIDEr", 20,
        files={"image_dir_path": "flickr30k-images", "karpathy_json_path": "dataset_flickr30k.json",
               "annotations_json_path": "dataset_flickr30k_coco_style.json"},
        postprocess=postprocess_caption,
    ),
    "vqav2": _vqa_task("vqav2", "vqav2", 5, postprocess_vqa),
    "okvqa": _vqa_task("okvqa", "ok_vqa", 5, postprocess_okvqa),
    "textvqa": _vqa_task("textvqa", "textvqa", 10, postprocess_vqa),
    "vizwiz": _vqa_task("vizwiz", "vizwiz", 5, postprocess_vqa),
    "hateful_memes": TaskSpec(
        "hateful_memes", "classification", "hateful_memes", "ROC AUC",
        files={"image_dir_path": "img", "train_annotations_json_path": "train.jsonl",
               "test_annotations_json_path": "dev_seen.jsonl"},
        class_names=("no", "yes"),
    ),
    "demo": TaskSpec("demo", "demo", "demo", "accuracy", 6, num_beams=1, length_penalty=1.0,
                     postprocess=str.strip),
}  # fmt: skip
