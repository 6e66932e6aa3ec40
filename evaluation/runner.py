"""Plan once, run every export, score: OpenFlamingo's evaluation loop on `FlamingoPipeline`.

`plan` fixes, per shot count and trial, the test items in evaluation order, their
demonstrations and prompts (`evaluation.sampling`, `evaluation.rices`, `TaskSpec.prompt`);
`run_export` answers them with one export (each query alone: a row's answer does not depend on
its batch, and a repeated demonstration prefix is prefilled once by the pipeline's prefix
cache, a repeated image encoded once by its vision cache), post-processes and scores them.
Several exports get the same plan, so their scores differ by the engines alone.

Generation tasks decode the new tokens as OpenFlamingo's `tokenizer.batch_decode(...,
skip_special_tokens=True)` does: the pipeline's text is transformers' `decode` of the export's
tokenizer (runtime.tokenizer, `clean_up_tokenization_spaces` included). Hateful Memes scores
each class name's tokens after the prompt (mean log-probability, `get_rank_classifications`
with normalize_length) in one left-padded prefill of one row per class.
"""

from __future__ import annotations

import math
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.decoding import rows_cross_kv
from runtime.generation import log_softmax
from runtime.images import preprocess
from runtime.prompts import EOC_TOKEN, MEDIA_TOKEN

from . import metrics
from .datasets import TaskData
from .rices import Retriever
from .sampling import MAX_SEED, sample_demonstrations, select_items
from .tasks import TASKS, EvaluationError, TaskSpec, effective_shots

__all__ = [
    "EvalOptions",
    "EvaluationResult",
    "ExportResult",
    "Query",
    "Trial",
    "TrialResult",
    "class_logprobs",
    "plan",
    "plan_demo",
    "run_export",
]

Progress = Callable[[str], None]
DEFAULT_SEED = 42  # evaluate.py's --trial_seeds default


@dataclass
class EvalOptions:
    """evaluate.py's trial arguments. Trial t uses seed `seed + t`; `num_samples <= 0` is every
    test item; `query_set_size` is ignored with `rices`."""

    shots: tuple[int, ...] = (0, 4, 8, 16, 32)
    trials: int = 1
    seed: int = DEFAULT_SEED
    num_samples: int = -1
    query_set_size: int = 2048
    rices: bool = False
    batch_size: int = 8  # queries per generate_batch (evaluate.py's --batch_size default)

    def validate(self) -> None:
        if not self.shots or any(s < 0 for s in self.shots):
            raise EvaluationError(f"shots must be >= 0, got {list(self.shots)}")
        if len(set(self.shots)) != len(self.shots):
            raise EvaluationError(f"shots are listed twice: {list(self.shots)}")
        if self.trials < 1:
            raise EvaluationError(f"--trials must be >= 1, got {self.trials}")
        last = self.seed + self.trials - 1
        if self.seed < 0 or last > MAX_SEED:
            raise EvaluationError(
                f"trial seeds --seed {self.seed} .. {last} (--seed + --trials - 1) must lie in "
                f"[0, {MAX_SEED}] (numpy's RandomState seeds)"
            )
        if not self.rices and self.query_set_size < 1:
            raise EvaluationError(f"--query-set-size must be >= 1, got {self.query_set_size}")
        if self.batch_size < 1:
            raise EvaluationError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass
class Query:
    """One test item with its demonstrations: the prompt and images the model gets, and what
    its prediction is scored against (`reference`: demo answer, class label, else the id)."""

    id: Any
    prompt: str
    images: list[Any]
    reference: Any = None
    group: str | None = None  # demo: the attribute asked


@dataclass
class Trial:
    shots: int
    trial: int
    seed: int
    queries: list[Query]


@dataclass
class TrialResult:
    shots: int
    trial: int
    seed: int
    score: float
    predictions: list[dict[str, Any]]
    seconds: float
    breakdown: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("shots", "trial", "seed", "score", "seconds")}
        if self.breakdown:
            out["breakdown"] = self.breakdown
        out["predictions"] = self.predictions
        return out


