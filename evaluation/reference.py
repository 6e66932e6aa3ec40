"""The reference: OpenFlamingo's own evaluation loop (open-flamingo 2.0.1) on a PyTorch model.

For the equality tests and the speed benchmark, never for `flamingo-export eval` (it imports
torch). `import_open_flamingo_eval()` imports `open_flamingo/eval/evaluate.py` and its sibling
modules the way `flamingo.oracle.import_open_flamingo` imports the model: an empty `open_clip`
module stands in (and a `torchvision.datasets.ImageFolder` placeholder, used only by ImageNet);
`run_open_flamingo_eval` then calls its `evaluate_captioning` / `evaluate_vqa` /
`evaluate_classification` for one shot count and seed, with

* `ReferenceEvalModel`: OpenFlamingo's `EvalModel` interface (its `models/open_flamingo.py`,
  not shipped in the wheel: the templates below are that file's) over our PyTorch Flamingo
  (`flamingo.generate` for `get_outputs`, full-sequence logits for
  `get_rank_classifications`); with `batched=False` every row runs alone (a row's answer does
  not depend on its batch, and alone it is computed exactly as the export's is);
* one process: `DistributedSampler` with one replica and `all_gather_object` of one rank (what
  torch.distributed gives a world of size 1, without starting a process group);
* the temporary result files evaluate.py writes in the working directory put in a temporary
  folder, and read back for the per-item predictions;
* pycocoevalcap's METEOR and SPICE scorers (`COCOEvalCap` runs all five; SPICE downloads
  Stanford CoreNLP models) replaced by placeholders: CIDEr is the score compared;
* RICES's `open_clip.create_model_and_transforms` answering with the features given.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys
import tempfile
import types
from argparse import Namespace
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.images import PreprocessConfig, preprocess

from .tasks import TaskSpec

__all__ = [
    "ReferenceEvalModel",
    "import_open_flamingo_eval",
    "run_open_flamingo_eval",
]

_EVAL_MODULES = ("utils", "coco_metric", "eval_datasets", "rices", "classification_utils",
                 "eval_model", "ok_vqa_utils", "vqa_metric", "evaluate")  # fmt: skip
_ARG_PREFIX = {"coco": "coco", "flickr": "flickr", "vqav2": "vqav2", "ok_vqa": "ok_vqa",
               "textvqa": "textvqa", "vizwiz": "vizwiz",
               "hateful_memes": "hateful_memes"}  # fmt: skip


@functools.cache
def import_open_flamingo_eval() -> types.ModuleType:
    """open_flamingo's `eval/evaluate.py` as a module (its siblings imported as it expects)."""
    from flamingo.oracle import import_open_flamingo

    import_open_flamingo()  # the open_clip stand-in
    try:
        import torchvision.datasets  # noqa: F401
    except ImportError:  # only ImageNetDataset subclasses ImageFolder
        datasets = types.ModuleType("torchvision.datasets")
        datasets.ImageFolder = type("ImageFolder", (), {})  # type: ignore[attr-defined]
        sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
        sys.modules["torchvision.datasets"] = datasets
    import open_flamingo

    eval_dir = str(Path(open_flamingo.__file__).parent / "eval")
    sys.path.insert(0, eval_dir)
    try:
        evaluate = importlib.import_module("evaluate")
    finally:
        sys.path.remove(eval_dir)
        for name in _EVAL_MODULES:  # evaluate keeps its references; free the bare names
            sys.modules.pop(name, None)
    return evaluate


