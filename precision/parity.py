"""Parity of an export (any precision) against a reference: another export or the PyTorch model.

A quantized graph is only usable if its outputs still pick the same tokens, and a naive fp16
ViT can look fine until its cosine is measured (TensorRT-LLM #3223), so parity is measured per
graph, on few-shot episodes (precision.data, own seed): vision outputs, the decoder under
teacher forcing, the whole pipeline, task accuracy where episodes carry labels, and file sizes
(what each means: ``measure``). Thresholds per precision (``DEFAULT_THRESHOLDS``, overridable)
gate the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from runtime.contracts import SessionFactory
from runtime.decoding import rows_cross_kv
from runtime.engine import DEFAULT_PROVIDERS, OnnxFlamingo, ort_session_factory
from runtime.errors import FlamingoExportError
from runtime.generation import GenerationConfig, generate
from runtime.images import PreprocessConfig
from runtime.spec import cross_attn_names
from runtime.video import encode_media, preprocess_media

Progress = Callable[[str], None]
METRICS = ("vision_cosine", "decoder_cosine", "pipeline_cosine", "top1", "greedy", "task_delta")
# What each metric can be: cosines, shares of matching tokens, a difference of accuracies.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "vision_cosine": (-1.0, 1.0), "decoder_cosine": (-1.0, 1.0), "pipeline_cosine": (-1.0, 1.0),
    "top1": (0.0, 1.0), "greedy": (0.0, 1.0), "task_delta": (-1.0, 1.0),
}  # fmt: skip
# Lower bounds per candidate precision (vision_cosine by the vision graph's precision, the
# others by the decoder's). fp16: the bar; int8/int4: what a usable model keeps.
# task_delta: candidate task accuracy minus the reference's (only where episodes carry labels).
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"vision_cosine": 0.99999, "decoder_cosine": 0.99999, "pipeline_cosine": 0.99999,
             "top1": 0.999, "greedy": 1.0, "task_delta": 0.0},
    "fp16": {"vision_cosine": 0.999, "decoder_cosine": 0.999, "pipeline_cosine": 0.999,
             "top1": 0.995, "greedy": 0.75, "task_delta": -0.005},
    "int8": {"vision_cosine": 0.98, "decoder_cosine": 0.98, "pipeline_cosine": 0.97,
             "top1": 0.85, "greedy": 0.0, "task_delta": -0.01},
    "int4": {"vision_cosine": 0.95, "decoder_cosine": 0.95, "pipeline_cosine": 0.93,
             "top1": 0.75, "greedy": 0.0, "task_delta": -0.03},
}  # fmt: skip


class ParityError(FlamingoExportError, ValueError):
    """Bad parity input (mismatched exports, bad threshold syntax, ...)."""


def parse_thresholds(text: str | None) -> dict[str, dict[str, float]]:
    """`top1=0.99,int8.greedy=0.5` -> overrides: a bare metric applies to every precision."""
    out: dict[str, dict[str, float]] = {}
    if not text:
        return out
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        precision, _, metric = key.strip().rpartition(".")
        if not sep or metric not in METRICS or (precision and precision not in DEFAULT_THRESHOLDS):
            raise ParityError(
                f"bad threshold {part.strip()!r}: expected [PRECISION.]METRIC=VALUE with METRIC "
                f"in {list(METRICS)} and PRECISION in {list(DEFAULT_THRESHOLDS)}"
            )
        try:
            number = float(value)
        except ValueError:
            raise ParityError(
                f"bad threshold {part.strip()!r}: {value!r} is not a number"
            ) from None
        low, high = METRIC_RANGES[metric]
        if not low <= number <= high:  # NaN included: it would fail or pass every comparison
            raise ParityError(
                f"bad threshold {part.strip()!r}: {metric} lies in [{low:g}, {high:g}]"
            )
        for p in [precision] if precision else list(DEFAULT_THRESHOLDS):
            out.setdefault(p, {})[metric] = number
    return out


# ------------------------------------------------------------------ backends


EXECUTORS = ("onnxruntime", "onnxruntime-unoptimized", "reference")


class _ReferenceSession:
    """`session.run` over onnx's ReferenceEvaluator (numpy, ops in their declared dtypes)."""

    def __init__(self, path: Path) -> None:
        import warnings

        import onnx
        from onnx.reference import ReferenceEvaluator

        self._evaluator = ReferenceEvaluator(onnx.load(str(path)))
        self._warnings = warnings

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._warnings.catch_warnings():
            self._warnings.simplefilter("ignore", RuntimeWarning)  # overflow is what we measure
            return list(self._evaluator.run(output_names, feed))

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=n) for n in self._evaluator.input_names]

    def get_outputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=n) for n in self._evaluator.output_names]