@dataclass
class ExportResult:
    export: str
    precision: str
    trials: list[TrialResult]

    def scores(self) -> dict[int, dict[str, Any]]:
        """Per shot count: every trial's score, their mean and standard deviation (NaN-aware,
        as evaluate.py's np.nanmean / np.nanstd)."""
        out: dict[int, dict[str, Any]] = {}
        for t in self.trials:
            out.setdefault(t.shots, {"trials": []})["trials"].append(t.score)
        for row in out.values():
            values = np.array(row["trials"], dtype=np.float64)
            finite = not np.isnan(values).all()
            row["mean"] = float(np.nanmean(values)) if finite else float("nan")
            row["stddev"] = float(np.nanstd(values)) if finite else float("nan")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "export": self.export,
            "precision": self.precision,
            "scores": {str(k): v for k, v in self.scores().items()},
            "trials": [t.to_dict() for t in self.trials],
        }


@dataclass
class EvaluationResult:
    task: str
    metric: str
    protocol: dict[str, Any]
    exports: list[ExportResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "protocol": self.protocol,
            "exports": [e.to_dict() for e in self.exports],
        }


# ------------------------------------------------------------------ planning


def _item_id(task: TaskSpec, sample: dict[str, Any]) -> Any:
    key = {"caption": "image_id", "vqa": "question_id"}.get(task.kind, "id")
    return sample[key]


def _query(
    task: TaskSpec, sample: dict[str, Any], demos: list[dict[str, Any]], shots: int
) -> Query:
    prompt, images = task.prompt(sample, demos, shots)
    reference = sample.get("class_name") if task.kind == "classification" else None
    return Query(_item_id(task, sample), prompt, images, reference)


def check_image(image: Any, what: str) -> None:
    """EvaluationError unless a path `image` is an existing regular file (a FIFO or device
    would block or stream forever when opened)."""
    if not isinstance(image, Path):
        return
    try:
        mode = image.stat().st_mode
    except OSError:
        raise EvaluationError(f"image file not found: {image} ({what})") from None
    if not stat.S_ISREG(mode):
        raise EvaluationError(f"image {image} is not a regular file ({what})")


def _check_images(queries: Sequence[Query]) -> None:
    for q in queries:
        for image in q.images:
            check_image(image, f"item {q.id!r}")


def _check_classes(task: TaskSpec, samples: Sequence[dict[str, Any]], seed: int) -> None:
    """ROC AUC needs both classes among the test items: refuse a draw that has one only."""
    if task.kind != "classification":
        return
    present = {s["class_name"] for s in samples}
    if len(present) < 2:
        raise EvaluationError(
            f"{task.metric} is undefined: the {len(samples)} test item(s) drawn with seed "
            f"{seed} are all {present.pop()!r} (it needs both classes); raise --num-samples"
        )


def plan(data: TaskData, options: EvalOptions, retriever: Retriever | None = None) -> list[Trial]:
    """The trials of an OpenFlamingo task: per shot count (outer) and trial, the items in
    evaluation order with their demonstrations (random from the query set, or RICES)."""
    options.validate()
    task = data.task
    if options.rices and retriever is None:
        raise EvaluationError("RICES needs a retriever (image features)")
    trials = []
    for shots in options.shots:
        k = effective_shots(task.kind, shots)
        for t in range(options.trials):
            seed = options.seed + t
            query_set_size = None if options.rices else options.query_set_size
            order, query_set = select_items(
                len(data.test), len(data.train), options.num_samples, query_set_size, seed
            )
            samples = [data.test[i] for i in order]
            _check_classes(task, samples, seed)
            if options.rices:
                found = retriever.find([s["image"] for s in samples], k)  # type: ignore[union-attr]
                demos = [[data.train[i] for i in row] for row in found]
            else:
                picks = sample_demonstrations(len(query_set), k, len(samples), seed)  # type: ignore[arg-type]
                demos = [[data.train[query_set[j]] for j in row] for row in picks]  # type: ignore[index]
            queries = [_query(task, s, d, shots) for s, d in zip(samples, demos)]
            _check_images(queries)
            trials.append(Trial(shots, t, seed, queries))
    return trials


