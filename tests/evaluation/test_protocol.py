"""The pieces of the protocol against open_flamingo's own functions: the seeded draws, the
VQA accuracy with its answer normalization, CIDEr, ROC AUC; and the readers' errors."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from evaluation.datasets import load_task_data
from evaluation.metrics import cider, roc_auc, vqa_accuracy
from evaluation.reference import import_open_flamingo_eval
from evaluation.sampling import distributed_sampler_order, sample_demonstrations, select_items
from evaluation.tasks import EvaluationError, postprocess_caption, postprocess_vqa

from .builders import build_coco, build_vqa


@pytest.fixture(scope="module")
def of_eval():
    return import_open_flamingo_eval()


@pytest.mark.parametrize(
    "n_test, n_train, num_samples, query_set_size, shots, seed",
    [(7, 9, -1, 9, 2, 42), (40, 30, 13, 20, 4, 0), (300, 500, 200, 64, 16, 1234)],
)
def test_draws_equal_open_flamingo(
    of_eval, monkeypatch, n_test, n_train, num_samples, query_set_size, shots, seed
) -> None:
    import torch.utils.data.distributed as dist_data

    sampler = functools.partial(dist_data.DistributedSampler, num_replicas=1, rank=0)
    monkeypatch.setattr(dist_data, "DistributedSampler", sampler)
    utils = of_eval.utils
    test = [{"i": i} for i in range(n_test)]
    train = [{"j": j} for j in range(n_train)]
    np.random.seed(seed)
    loader = utils.prepare_eval_samples(test, num_samples if num_samples > 0 else n_test, 8)
    query_set = utils.get_query_set(train, query_set_size)
    utils.random_seed(seed, 0)
    items, demos = [], []
    for batch in loader:
        items += batch["i"]
        demos += utils.sample_batch_demos_from_query_set(query_set, shots, len(batch["i"]))

    order, ours_query_set = select_items(n_test, n_train, num_samples, query_set_size, seed)
    assert order == items
    assert ours_query_set == [x["j"] for x in query_set]
    picks = sample_demonstrations(query_set_size, shots, len(order), seed)
    assert [[ours_query_set[k] for k in row] for row in picks] == [
        [d["j"] for d in row] for row in demos
    ]


def test_torch_randperm_replica() -> None:
    import torch

    for n in (1, 2, 3, 10, 257, 5000):
        g = torch.Generator()
        g.manual_seed(0)
        assert distributed_sampler_order(n) == torch.randperm(n, generator=g).tolist()


def test_too_many_samples_or_demonstrations_are_clear_errors() -> None:
    with pytest.raises(EvaluationError, match="--num-samples 9 exceeds the 5 test records"):
        select_items(5, 10, 9, 4, 0)
    with pytest.raises(EvaluationError, match="--query-set-size 2048 exceeds the 10 train"):
        select_items(5, 10, 2, 2048, 0)
    with pytest.raises(EvaluationError, match="4 demonstrations cannot be drawn"):
        sample_demonstrations(3, 4, 2, 0)


def test_post_processing_equals_open_flamingo(of_eval) -> None:
    texts = ["a cat Output: a dog", 'the "red" car', "yes, it is", "two Short answer: three",
             "blue Question: what", "Answer: x", " green , dog"]  # fmt: skip
    for t in texts:
        assert postprocess_caption(t) == of_eval.postprocess_captioning_generation(t).replace(
            '"', ""
        )
        assert postprocess_vqa(t) == of_eval.postprocess_vqa_generation(t)


TRICKY = ["Two.", "two", "the cat", "a dog,", "3,000", "3000", "isnt", "none", "Yes!", "1.5",
          "can't", "r.e.d.", " red\tcar ", "It's (blue)", "a-b", "ten", "an apple", "...",
          "somebody'd", "x;y", "hello world."]  # fmt: skip


def test_vqa_accuracy_equals_open_flamingo(of_eval, tmp_path: Path) -> None:
    rng = random.Random(0)
    questions, annotations, results = [], [], []
    for qid in range(60):
        answers = [rng.choice(TRICKY) for _ in range(10)]
        if qid % 7 == 0:
            answers[3] = answers[4]  # duplicates count once per other answer
        questions.append({"image_id": qid, "question": "q?", "question_id": qid})
        annotations.append({"question_id": qid, "image_id": qid, "question_type": "what",
                            "answer_type": "other",
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k}
                                        for k, a in enumerate(answers)]})  # fmt: skip
        results.append({"question_id": qid, "answer": rng.choice(TRICKY)})
    meta = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
            "data_subtype": "val2014", "license": {}}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps({**meta, "questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({**meta, "annotations": annotations}))
    (tmp_path / "r.json").write_text(json.dumps(results))
    theirs = of_eval.compute_vqa_accuracy(
        str(tmp_path / "r.json"), str(tmp_path / "q.json"), str(tmp_path / "a.json")
    )
    ours = vqa_accuracy([(r["question_id"], r["answer"]) for r in results], tmp_path / "a.json")
    assert 0 < ours < 100
    assert ours == theirs


def test_cider_equals_open_flamingo(of_eval, monkeypatch, tmp_path: Path) -> None:
    import pycocoevalcap.eval as cap_eval

    from evaluation.reference import _NotComputed

    monkeypatch.setattr(cap_eval, "Meteor", _NotComputed)
    monkeypatch.setattr(cap_eval, "Spice", _NotComputed)
    data = build_coco(tmp_path / "coco", n_train=0, n_test=6)
    refs = json.loads((data / "annotations" / "captions_val2014.json").read_text())
    rng = random.Random(1)
    preds = [(im["id"], rng.choice(refs["annotations"])["caption"] + " , a dog.")
             for im in reversed(refs["images"])]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in preds]))
    annotations = data / "annotations" / "captions_val2014.json"
    theirs = of_eval.compute_cider(str(tmp_path / "r.json"), str(annotations))["CIDEr"] * 100
    ours = cider(preds, annotations)
    assert ours > 0
    assert ours == pytest.approx(theirs, abs=1e-12)
    with pytest.raises(EvaluationError, match=r"no reference captions for image id\(s\) \[7\]"):
        cider([(7, "a cat")], annotations)


def test_roc_auc_equals_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50), 1)  # many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_readers_name_the_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(
        EvaluationError,
        match=r"needs the folder train2014 \(open_flamingo's --coco_train_image_dir_path\)",
    ):
        load_task_data("coco", tmp_path)
    data = build_vqa(tmp_path / "v", "vqav2")
    path = data / "v2_mscoco_val2014_annotations.json"
    doc = json.loads(path.read_text())
    doc["annotations"][2]["question_id"] = -1
    path.write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match=r"annotations\[2\]: question_id -1 but"):
        load_task_data("vqav2", data)
    del doc["annotations"][0]["answers"]
    path.write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match=r"annotations\[0\]: missing key 'answers'"):
        load_task_data("vqav2", data)
    with pytest.raises(EvaluationError, match="generates its episodes"):
        load_task_data("demo", data)
