"""`flamingo-export eval` on the fp32 export equals open_flamingo's own evaluation (its
evaluate.py functions, datasets, sampling, post-processing and metrics) run on the PyTorch
reference's generations: per item, and the score, for every task whose protocol installs from
the registries. OK-VQA is left out: its post-processing stems with NLTK corpora (wordnet,
punkt, the perceptron tagger) that no package registry ships."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from evaluation.reference import ReferenceEvalModel, run_open_flamingo_eval
from evaluation.rices import FeatureSource
from evaluation.runner import EvalOptions, Trial, evaluate
from evaluation.tasks import TASKS
from runtime.images import PreprocessConfig
from runtime.pipeline import FlamingoPipeline

from .builders import build_coco, build_hateful_memes, build_vqa

FAMILY = "llama"
SAMPLES, QUERY_SET = 5, 8


@pytest.fixture(scope="module")
def reference(tiny_model: Callable) -> Iterator[ReferenceEvalModel]:
    """The PyTorch reference under open_flamingo's loop; one torch thread (this tiny model
    runs ~8x slower on two threads of a 2-core machine)."""
    import torch

    model, tokenizer, _, _ = tiny_model(FAMILY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield ReferenceEvalModel(model, tokenizer)
    finally:
        torch.set_num_threads(threads)


def _ours(tiny_export: Callable, task: str, data: Path, options: EvalOptions) -> list:
    export = tiny_export(FAMILY)
    return evaluate([export], task, data, options, FlamingoPipeline).exports[0].trials


def _theirs(reference: ReferenceEvalModel, task: str, data: Path, trial: Trial, **kw) -> tuple:
    return run_open_flamingo_eval(
        TASKS[task], data, reference, shots=trial.shots, seed=trial.seed,
        num_samples=SAMPLES, query_set_size=QUERY_SET, batch_size=3, **kw,
    )  # fmt: skip


def _reference_features(reference: ReferenceEvalModel) -> FeatureSource:
    """RICES features of the PyTorch reference: the mean resampler latent, as the export's."""
    import torch

    def encode(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return reference.model.encode_images(torch.from_numpy(pixels)).mean(1).numpy()

    return FeatureSource(PreprocessConfig(reference.model.cfg.vision.image_size), encode)


def test_coco_captions_and_cider_equal_open_flamingo(tiny_export, reference, tmp_path) -> None:
    data = build_coco(tmp_path / "coco")
    options = EvalOptions(shots=(0, 2), seed=5, num_samples=SAMPLES, query_set_size=QUERY_SET)
    trials = _ours(tiny_export, "coco", data, options)
    assert [t.shots for t in trials] == [0, 2]
    for trial in trials:
        score, results = _theirs(reference, "coco", data, trial)
        ours = [(p["id"], p["prediction"]) for p in trial.predictions]
        assert ours == [(r["image_id"], r["caption"]) for r in results]
        assert any(p.strip() for _, p in ours)  # captions were generated, not all empty
        assert trial.score == pytest.approx(score, abs=1e-9)


@pytest.mark.parametrize("task, rices", [("vqav2", True), ("textvqa", False), ("vizwiz", False)])
def test_vqa_answers_and_accuracy_equal_open_flamingo(
    tiny_export, reference, tmp_path, task: str, rices: bool
) -> None:
    data = build_vqa(tmp_path / task, task)
    options = EvalOptions(shots=(0, 2), seed=3, num_samples=SAMPLES, query_set_size=QUERY_SET,
                          rices=rices)  # fmt: skip
    trials = _ours(tiny_export, task, data, options)
    features = _reference_features(reference) if rices else None
    for trial in trials:
        score, results = _theirs(reference, task, data, trial, rices_features=features)
        ours = [(p["id"], p["prediction"]) for p in trial.predictions]
        assert ours == [(r["question_id"], r["answer"]) for r in results]
        assert trial.score == pytest.approx(score, abs=1e-9)


def test_hateful_memes_scores_and_roc_auc_equal_open_flamingo(
    tiny_export, reference, tmp_path
) -> None:
    data = build_hateful_memes(tmp_path / "hm")
    options = EvalOptions(shots=(0, 2), seed=7, num_samples=6, query_set_size=QUERY_SET)
    trials = _ours(tiny_export, "hateful_memes", data, options)
    for trial in trials:
        reference.scored.clear()
        score, results = run_open_flamingo_eval(
            TASKS["hateful_memes"], data, reference, shots=trial.shots, seed=trial.seed,
            num_samples=6, query_set_size=QUERY_SET, batch_size=4,
        )  # fmt: skip
        labels = ["yes" if q.reference == "yes" else "no" for q in _planned(trial, data)]
        assert results["labels"] == labels
        ours = [p["score"] for p in trial.predictions]
        assert ours == pytest.approx(results["scores"], abs=1e-5)
        assert len(set(np.round(ours, 4))) > 1  # the images and demonstrations matter
        assert trial.score == pytest.approx(score, abs=1e-9)


def _planned(trial, data: Path) -> list:
    """The queries of an evaluated trial, re-planned (predictions carry ids only)."""
    from evaluation.datasets import load_task_data
    from evaluation.runner import plan

    options = EvalOptions(shots=(trial.shots,), seed=trial.seed, num_samples=6,
                          query_set_size=QUERY_SET)  # fmt: skip
    return plan(load_task_data("hateful_memes", data), options)[0].queries


def test_batch_size_and_prefix_cache_do_not_change_answers(tiny_export, tmp_path) -> None:
    """Queries batched (default 8, evaluate.py's) or alone, with the prefix cache used only
    where demonstrations repeat: the same predictions."""
    from evaluation.runner import Query, repeated_prefixes

    data = build_coco(tmp_path / "coco")
    runs = {
        size: _ours(tiny_export, "coco", data, EvalOptions(
            shots=(2,), seed=5, num_samples=SAMPLES, query_set_size=2, batch_size=size))
        for size in (1, 8)
    }  # fmt: skip
    assert runs[1][0].predictions == runs[8][0].predictions
    # query set of 2 at 2 shots: the same two demonstrations, in either order
    shown = "<image>Output:a<|endofchunk|><image>Output:b<|endofchunk|><image>Output:"
    swapped = "<image>Output:b<|endofchunk|><image>Output:a<|endofchunk|><image>Output:"
    a, b, q1, q2 = "a.jpg", "b.jpg", "q1.jpg", "q2.jpg"
    assert not repeated_prefixes([Query(1, shown, [a, b, q1]), Query(2, swapped, [b, a, q2])])
    assert repeated_prefixes([Query(1, shown, [a, b, q1]), Query(2, shown, [a, b, q2])])
    assert not repeated_prefixes([Query(1, shown, [a, b, q1]), Query(2, shown, [b, a, q2])])
    assert not repeated_prefixes(
        [Query(1, "<image>Output:", [q1]), Query(2, "<image>Output:", [q2])]
    )