def plan_demo(options: EvalOptions) -> list[Trial]:
    """The demo task's trials: held-out episodes `demo.task.eval_episodes(num_samples, seed,
    shots)` (the README accuracy table: 200 episodes, seed 1234), demonstrations and query
    drawn together, the same queries at every shot count."""
    from demo.task import eval_episodes

    options.validate()
    task = TASKS["demo"]
    if max(options.shots) > 8:
        raise EvaluationError("the demo task's episodes have at most 8 demonstrations")
    count = 200 if options.num_samples <= 0 else options.num_samples
    trials = []
    for shots in options.shots:
        for t in range(options.trials):
            seed = options.seed + t
            queries = []
            for i, episode in enumerate(eval_episodes(count, seed, shots)):
                demos = [
                    {"image": s.render(), "caption": s.answer(episode.attribute)}
                    for s in episode.demos
                ]
                prompt, images = task.prompt({"image": episode.query.render()}, demos, shots)
                queries.append(Query(i, prompt, images, episode.answer, episode.attribute))
            trials.append(Trial(shots, t, seed, queries))
    return trials


# ------------------------------------------------------------------ running


def class_logprobs(
    pipe: Any, prompt: str, images: Sequence[Any], class_ids: Sequence[Sequence[int]]
) -> np.ndarray:
    """(C,) mean log-probability of each class name's tokens after `prompt`: one row per
    class (prompt + class tokens, left-padded), one prefill."""
    engine = pipe.engine
    context = pipe.tokenizer.encode(prompt).ids
    rows = [context + list(ids) for ids in class_ids]
    total = max(len(r) for r in rows)
    input_ids = np.full((len(rows), total), engine.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for c, row in enumerate(rows):
        input_ids[c, total - len(row) :] = row
        mask[c, total - len(row) :] = 1
    features = engine.encode_images(preprocess(list(images), pipe.preprocess_config))
    every = [list(range(len(images)))] * len(rows)
    cross = rows_cross_kv(features, every, engine.dims, engine.float_dtype)
    model = engine.step_model(cross, np.full(len(rows), len(images)))
    logits = model.run(input_ids, mask)  # (C, T, V)
    out = []
    for c, ids in enumerate(class_ids):
        positions = np.arange(total - len(ids) - 1, total - 1)  # logits predicting each token
        logprobs = log_softmax(logits[c, positions])
        out.append(float(np.mean(logprobs[np.arange(len(ids)), list(ids)])))
    return np.array(out, dtype=np.float32)


def _classify(
    pipe: Any, task: TaskSpec, queries: Sequence[Query], say: Progress
) -> list[dict[str, Any]]:
    class_ids = [pipe.tokenizer.encode(c, add_special_tokens=False).ids for c in task.class_names]
    positive = max(task.class_names)
    out = []
    for n, q in enumerate(queries, start=1):
        lp = class_logprobs(pipe, q.prompt, q.images, class_ids)
        best = int(np.argmax(lp))
        top = float(np.exp(lp[best] - np.logaddexp.reduce(lp.astype(np.float64))))
        p_positive = top if task.class_names[best] == positive else 1 - top
        out.append({"id": q.id, "prediction": task.class_names[best], "score": p_positive})
        _tick(n, len(queries), say)
    return out


def _tick(n: int, total: int, say: Progress) -> None:
    if n % 50 == 0 and n < total:
        say(f"  {n}/{total} queries")


def _generate(
    pipe: Any, task: TaskSpec, queries: Sequence[Query], say: Progress, batch_size: int
) -> list[dict[str, Any]]:
    """Generate in batches of `batch_size` queries (one left-padded `generate_batch`: a row's
    answer is what it gets alone, to float rounding)."""
    config = pipe.default_config(
        max_new_tokens=task.max_new_tokens,
        num_beams=task.num_beams,
        length_penalty=task.length_penalty,
    )
    post = task.postprocess or (lambda s: s)
    out = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        answers = pipe.generate_batch([q.prompt for q in chunk], [q.images for q in chunk], config)
        for q, answer in zip(chunk, answers):
            text = answer.text
            out.append({"id": q.id, "prediction": post(text)})
            _tick(len(out), len(queries), say)
    return out


def repeated_prefixes(queries: Sequence[Query]) -> bool:
    """Whether two queries share their demonstrations (text up to the last `<|endofchunk|>` and
    the same image objects or paths): only then can the prefix cache give anything back. The
    protocol draws demonstrations in a new order for every query, so usually nothing repeats,
    and caching every query's prefix would only cost a separate prefill and a KV copy each."""
    seen = set()
    for q in queries:
        text = q.prompt[: q.prompt.rfind(EOC_TOKEN) + 1]
        if not text:
            continue
        shown = text.count(MEDIA_TOKEN)
        key = (
            text,
            tuple(str(i) if isinstance(i, str | Path) else id(i) for i in q.images[:shown]),
        )
        if key in seen:
            return True
        seen.add(key)
    return False


def score(
    task: TaskSpec, data: TaskData | None, queries: Sequence[Query], predictions: list[dict]
) -> tuple[float, dict[str, float]]:
    """(score, breakdown) of one trial's predictions with the task's metric."""
    if task.kind == "caption":
        pairs = [(p["id"], p["prediction"]) for p in predictions]
        return metrics.cider(pairs, data.references), {}  # type: ignore[union-attr]
    if task.kind == "vqa":
        pairs = [(p["id"], p["prediction"]) for p in predictions]
        return metrics.vqa_accuracy(pairs, data.references), {}  # type: ignore[union-attr]
    if task.kind == "classification":
        positive = max(task.class_names)
        labels = [int(q.reference == positive) for q in queries]
        return metrics.roc_auc(labels, [p["score"] for p in predictions]), {}
    answers = [q.reference for q in queries]
    texts = [p["prediction"] for p in predictions]
    breakdown = {}
    for group in sorted({q.group for q in queries if q.group}):
        rows = [i for i, q in enumerate(queries) if q.group == group]
        breakdown[group] = metrics.exact_match([texts[i] for i in rows], [answers[i] for i in rows])
    return metrics.exact_match(texts, answers), breakdown


def run_export(
    pipe: Any,
    task: TaskSpec,
    trials: Sequence[Trial],
    data: TaskData | None = None,
    progress: Progress | None = None,
    batch_size: int = 8,
) -> list[TrialResult]:
    """Answer and score every planned trial with one export's pipeline (generation tasks in
    batches of `batch_size` queries; the prefix cache only where demonstrations repeat)."""
    say = progress or (lambda _: None)
    results = []
    caching = pipe.use_prefix_cache
    for trial in trials:
        start = time.perf_counter()
        pipe.use_prefix_cache = caching and repeated_prefixes(trial.queries)
        try:
            if task.kind == "classification":
                predictions = _classify(pipe, task, trial.queries, say)
            else:
                predictions = _generate(pipe, task, trial.queries, say, batch_size)
        finally:
            pipe.use_prefix_cache = caching
        value, breakdown = score(task, data, trial.queries, predictions)
        seconds = time.perf_counter() - start
        say(
            f"{task.name} {trial.shots} shots, trial {trial.trial} (seed {trial.seed}): "
            f"{task.metric} {_fmt(value)} over {len(trial.queries)} queries ({seconds:.1f} s)"
        )
        results.append(
            TrialResult(trial.shots, trial.trial, trial.seed, value, predictions,
                        round(seconds, 3), breakdown)
        )  # fmt: skip
    return results


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2f}"