class ReferenceEvalModel:
    """OpenFlamingo's `EvalModel` over our PyTorch Flamingo (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, batched: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.batched = batched
        self.device = "cpu"
        self.lm_name = "reference"
        size = model.cfg.vision.image_size
        self.preprocess_config = PreprocessConfig(image_size=size)
        self.scored: list[list[float]] = []  # every get_rank_classifications row, in order

    # templates of open_flamingo/eval/models/open_flamingo.py (2.0.1)
    def get_vqa_prompt(self, question: str, answer: str | None = None) -> str:
        return f"<image>Question:{question} Short answer:{answer if answer is not None else ''}{'<|endofchunk|>' if answer is not None else ''}"  # noqa: E501

    def get_caption_prompt(self, caption: str | None = None) -> str:
        return f"<image>Output:{caption if caption is not None else ''}{'<|endofchunk|>' if caption is not None else ''}"  # noqa: E501

    def get_hateful_memes_prompt(self, text: str, label: str | None = None) -> str:
        return f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}"  # noqa: E501

    def _vision_x(self, batch_images: Sequence[Sequence[Any]]) -> Any:
        """(B, T_img, 1, C, H, W), rows with fewer images zero-padded (`_prepare_images`)."""
        import torch

        most = max(len(x) for x in batch_images)
        size = self.preprocess_config.image_size
        out = torch.zeros((len(batch_images), most, 1, 3, size, size))
        for b, images in enumerate(batch_images):
            if images:
                out[b, : len(images), 0] = torch.from_numpy(
                    preprocess(list(images), self.preprocess_config)
                )
        return out

    def _rows(self, batch_text: list[str], batch_images: list[list[Any]]) -> Iterator[tuple]:
        if self.batched:
            yield batch_text, batch_images
        else:
            for text, images in zip(batch_text, batch_images):
                yield [text], [images]

    def get_outputs(
        self,
        batch_text: list[str],
        batch_images: list[list[Any]],
        min_generation_length: int,
        max_generation_length: int,
        num_beams: int,
        length_penalty: float,
    ) -> list[str]:
        from flamingo.generate import generate

        assert min_generation_length == 0  # what evaluate.py passes
        out = []
        for texts, images in self._rows(batch_text, batch_images):
            enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=2000,
                                 return_tensors="pt")  # fmt: skip
            result = generate(
                self.model,
                self._vision_x(images),
                enc["input_ids"],
                enc["attention_mask"],
                max_new_tokens=max_generation_length,
                num_beams=num_beams,
                length_penalty=length_penalty,
            )
            out += self.tokenizer.batch_decode(result.sequences, skip_special_tokens=True)
        return out

    def get_rank_classifications(
        self,
        batch_text: list[str],
        batch_images: list[list[Any]],
        all_class_names: list[str],
        use_cache: bool,
        normalize_length: bool,
    ) -> Any:
        """(B, C) log-likelihood of each class name after each row, rows alone (the cached
        path of OpenFlamingo attends to left pads; alone there are none)."""
        import torch

        assert normalize_length
        rows = []
        for text, images in zip(batch_text, batch_images):
            context = self.tokenizer(text, return_tensors="pt")["input_ids"]
            vision_x = self._vision_x([images])
            row = []
            for name in all_class_names:
                ids = self.tokenizer(name, add_special_tokens=False, return_tensors="pt")
                class_ids = ids["input_ids"]
                with torch.no_grad():
                    logits = self.model(vision_x, torch.cat([context, class_ids], dim=1))
                n = class_ids.shape[1]
                logprobs = torch.log_softmax(logits.float(), dim=-1)[:, -n - 1 : -1]
                row.append(torch.gather(logprobs, 2, class_ids[:, :, None]).squeeze(-1).mean(1))
            rows.append(torch.cat(row))
            self.scored.append([float(v) for v in rows[-1]])
        return torch.stack(rows)


class _NotComputed:
    """A pycocoevalcap scorer placeholder (METEOR, SPICE are not part of the comparison)."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        return 0.0, [0.0] * len(gts)

    def method(self) -> str:
        return "not computed"


