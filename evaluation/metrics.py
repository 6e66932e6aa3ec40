"""The benchmarks' metrics, with the definitions open_flamingo's evaluation uses.

* CIDEr: pycocoevalcap's `Cider` scorer on captions tokenized by its `PTBTokenizer` (Stanford
  CoreNLP 3.4.1, run with `java`), references from the COCO-format annotation file, images in
  that file's order, x 100 (`coco_metric.compute_cider` through `COCOEvalCap`; its other
  scorers, SPICE included, are not run: SPICE downloads models).
* VQA accuracy: the official VQA evaluation as `vqa_metric.VQAEval` has it: answers with
  newlines/tabs as spaces, stripped, punctuation and digits/articles/contractions normalized;
  per question the mean over the ground-truth answers of min(1, matches among the others / 3);
  over questions the mean x 100, rounded to 2 decimals.
* ROC AUC (Hateful Memes): P("yes") of each item against its label, ties averaged (the
  Mann-Whitney form of sklearn's `roc_auc_score`); NaN when the items have one label only.
* exact match (the demo task): the share of answers equal to the expected one, x 100.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import CaptionReferences, read_coco_captions, read_vqa_answers
from .tasks import EvaluationError

__all__ = [
    "cider",
    "exact_match",
    "normalize_vqa_answer",
    "require_cider",
    "roc_auc",
    "vqa_accuracy",
]


# ------------------------------------------------------------------ CIDEr


def require_cider() -> None:
    """pycocoevalcap (the `eval` extra) and a `java` on PATH, or an EvaluationError saying so."""
    try:
        import pycocoevalcap.cider.cider
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError as e:
        raise EvaluationError(
            f"CIDEr needs pycocoevalcap: pip install 'flamingo-export[eval]' ({e})"
        ) from e
    if shutil.which("java") is None:
        raise EvaluationError(
            "CIDEr needs Java: pycocoevalcap's PTB tokenizer runs Stanford CoreNLP "
            "(install a JRE, e.g. apt-get install default-jre-headless)"
        )


def cider(
    predictions: Sequence[tuple[Any, str]], references: CaptionReferences | str | Path
) -> float:
    """CIDEr x 100 of `(image_id, caption)` predictions (the last one per image counts, as
    evaluate.py keeps one per image id) against the COCO-format references (read and checked
    by `datasets.read_coco_captions`, or the path of that file)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not isinstance(references, CaptionReferences):
        references = read_coco_captions(Path(references))
    by_image = dict(predictions)
    order, refs = references.order, references.captions
    unknown = [i for i in by_image if i not in refs or i not in order]
    if unknown:
        raise EvaluationError(
            f"no reference captions for image id(s) {unknown[:5]} "
            "(the Karpathy file and the annotation file disagree)"
        )
    ids = [i for i in order if i in by_image]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": by_image[i]}] for i in ids})
    score, _ = Cider().compute_score(gts, res)
    return float(score) * 100.0


# ------------------------------------------------------------------ VQA accuracy

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
# The official expressions, verbatim in effect: "(?!<=\d)" is a lookahead that never blocks a
# period, so every "." not followed by a digit goes; re.UNICODE is passed as sub's `count`
# (32), so at most 32 of them per answer.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(\,)(\d)")
_PERIOD_COUNT = int(re.UNICODE)


def _punctuation(text: str) -> str:
    out = text
    number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCTUATION:
        spaced = p + " " in text or " " + p in text
        out = out.replace(p, "" if spaced or number_comma else " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalization (what both predictions and ground truth get)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(answer))


def vqa_accuracy(
    predictions: Sequence[tuple[Any, str]], answers: Mapping[Any, list[dict[str, Any]]] | str | Path
) -> float:
    """VQA accuracy x 100 (2 decimals) of `(question_id, answer)` predictions against the
    ground-truth answers per question id (or the VQA annotation file's path)."""
    if not isinstance(answers, Mapping):
        answers = dict(read_vqa_answers(Path(answers)))
    per_question = []
    for question_id, answer in predictions:
        if question_id not in answers:
            raise EvaluationError(f"no annotation for question {question_id}")
        gts = [{**a, "answer": normalize_vqa_answer(a["answer"])} for a in answers[question_id]]
        predicted = normalize_vqa_answer(answer)
        accs = [min(1.0, sum(o["answer"] == predicted for o in gts if o != gt) / 3) for gt in gts]
        per_question.append(sum(accs) / len(accs))
    if not per_question:
        raise EvaluationError("no predictions to score")
    return round(100 * float(sum(per_question)) / len(per_question), 2)


# ------------------------------------------------------------------ classification


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (1 = positive); ties count
    half (average ranks); NaN when only one label occurs."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    start = 0
    while start < len(s):  # average ranks over runs of equal scores
        end = start
        while end + 1 < len(s) and sorted_s[end + 1] == sorted_s[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions equal to their answer, x 100."""
    if not predictions:
        raise EvaluationError("no predictions to score")
    return 100.0 * sum(p == a for p, a in zip(predictions, answers)) / len(predictions)