def executor_sessions(executor: str, providers: Sequence[str] | None) -> SessionFactory | None:
    """The OnnxFlamingo session factory of a parity executor (None: onnxruntime's default)."""
    if executor not in EXECUTORS:
        raise ParityError(f"executor {executor!r} is not one of {list(EXECUTORS)}")
    if executor == "reference":
        return lambda _name, path: _ReferenceSession(path)
    if executor == "onnxruntime-unoptimized":
        return ort_session_factory(providers or DEFAULT_PROVIDERS, optimize=False)
    return None


class OnnxBackend:
    """An export folder run with onnxruntime (CPU by default)."""

    def __init__(
        self,
        export_dir: str | Path,
        providers: Sequence[str] | None = None,
        executor: str = "onnxruntime",
    ) -> None:
        """`executor`: "onnxruntime" (what users run), "onnxruntime-unoptimized" (no graph
        fusions) or "reference" (onnx's numpy ReferenceEvaluator: every op in the dtype the
        graph declares, like a strongly typed TensorRT build; onnxruntime's CPU EP instead
        runs fp16 ops it lacks kernels for, or fuses, in fp32, which hides fp16 overflow).
        The reference executor is slow: small models only."""
        factory = executor_sessions(executor, providers)
        kw = {"providers": list(providers)} if providers else {}
        self.engine = OnnxFlamingo(export_dir, **kw, session_factory=factory)
        self.root = Path(export_dir)
        self.label = str(export_dir)
        self.manifest = self.engine.manifest
        self.dims = self.engine.dims
        self.precisions = {k: g.precision for k, g in self.manifest.graphs.items()}
        self.preprocess = PreprocessConfig.from_dict(self.manifest.preprocess)
        self.max_frames: int | None = self.manifest.limits["max_frames"]

    def encode(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """(N, F, 3, S, S) frames of N media items (or (N, 3, S, S) images) -> vision outputs."""
        return self.engine.encode_images(pixels)

    def decoder(self, features: dict[str, np.ndarray], n_images: int) -> Any:
        cross = self.engine.rows_cross_kv(features, [list(range(n_images))])
        return self.engine.step_model(cross, np.array([n_images]), io_binding=False)

    def sizes(self) -> dict[str, int]:
        return {
            name: sum((self.root / f).stat().st_size for f in (g.file, *g.external_data))
            for name, g in self.manifest.graphs.items()
        }


class TorchBackend:
    """The PyTorch reference model (flamingo.model.Flamingo), fp32, for export-vs-source parity."""

    def __init__(self, model: Any, label: str = "pytorch") -> None:
        from runtime.spec import ModelDims

        self.model = model.eval()
        self.label = label
        cfg = model.cfg.to_dict()
        self.dims = ModelDims.from_config(cfg)
        self.precisions = {"vision": "fp32", "decoder": "fp32"}
        self.preprocess = PreprocessConfig(image_size=model.cfg.vision.image_size)
        # frames a clip may have: the frame embeddings (None: any number)
        self.max_frames: int | None = model.cfg.resampler.max_num_frames

    def encode(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """(N, F, 3, S, S) frames of N media items (or (N, 3, S, S) images) -> vision outputs."""
        import torch

        pixels = np.asarray(pixels, np.float32)
        pixels = pixels[:, None] if pixels.ndim == 4 else pixels
        with torch.no_grad():
            latents = self.model.encode_media(torch.from_numpy(pixels))
            out = {"image_latents": latents.numpy()}
            for j, (k, v) in zip(self.dims.xattn_layers, self.model.lang_model.media_kv(latents)):
                out[cross_attn_names(j)[0]], out[cross_attn_names(j)[1]] = k.numpy(), v.numpy()
        return out

    def decoder(self, features: dict[str, np.ndarray], n_images: int) -> Any:
        from flamingo.generate import TorchStepModel

        rows = [list(range(n_images))]
        cross = rows_cross_kv(features, rows, self.dims, np.dtype(np.float32))
        return TorchStepModel.from_cross_kv(self.model, cross, np.array([n_images]))

    def sizes(self) -> dict[str, int]:
        return {}


# ------------------------------------------------------------------ metrics


@dataclass
class ErrorStats:
    """Running cosine / abs-error statistics of candidate vs reference arrays."""

    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    max_abs: float = 0.0
    abs_sum: float = 0.0
    count: int = 0
    row_cosines: list[float] = field(default_factory=list)

    def add(self, ref: np.ndarray, cand: np.ndarray, rows: bool = False) -> None:
        r = np.asarray(ref, np.float64)
        c = np.asarray(cand, np.float64)
        if r.shape != c.shape:
            raise ParityError(f"shape mismatch: reference {r.shape}, candidate {c.shape}")
        diff = np.abs(r - c)
        self.dot += float((r * c).sum())
        self.ref_sq += float((r * r).sum())
        self.cand_sq += float((c * c).sum())
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.abs_sum += float(diff.sum())
        self.count += diff.size
        if rows:  # one cosine per position (last axis = vocabulary)
            r2, c2 = r.reshape(-1, r.shape[-1]), c.reshape(-1, c.shape[-1])
            num = (r2 * c2).sum(-1)
            den = np.linalg.norm(r2, axis=-1) * np.linalg.norm(c2, axis=-1)
            self.row_cosines += list(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0))

    @property
    def cosine(self) -> float:
        """NaN when the candidate produced NaN/inf (a gate never passes NaN)."""
        den = math.sqrt(self.ref_sq * self.cand_sq)
        if not math.isfinite(den) or not math.isfinite(self.dot):
            return math.nan
        if den > 0:
            return self.dot / den
        return 1.0 if self.ref_sq == self.cand_sq == 0 else 0.0  # one side all zeros

    def to_dict(self) -> dict[str, float]:
        out = {
            "cosine": self.cosine,
            "max_abs": self.max_abs,
            "mean_abs": self.abs_sum / max(self.count, 1),
        }
        if self.row_cosines:
            out["min_position_cosine"] = float(min(self.row_cosines))
            out["mean_position_cosine"] = float(np.mean(self.row_cosines))
        return out


@dataclass
class TokenStats:
    agree: int = 0
    total: int = 0

    def add(self, ref_logits: np.ndarray, cand_logits: np.ndarray) -> None:
        r = np.asarray(ref_logits).reshape(-1, ref_logits.shape[-1]).argmax(-1)
        c = np.asarray(cand_logits).reshape(-1, cand_logits.shape[-1]).argmax(-1)
        self.agree += int((r == c).sum())
        self.total += len(r)

    @property
    def rate(self) -> float:
        return self.agree / self.total if self.total else 1.0


def _greedy(backend: Any, features: dict, n: int, ids: np.ndarray, config: GenerationConfig):
    result = generate(backend.decoder(features, n), ids, np.ones_like(ids), config)
    return result.sequences[0]


def answer_text(tokenizer: Any, tokens: Sequence[int], stop_ids: Sequence[int]) -> str:
    """The answer a user reads: tokens before the first stop token, decoded, stripped."""
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tokenizer.decode(list(tokens[:cut]), skip_special_tokens=True).strip()


def measure(
    reference: Any,
    candidate: Any,
    episodes: Sequence[Any],
    tokenizer: Any,
    decode_steps: int = 16,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """All parity numbers for `candidate` against `reference` over the episodes.

    * vision: every output (latents, each cross-attention K/V) on the same pixels (images, or
      clips' frames: runtime.video), cosine, max and mean abs error;
    * decoder: the candidate decoder fed the reference's own inputs (image K/V, tokens) under
      teacher forcing on the reference's greedy tokens (prefill, then `decode_steps` steps on
      its own KV): logits cosine, max/mean abs error, top-1 agreement of next-token predictions;
    * pipeline: the same with the candidate's own vision K/V (what a user gets), plus the
      greedy exact-match rate of free-running generations;
    * task accuracy where the episodes carry labels: exact match of each side's free-running
      greedy answer (text before ``<|endofchunk|>``, whitespace-stripped) with the label; the
      gate bounds the candidate's accuracy minus the reference's (``task_delta``).

    File sizes are `size_table`'s. Raises ``ParityError`` if the two are different models.
    """
    if reference.dims != candidate.dims:
        raise ParityError("reference and candidate are different models (dims differ)")
    say = progress or (lambda _m: None)
    vision: dict[str, ErrorStats] = {}
    decoder, pipeline = ErrorStats(), ErrorStats()
    dec_tokens, pipe_tokens, step_tokens = TokenStats(), TokenStats(), TokenStats()
    greedy_same = 0
    labelled, ref_hits, cand_hits, lost = 0, 0, 0, 0
    eoc = (
        candidate.manifest.special_tokens["eoc_token_id"]
        if hasattr(candidate, "manifest")
        else None
    )
    config = GenerationConfig(
        max_new_tokens=max(decode_steps, 1), eos_token_ids=(eoc,) if eoc is not None else ()
    )
    # clips without their own frame count take the most frames both sides allow
    max_frames = min((m for m in (reference.max_frames, candidate.max_frames) if m), default=1)
    for e, episode in enumerate(episodes):
        n = len(episode.images)
        if n:
            media = preprocess_media(list(episode.images), reference.preprocess, max_frames)
            ref_vis = encode_media(reference.encode, media)
            cand_vis = encode_media(candidate.encode, media)
            for name, value in ref_vis.items():
                vision.setdefault(name, ErrorStats()).add(value, cand_vis[name])
        else:
            ref_vis = cand_vis = _zero_features(reference.dims)
        ids = np.array([tokenizer.encode(episode.prompt).ids], dtype=np.int64)
        mask = np.ones_like(ids)
        ref_dec = reference.decoder(ref_vis, n)
        cand_dec = candidate.decoder(ref_vis, n)  # runtime casts K/V to its dtype
        cand_pipe = candidate.decoder(cand_vis, n)
        r, c, p = ref_dec.run(ids, mask), cand_dec.run(ids, mask), cand_pipe.run(ids, mask)
        decoder.add(r, c, rows=True)
        pipeline.add(r, p, rows=True)
        dec_tokens.add(r, c)
        pipe_tokens.add(r, p)
        for _ in range(decode_steps):  # teacher forcing on the reference's greedy tokens
            nxt = r[:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
            r, c, p = ref_dec.run(nxt, mask), cand_dec.run(nxt, mask), cand_pipe.run(nxt, mask)
            decoder.add(r, c, rows=True)
            pipeline.add(r, p, rows=True)
            dec_tokens.add(r, c)
            pipe_tokens.add(r, p)
            step_tokens.add(r, p)
        ref_seq = _greedy(reference, ref_vis, n, ids, config)
        cand_seq = _greedy(candidate, cand_vis, n, ids, config)
        greedy_same += int(ref_seq == cand_seq)
        label = getattr(episode, "answer", None)
        if label is not None:
            labelled += 1
            stops = config.eos_token_ids
            ref_ok = answer_text(tokenizer, ref_seq, stops) == label.strip()
            cand_ok = answer_text(tokenizer, cand_seq, stops) == label.strip()
            ref_hits, cand_hits = ref_hits + ref_ok, cand_hits + cand_ok
            lost += ref_ok and not cand_ok
        if (e + 1) % max(1, len(episodes) // 10) == 0 or e + 1 == len(episodes):
            say(f"parity: episode {e + 1}/{len(episodes)}")
    return {
        "vision": {name: s.to_dict() for name, s in vision.items()},
        "decoder": {**decoder.to_dict(), "top1": dec_tokens.rate, "positions": dec_tokens.total},
        "pipeline": {
            **pipeline.to_dict(),
            "top1": pipe_tokens.rate,
            "top1_decode_steps": step_tokens.rate,
            "positions": pipe_tokens.total,
            "greedy_exact_match": greedy_same / len(episodes),
            "greedy_tokens": config.max_new_tokens,
        },
        "task": _task_accuracy(labelled, ref_hits, cand_hits, lost),
        "episodes": len(episodes),
        "decode_steps": decode_steps,
    }


def _task_accuracy(
    labelled: int, ref_hits: int, cand_hits: int, lost: int
) -> dict[str, Any] | None:
    """Exact-match accuracy of both sides' greedy answers; None without labelled episodes.
    `lost`/`gained`: episodes only the reference / only the candidate answered right (the
    delta nets them out; they show how many answers moved)."""
    if not labelled:
        return None
    return {
        "episodes": labelled,
        "reference": ref_hits / labelled,
        "candidate": cand_hits / labelled,
        "delta": (cand_hits - ref_hits) / labelled,  # from counts: -2/200 is exactly -0.01
        "lost": lost,
        "gained": cand_hits - ref_hits + lost,
    }


def _zero_features(dims: Any) -> dict[str, np.ndarray]:
    shape = (1, dims.xattn_heads, dims.num_latents, dims.xattn_dim_head)
    return {n: np.zeros(shape, np.float32) for j in dims.xattn_layers for n in cross_attn_names(j)}


# ------------------------------------------------------------------ report and gate


def thresholds_for(
    precisions: dict[str, str], overrides: dict[str, dict[str, float]]
) -> dict[str, float]:
    """The gate for a candidate: vision_cosine from its vision precision, the rest from its
    decoder precision; the pipeline takes the lower bound of both graphs' precisions."""

    def bound(precision: str, metric: str) -> float:
        return overrides.get(precision, {}).get(metric, DEFAULT_THRESHOLDS[precision][metric])

    v, d = precisions["vision"], precisions["decoder"]
    out = {"vision_cosine": bound(v, "vision_cosine")}
    out.update({m: bound(d, m) for m in ("decoder_cosine", "top1")})
    for m in ("pipeline_cosine", "greedy", "task_delta"):
        out[m] = min(bound(v, m), bound(d, m))
    return out


def gate(metrics: dict[str, Any], thresholds: dict[str, float]) -> list[str]:
    """Every threshold missed, as a sentence (empty: parity holds). `task_delta` is only
    gated where the episodes carry labels."""
    task = metrics.get("task")
    values = {
        "vision_cosine": _nanmin([v["cosine"] for v in metrics["vision"].values()]),
        "decoder_cosine": metrics["decoder"]["cosine"],
        "pipeline_cosine": metrics["pipeline"]["cosine"],
        "top1": metrics["decoder"]["top1"],
        "greedy": metrics["pipeline"]["greedy_exact_match"],
        "task_delta": task["delta"] if task else None,
    }
    return [
        f"{m} {values[m]:.6g} < {bound:.6g}"
        for m, bound in thresholds.items()
        if values[m] is not None and not values[m] >= bound  # NaN fails
    ]


def _nanmin(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else min(values, default=1.0)


def size_table(reference: Any, candidate: Any) -> dict[str, Any]:
    ref, cand = reference.sizes(), candidate.sizes()
    out: dict[str, Any] = {}
    for name, size in cand.items():
        row: dict[str, Any] = {"bytes": size}
        if name in ref:
            row["reference_bytes"] = ref[name]
            row["ratio"] = size / ref[name]
        out[name] = row
    if cand:
        total = {"bytes": sum(cand.values())}
        if ref:
            total["reference_bytes"] = sum(ref.values())
            total["ratio"] = total["bytes"] / total["reference_bytes"]
        out["total"] = total
    return out


def markdown_report(result: dict[str, Any]) -> str:
    m = result["metrics"]
    lines = [
        f"# Parity: {result['candidate']} vs {result['reference']}",
        "",
        f"Precision: vision {result['precisions']['vision']}, decoder "
        f"{result['precisions']['decoder']}. {m['episodes']} episodes, {m['decode_steps']} "
        "teacher-forced decode steps each.",
        "",
        "| graph | output | cosine | max abs | mean abs | top-1 | greedy exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in m["vision"].items():
        lines.append(
            f"| vision | {name} | {s['cosine']:.6f} | {s['max_abs']:.3g} | {s['mean_abs']:.3g}"
            " | | |"
        )
    for graph in ("decoder", "pipeline"):
        s = m[graph]
        greedy = f"{s['greedy_exact_match']:.3f}" if graph == "pipeline" else ""
        lines.append(
            f"| {graph} | logits | {s['cosine']:.6f} | {s['max_abs']:.3g} | {s['mean_abs']:.3g}"
            f" | {s['top1']:.4f} ({s['positions']} pos.) | {greedy} |"
        )
    task = m.get("task")
    if task:
        lines += [
            "",
            f"Task accuracy (greedy exact match, {task['episodes']} labelled episodes): "
            f"reference {task['reference']:.1%}, candidate {task['candidate']:.1%} "
            f"({100 * task['delta']:+.1f} points; {task['lost']} answers lost, "
            f"{task['gained']} gained).",
        ]
    if result["sizes"]:
        lines += ["", "| graph | bytes | reference | ratio |", "|---|---|---|---|"]
        for name, s in result["sizes"].items():
            ratio = f"{s['ratio']:.3f}" if "ratio" in s else ""
            lines.append(f"| {name} | {s['bytes']:,} | {s.get('reference_bytes', 0):,} | {ratio} |")
    lines += [
        "",
        "Thresholds: " + ", ".join(f"{k} >= {v}" for k, v in result["thresholds"].items()),
    ]
    lines.append(
        "Result: "
        + ("PASS" if not result["failures"] else "FAIL: " + "; ".join(result["failures"]))
    )
    if result.get("plot"):
        lines += ["", f"![parity]({Path(result['plot']).name})"]
    elif result.get("plot_note"):
        lines += ["", f"Plot: {result['plot_note']}"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> str | None:
    """A PNG of per-output cosines and top-1 agreement; None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    m = result["metrics"]
    names = [*m["vision"], "decoder logits", "pipeline logits"]
    cos = [v["cosine"] for v in m["vision"].values()] + [
        m["decoder"]["cosine"],
        m["pipeline"]["cosine"],
    ]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(names) + 1.5))
    ax.barh(names, [1 - c for c in cos])
    ax.set_xscale("log")
    ax.set_xlabel("1 - cosine (lower is better)")
    title = f"top-1 {m['decoder']['top1']:.4f}, greedy {m['pipeline']['greedy_exact_match']:.3f}"
    if m.get("task"):
        t = m["task"]
        title += f", task {t['candidate']:.1%} (reference {t['reference']:.1%})"
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def write_report(result: dict[str, Any], report: Path) -> None:
    png = report.with_suffix(".png")
    made = plot(result, png)
    if made:
        result["plot"] = made
    else:
        result["plot_note"] = "matplotlib is not installed: no plot written"
    report.write_text(markdown_report(result))


def run_parity(
    reference: Any,
    candidate: Any,
    episodes: Sequence[Any],
    tokenizer: Any,
    *,
    decode_steps: int = 16,
    overrides: dict[str, dict[str, float]] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure, gate and describe: the dict `flamingo-export parity --json` prints."""
    metrics = measure(reference, candidate, episodes, tokenizer, decode_steps, progress)
    thresholds = thresholds_for(candidate.precisions, overrides or {})
    return {
        "reference": reference.label,
        "candidate": candidate.label,
        "precisions": candidate.precisions,
        "metrics": metrics,
        "sizes": size_table(reference, candidate),
        "thresholds": thresholds,
        "failures": gate(metrics, thresholds),
    }


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, default=float)