@contextlib.contextmanager
def _one_process(evaluate: types.ModuleType, features: Callable | None) -> Iterator[dict]:
    """World of size 1, results captured, CIDEr without METEOR/SPICE, RICES features given."""
    import pycocoevalcap.eval as cap_eval
    import torch
    import torch.utils.data.distributed as dist_data

    captured: dict[str, Any] = {}
    saved = {
        (torch.distributed, "all_gather_object"): torch.distributed.all_gather_object,
        (dist_data, "DistributedSampler"): dist_data.DistributedSampler,
        (cap_eval, "Meteor"): cap_eval.Meteor,
        (cap_eval, "Spice"): cap_eval.Spice,
        (evaluate, "compute_cider"): evaluate.compute_cider,
        (evaluate, "compute_vqa_accuracy"): evaluate.compute_vqa_accuracy,
        (evaluate, "roc_auc_score"): evaluate.roc_auc_score,
    }
    sampler = functools.partial(dist_data.DistributedSampler, num_replicas=1, rank=0)

    def gather(out: list, obj: Any) -> None:
        out[0] = obj

    def cider(result_path: str, annotations_path: str) -> Any:
        captured["results"] = json.loads(Path(result_path).read_text())
        return saved[(evaluate, "compute_cider")](result_path, annotations_path)

    def vqa(result_path: str, questions: str, annotations: str) -> Any:
        captured["results"] = json.loads(Path(result_path).read_text())
        return saved[(evaluate, "compute_vqa_accuracy")](result_path, questions, annotations)

    def auc(labels: list, scores: list) -> Any:
        captured["results"] = {"labels": list(labels), "scores": [float(s) for s in scores]}
        return saved[(evaluate, "roc_auc_score")](labels, scores)

    replacements = {
        (torch.distributed, "all_gather_object"): gather,
        (dist_data, "DistributedSampler"): sampler,
        (cap_eval, "Meteor"): _NotComputed,
        (cap_eval, "Spice"): _NotComputed,
        (evaluate, "compute_cider"): cider,
        (evaluate, "compute_vqa_accuracy"): vqa,
        (evaluate, "roc_auc_score"): auc,
    }
    open_clip = sys.modules["open_clip"]
    had_factory = hasattr(open_clip, "create_model_and_transforms")
    if features is not None:
        open_clip.create_model_and_transforms = features  # type: ignore[attr-defined]
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for (owner, name), value in replacements.items():
                setattr(owner, name, value)
            os.chdir(tmp)  # evaluate.py writes its result files into the working directory
            yield captured
        finally:
            os.chdir(cwd)
            for (owner, name), value in saved.items():
                setattr(owner, name, value)
            if features is not None and not had_factory:
                del open_clip.create_model_and_transforms


def rices_factory(features: Any) -> Callable:
    """An `open_clip.create_model_and_transforms` for RICES from an
    `evaluation.rices.FeatureSource`: its preprocessing as the image processor, its pixel
    encoder as `encode_image` (RICES normalizes and compares)."""
    import torch

    class Encoder(torch.nn.Module):
        def encode_image(self, pixels: Any) -> Any:
            return torch.from_numpy(np.asarray(features.encode_pixels(pixels.numpy())))

    def processor(image: Any) -> Any:
        return torch.from_numpy(preprocess([image], features.preprocess_config)[0])

    def create(*_: Any, **__: Any) -> tuple[Any, None, Callable]:
        return Encoder(), None, processor

    return create


def run_open_flamingo_eval(
    task: TaskSpec,
    data_dir: str | Path,
    eval_model: ReferenceEvalModel,
    *,
    shots: int,
    seed: int,
    num_samples: int = -1,
    query_set_size: int = 2048,
    batch_size: int = 8,
    rices_features: Any = None,
) -> tuple[float, Any]:
    """(score, the results evaluate.py scored) of one trial of OpenFlamingo's evaluation:
    caption/VQA: its result list ({image_id, caption} / {answer, question_id}); Hateful
    Memes: {labels, scores} as given to roc_auc_score."""
    evaluate = import_open_flamingo_eval()
    prefix = _ARG_PREFIX[task.dataset_name]
    args = Namespace(
        model="open_flamingo", rank=0, world_size=1, batch_size=batch_size,
        num_samples=num_samples, query_set_size=query_set_size,
        rices=rices_features is not None, rices_vision_encoder_path="given",
        rices_vision_encoder_pretrained="given",
    )  # fmt: skip
    for key, rel in task.files.items():
        name = f"{prefix}_{key}"
        if task.dataset_name == "textvqa" and key.endswith("image_dir_path"):
            name = "textvqa_image_dir_path"
        setattr(args, name, str(Path(data_dir) / rel))
    factory = rices_factory(rices_features) if rices_features is not None else None
    common = {"eval_model": eval_model, "num_shots": shots, "seed": seed}
    with _one_process(evaluate, factory) as captured:
        if task.kind == "caption":
            value = evaluate.evaluate_captioning(args, dataset_name=task.dataset_name, **common)
        elif task.kind == "vqa":
            value = evaluate.evaluate_vqa(
                args, dataset_name=task.dataset_name,
                max_generation_length=task.max_new_tokens, **common,
            )  # fmt: skip
        else:
            value = evaluate.evaluate_classification(args, dataset_name=task.dataset_name, **common)
    return float(value), captured.get("results")