def precision_label(pipe: Any) -> str:
    """fp32 / fp16 / int8 (w8a8 or weight-only) / int4 of an export, per graph if they differ."""
    manifest = pipe.engine.manifest
    graphs = {name: g.precision for name, g in manifest.graphs.items()}
    decoder = manifest.quantization.get("decoder")
    if graphs.get("decoder") == "int8" and isinstance(decoder, dict) and decoder.get("mode"):
        graphs["decoder"] = f"int8 {decoder['mode']}"
    values = set(graphs.values())
    if len(values) == 1:
        return values.pop()
    return " / ".join(f"{name} {p}" for name, p in graphs.items())


def refuse_other_prompt_format(export: Path) -> None:
    """EvaluationError for an export whose manifest records its own prompt format (IDEFICS):
    the protocol is open_flamingo's evaluate.py (its `<|endofchunk|>` templates, text-only
    0-shot demonstrations, its reported scores), which IDEFICS was neither trained nor
    evaluated with. A folder without manifest.json is left to the pipeline's own error."""
    from runtime.schema import load_json

    file = export / "manifest.json"
    if not file.is_file():
        return
    manifest = load_json(file, EvaluationError)
    prompt = manifest.get("prompt") if isinstance(manifest, dict) else None
    if isinstance(prompt, dict) and prompt.get("format"):
        raise EvaluationError(
            f"{export}: an export with prompt format {prompt['format']!r} (manifest.json "
            "'prompt'); eval runs open_flamingo 2.0.1's evaluation protocol, whose prompts and "
            "scores are OpenFlamingo's: run this export with `run --demos` or `serve`, and "
            "check it against its model with `parity --model DIR`"
        )


def evaluate(
    exports: Sequence[str | Path],
    task: str,
    data_dir: str | Path | None,
    options: EvalOptions,
    open_pipeline: Callable[[Path], Any],
    rices_vision: str | Path | None = None,
    progress: Progress | None = None,
) -> EvaluationResult:
    """The whole evaluation: check tools and data, plan once, run every export in turn.

    `open_pipeline(export_dir)` gives a `FlamingoPipeline` (or a compatible object);
    `rices_vision`: None / "export" (the first export's features) or a CLIP model file.
    """
    from .datasets import load_task_data
    from .rices import clip_features, export_features
    from .tasks import ok_vqa_utils

    say = progress or (lambda _: None)
    if task not in TASKS:
        raise EvaluationError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    spec = TASKS[task]
    options.validate()
    if spec.kind == "caption":
        metrics.require_cider()
    if spec.name == "okvqa":
        ok_vqa_utils()
    if spec.kind == "demo" and (options.rices or data_dir is not None):
        raise EvaluationError("the demo task draws its own episodes: no --data, no --rices")
    if spec.kind != "demo" and data_dir is None:
        files = ", ".join(spec.files.values())
        raise EvaluationError(f"task {task!r} needs --data DIR, a folder holding {files}")
    exports = [Path(e) for e in exports]
    for export in exports:
        refuse_other_prompt_format(export)
    data = load_task_data(spec, data_dir) if spec.kind != "demo" else None  # type: ignore[arg-type]
    pipes: dict[int, Any] = {0: open_pipeline(exports[0])}
    rices_source = None
    retriever = None
    if options.rices:
        if rices_vision in (None, "export"):
            rices_source = f"export features ({exports[0]}: mean image_latents)"
            source = export_features(pipes[0])
        else:
            rices_source = f"CLIP encode_image ({rices_vision})"
            source = clip_features(rices_vision)  # type: ignore[arg-type]
        say(f"RICES: {len(data.train)} train image features from {rices_source}")  # type: ignore[union-attr]
        for i, sample in enumerate(data.train):  # type: ignore[union-attr]
            check_image(sample["image"], f"train record {i}")
        retriever = Retriever(source, [s["image"] for s in data.train])  # type: ignore[union-attr]
    trials = plan(data, options, retriever) if data is not None else plan_demo(options)
    results = []
    for i, export in enumerate(exports):
        pipe = pipes.pop(i, None) or open_pipeline(export)
        label = precision_label(pipe)
        say(
            f"{export} ({label}): {spec.name}, {options.trials} trial(s) x shots "
            f"{','.join(map(str, options.shots))} ({len(trials)} runs)"
        )
        answers = run_export(pipe, spec, trials, data, say, options.batch_size)
        results.append(ExportResult(str(export), label, answers))
        del pipe
    protocol = {
        "source": "open_flamingo 2.0.1 eval/evaluate.py" if spec.kind != "demo" else "demo/task.py",
        "shots": list(options.shots),
        "trial_seeds": [options.seed + t for t in range(options.trials)],
        "num_samples": len(trials[0].queries),
        "query_set_size": None if options.rices or data is None else options.query_set_size,
        "demonstrations": "rices" if options.rices else "random" if data is not None else "episode",
        "rices_features": rices_source,
        "num_beams": spec.num_beams,
        "max_new_tokens": spec.max_new_tokens if spec.kind != "classification" else None,
        "length_penalty": spec.length_penalty if spec.kind != "classification" else None,
        "data": str(data_dir) if data_dir is not None else None,
    }
    return EvaluationResult(spec.name, spec.metric, protocol, results)
