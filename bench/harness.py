"""`flamingo-export bench`: latency, throughput and memory of an export on few-shot prompts.

Per phase (vision per image, prefill, decode per token), per prompt size (0-16 shots) and
with/without the prefix cache, against the PyTorch reference, the published open_flamingo
`generate` or other exports *in the same run* (same machine, load and threads), so the ratios
survive a noisy shared machine. Greedy, exactly `new_tokens` tokens (stop token off); medians of
`repeats` round-robin runs, each after a `settle_ms` pause; ratios are medians of per-repeat
runtime / baseline ratios; memory is the estimated peak RSS had each backend run alone. Times in
ms, memory in bytes. Bad options or missing baseline files are a `BenchError`. What every number
means: docs/bench.md.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import FlamingoExportError
from runtime.prompts import EOC_TOKEN

from .backends import (
    OracleBackend,
    ReferenceBackend,
    RssMeter,
    RuntimeBackend,
    Sample,
    quiet_frameworks,
)

DEFAULT_SHOTS = (0, 4, 8, 16)
CAPTIONS = (
    "a red circle on a white background",
    "two blue squares",
    "a cat sitting on a mat",
    "a dog runs in the park with a ball",
    "a small yellow star",
    "a bird on a branch",
    "a car parked near a tree",
    "a boat on the water",
)
# metrics compared between backends (ratio = runtime / baseline), with their table headers
RATIO_LABELS = {
    "vision_ms_per_image": "vision/img",
    "prefill_ms": "prefill",
    "ttft_ms": "TTFT",
    "decode_ms_per_token": "decode/tok",
    "total_ms": "total",
    "tokens_per_s": "tok/s",
    "peak_rss_bytes": "peak RSS",
}
RATIO_METRICS = tuple(RATIO_LABELS)
Progress = Callable[[str], None]


class BenchError(FlamingoExportError, ValueError):
    """The benchmark cannot run as asked (options, missing baseline files)."""


@dataclass
class BenchOptions:
    """What to measure; defaults are the issue's prompt sizes."""

    shots: tuple[int, ...] = DEFAULT_SHOTS
    new_tokens: int = 16
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None  # None: the CPUs this process may use
    image_size: int = 256  # synthetic image side before preprocessing
    seed: int = 0
    settle_ms: float = 250.0  # pause before each run: idle threads spin on (docs/bench.md)
    allow_spinning: bool = True  # onnxruntime's intra-op spinning, the runtime's graphs

    def validate(self) -> None:
        if not self.shots or any(k < 0 for k in self.shots):
            raise BenchError(f"shots must be non-negative integers, got {list(self.shots)}")
        if self.new_tokens < 2:
            raise BenchError("--max-new-tokens must be >= 2 (one prefill token + decode steps)")
        if self.repeats < 1 or self.warmup < 0:
            raise BenchError("--repeats must be >= 1 and --warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise BenchError("--threads must be >= 1")
        if self.image_size < 8:
            raise BenchError("image_size must be >= 8")
        if not 0 <= self.settle_ms <= 60_000:  # NaN and inf fail too
            raise BenchError(f"--settle-ms must be within [0, 60000], got {self.settle_ms}")

    def resolved_threads(self) -> int:
        if self.threads:
            return self.threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1


@dataclass
class ModelFiles:
    """The files the export came from, for the PyTorch baselines.

    `oracle_vision_dir`: the vision tower as an HF CLIP directory (the published package needs
    one); default: `vision_path` if it is a directory, else `vision_hf/` beside the file.
    """

    lm_dir: Path | None
    vision_path: Path | None
    checkpoint_path: Path | None
    cross_attn_every_n_layers: int | None = None
    oracle_vision_dir: Path | None = None
    load_options: dict[str, Any] = field(default_factory=dict)  # more loader keywords
    model_dir: Path | None = None  # an HF IDEFICS folder instead of the three files above

    def load(self, load_flamingo: Callable[..., Any]) -> tuple[Any, Any, Any]:
        """(model, tokenizer, report) of the reference: OpenFlamingo files, or IDEFICS."""
        if self.model_dir is not None:
            from flamingo.idefics import load_idefics

            return load_idefics(self.model_dir, **self.load_options)
        return load_flamingo(
            self.lm_dir,
            self.vision_path,
            self.checkpoint_path,
            cross_attn_every_n_layers=self.cross_attn_every_n_layers,
            **self.load_options,
        )

    def resolve_oracle_vision(self) -> Path:
        if self.vision_path is None:
            raise BenchError(
                "the open_flamingo baseline runs OpenFlamingo files (--lm, --vision, "
                "--checkpoint), not an IDEFICS folder"
            )
        candidates = [self.oracle_vision_dir] if self.oracle_vision_dir else []
        vision = Path(self.vision_path)
        candidates += [vision] if vision.is_dir() else [vision.parent / "vision_hf"]
        for path in candidates:
            if path is not None and (Path(path) / "config.json").is_file():
                return Path(path)
        raise BenchError(
            f"the open_flamingo baseline needs the vision tower as an HF CLIP directory; "
            f"none at {[str(c) for c in candidates]} (give --oracle-vision DIR)"
        )


# ------------------------------------------------------------------------------------ the run


def _per_run(samples: list[Sample]) -> dict[str, list[float]]:
    """Derived metrics of each run (decode per token over the new_tokens - 1 decode steps)."""
    return {
        "vision_ms": [s.vision_ms for s in samples],
        "vision_ms_per_image": [s.vision_ms / max(1, s.images_encoded) for s in samples],
        "prefill_ms": [s.prefill_ms for s in samples],
        "ttft_ms": [s.vision_ms + s.prefill_ms for s in samples],
        "decode_ms": [s.decode_ms for s in samples],
        "decode_ms_per_token": [s.decode_ms / max(1, s.new_tokens - 1) for s in samples],
        "total_ms": [s.total_ms for s in samples],
        "tokens_per_s": [s.new_tokens / s.total_ms * 1e3 for s in samples],
        "peak_rss_bytes": [float(s.peak_rss_bytes) for s in samples],
    }


def _metrics(samples: list[Sample]) -> dict[str, Any]:
    """Medians over the timed runs (memory: the maximum)."""
    per_run = _per_run(samples)
    out: dict[str, Any] = {
        k: round(float(statistics.median(v)), 3)
        for k, v in per_run.items()
        if k != "peak_rss_bytes"
    }
    last = samples[-1]
    out.update(
        new_tokens=last.new_tokens,
        prompt_tokens=last.prompt_tokens,
        cached_tokens=last.cached_tokens,
        images=last.images,
        images_encoded=last.images_encoded,
        work_rss_bytes=max(s.work_rss_bytes for s in samples),
        peak_rss_bytes=max(s.peak_rss_bytes for s in samples),
        total_ms_runs=[round(v, 2) for v in per_run["total_ms"]],
    )
    return out


def _ratios(runtime: list[Sample], baseline: list[Sample]) -> dict[str, float | None]:
    """runtime / baseline per metric: the median of the per-repeat ratios.

    Repeat r of both ran back to back, so pairing them cancels the slow swings of a shared
    machine's load that a ratio of medians would keep. Memory: ratio of the peaks.
    """
    ours, theirs = _per_run(runtime), _per_run(baseline)
    out: dict[str, float | None] = {}
    for k in RATIO_METRICS:
        if k == "peak_rss_bytes":
            a, b = max(ours[k]), max(theirs[k])
            out[k] = round(a / b, 4) if b else None
            continue
        pairs = [x / y for x, y in zip(ours[k], theirs[k]) if y]
        out[k] = round(float(statistics.median(pairs)), 4) if pairs else None
    return out


def _images(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def check_fits(pipe: Any, options: BenchOptions) -> None:
    """BenchError unless the largest prompt (its images, its tokens + the new tokens) fits
    the export's limits: before any prompt is built or timed."""
    most = max(options.shots)
    if most + 1 > pipe.max_images:
        raise BenchError(
            f"--shots {most}: a {most}-shot prompt has {most + 1} images, this export takes "
            f"at most {pipe.max_images}"
        )
    tokens = len(pipe.token_ids(caption_prompt_of(most, pipe.end_of_chunk)))
    if tokens + options.new_tokens > pipe.max_seq_len:
        raise BenchError(
            f"--shots {most} with --max-new-tokens {options.new_tokens}: {tokens} prompt "
            f"tokens + {options.new_tokens} new tokens exceed this export's context of "
            f"{pipe.max_seq_len} tokens"
        )


def check_same_model(reference: dict[str, Any], exported: dict[str, Any], export_dir: Path) -> None:
    """BenchError naming the first setting where the reference model's config (the files given
    with --reference) differs from the one the export's manifest records: timing another
    model's reference says nothing."""

    def first_difference(a: Any, b: Any, where: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                found = first_difference(a.get(key), b.get(key), f"{where}.{key}".lstrip("."))
                if found:
                    return found
            return None
        return None if a == b else f"{where}: {str(a)[:60]} in the files, {str(b)[:60]} exported"

    found = first_difference(json.loads(json.dumps(reference)), exported, "")
    if found:
        raise BenchError(
            f"the --reference model is not the one {export_dir} was exported from ({found})"
        )


def caption_prompt_of(k: int, end_of_chunk: str = EOC_TOKEN) -> str:
    """The bench's k-shot caption prompt (k demonstrations + the query), `<image>` markers in;
    `end_of_chunk`: the export's end of a demonstration (`FlamingoPipeline.end_of_chunk`)."""
    from runtime.prompts import Demonstration, build_few_shot_prompt

    demos = [Demonstration(image=i, text=CAPTIONS[i % len(CAPTIONS)]) for i in range(k)]
    prompt, _ = build_few_shot_prompt(
        demos, task="caption", query_image="query", end_of_chunk=end_of_chunk
    )
    return prompt


def _model_info(backend: RuntimeBackend) -> dict[str, Any]:
    manifest = backend.pipe.engine.manifest
    graphs = {name: entry.file for name, entry in manifest.graphs.items()}
    root = backend.pipe.engine.root
    size = sum(
        f.stat().st_size for f in root.iterdir() if f.name.startswith(tuple(graphs.values()))
    )
    return {
        "dims": backend.pipe.engine.dims.to_dict(),
        "precision": {name: entry.precision for name, entry in manifest.graphs.items()},
        "graph_bytes": size,
    }


def run_bench(
    export_dir: str | Path,
    options: BenchOptions | None = None,
    files: ModelFiles | None = None,
    oracle: bool = False,
    progress: Progress | None = None,
    baseline_exports: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Benchmark an export (and, given its source files, the PyTorch baselines; given other
    exports, those too); JSON-ready."""
    options = options or BenchOptions()
    options.validate()
    if oracle and files is None:
        raise BenchError("the open_flamingo baseline needs the model files (--lm, --vision, ...)")
    if oracle:
        files.resolve_oracle_vision()  # type: ignore[union-attr]  # before loading anything
    say = progress or (lambda _message: None)
    threads = options.resolved_threads()
    meter = RssMeter()
    load_start = os.getloadavg()
    rss_start = meter.current()

    def loaded(build: Callable[[], Any]) -> tuple[Any, int]:
        before = meter.current()
        obj = build()
        gc.collect()
        return obj, max(0, meter.current() - before)

    say(f"loading the export ({threads} threads)")
    runtime, runtime_rss = loaded(
        lambda: RuntimeBackend(
            Path(export_dir), threads, options.new_tokens, options.allow_spinning
        )
    )
    model_rss = {"runtime": runtime_rss}
    check_fits(runtime.pipe, options)
    baselines: dict[str, Any] = {}
    for path in baseline_exports:
        name = _export_case_name(Path(path), baselines)
        say(f"loading baseline export {path}")
        baselines[name], model_rss[name] = loaded(
            lambda p=path: RuntimeBackend(
                Path(p), threads, options.new_tokens, options.allow_spinning
            )
        )
    versions = {"onnxruntime": _version("onnxruntime"), "numpy": np.__version__}
    framework_rss = 0  # torch + transformers: the baselines need them, the runtime does not
    if files is not None:
        (torch, load_flamingo), framework_rss = loaded(_import_frameworks)
        torch.set_num_threads(threads)
        versions.update(torch=torch.__version__, transformers=_version("transformers"))
        say("loading the PyTorch reference")
        (model, _, _), model_rss["reference"] = loaded(lambda: files.load(load_flamingo))
        check_same_model(model.cfg.to_dict(), runtime.pipe.engine.manifest.model, export_dir)
        baselines["reference"] = ReferenceBackend(model, runtime, options.new_tokens)
        if oracle:
            from flamingo.oracle import load_open_flamingo

            say("loading the published open_flamingo model")
            with quiet_frameworks(hf=True):
                (of_model, of_tok), model_rss["oracle"] = loaded(
                    lambda: load_open_flamingo(
                        files.lm_dir,
                        files.resolve_oracle_vision(),
                        files.checkpoint_path,
                        model.cfg.cross_attn.every_n_layers,
                    )
                )
            baselines["oracle"] = OracleBackend(
                of_model, of_tok.pad_token_id, runtime, options.new_tokens
            )
            versions["open_flamingo"] = _version("open-flamingo")

    # case name -> (backend, cached flag, memory key)
    cases: dict[str, tuple[Any, bool, str]] = {
        "runtime_uncached": (runtime, False, "runtime"),
        "runtime_cached": (runtime, True, "runtime"),
    }
    cases.update({name: (b, False, name) for name, b in baselines.items()})
    rng = np.random.default_rng(options.seed)
    # RSS a backend holds beyond its load: allocator arenas, caches (grown by its runs)
    base = {"runtime": rss_start}
    for name, backend in baselines.items():
        torch_based = not isinstance(backend, RuntimeBackend)
        base[name] = rss_start + (framework_rss if torch_based else 0)
    held = dict.fromkeys(base, 0)

    def measured(name: str, prompt: str, images: list[np.ndarray]) -> Sample:
        backend, cached, key = cases[name]
        gc.collect()
        time.sleep(options.settle_ms / 1e3)
        before = meter.current()
        meter.reset_peak()
        sample = backend.run(prompt, images, cached)
        work = max(0, meter.peak() - before)
        sample.work_rss_bytes = work
        sample.peak_rss_bytes = base[key] + model_rss[key] + held[key] + work
        held[key] = max(0, held[key] + meter.current() - before)
        return sample

    results = []
    with quiet_frameworks(hf=bool(baselines)):
        for k in options.shots:
            demos = _images(rng, k, options.image_size)
            prompt = caption_prompt_of(k, runtime.pipe.end_of_chunk)
            runtime.pipe.clear_caches()  # the cached case starts cold; its warm-up warms it
            for w in range(max(1, options.warmup)):  # the cached case is warmed even if 0
                query = _images(rng, 1, options.image_size)
                for name, (_, cached, _key) in cases.items():
                    if w < options.warmup or cached:
                        say(f"{k}-shot warm-up: {name}")
                        measured(name, prompt, [*demos, *query])
            samples: dict[str, list[Sample]] = {name: [] for name in cases}
            for r in range(options.repeats):
                query = _images(rng, 1, options.image_size)  # a new query image every repeat
                for name in cases:
                    say(f"{k}-shot repeat {r + 1}/{options.repeats}: {name}")
                    samples[name].append(measured(name, prompt, [*demos, *query]))
            results.append(_shot_result(k, samples))
    summary = _summary(results)
    return {
        "export": str(export_dir),
        "model": _model_info(runtime),
        "settings": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
            "threads": threads,
            "search": "greedy, stop token disabled",
            "template": "caption: <image>Output:{caption}"
            f"{runtime.pipe.end_of_chunk} ... <image>Output:",
            "backends": list(cases),
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_avg_start": [round(v, 2) for v in load_start],
            "load_avg_end": [round(v, 2) for v in os.getloadavg()],
            "oversubscribed": load_start[0] + threads > (os.cpu_count() or 1),
            "versions": versions,
        },
        "memory": {
            "rss_start_bytes": rss_start,
            "framework_rss_bytes": framework_rss,
            "model_rss_bytes": model_rss,
            "held_rss_bytes": held,
            "process_peak_rss_bytes": _ru_maxrss(),
            "per_run_peaks": meter.resettable,
        },
        "results": results,
        "summary": summary,
    }


def _shot_result(k: int, samples: dict[str, list[Sample]]) -> dict[str, Any]:
    cases = {name: _metrics(runs) for name, runs in samples.items()}
    reference_ids = samples["runtime_uncached"][0].token_ids
    same = {name: runs[0].token_ids == reference_ids for name, runs in samples.items()}
    ratios = {
        baseline: {
            mode: _ratios(samples[f"runtime_{mode}"], samples[baseline])
            for mode in ("uncached", "cached")
        }
        for baseline in cases
        if not baseline.startswith("runtime")
    }
    # every other export against the PyTorch baselines, paired per repeat like `ratios`
    export_ratios = {
        name: {b: _ratios(runs, samples[b]) for b in cases if b in ("reference", "oracle")}
        for name, runs in samples.items()
        if name.startswith("export:")
    }
    first = samples["runtime_uncached"][0]
    return {
        "shots": k,
        "images": first.images,
        "prompt_tokens": first.prompt_tokens,
        "cases": cases,
        "ratios": ratios,
        "export_ratios": export_ratios,
        "same_tokens_as_runtime_uncached": same,
    }


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets as numbers (reported, never asserted)."""
    by_shots = {r["shots"]: r for r in results}
    out: dict[str, Any] = {}
    zero = by_shots.get(0)
    if zero is not None:
        base = zero["cases"]["runtime_uncached"]
        out["cached_query_vs_0shot_total"] = {
            str(k): round(r["cases"]["runtime_cached"]["total_ms"] / base["total_ms"], 4)
            for k, r in by_shots.items()
        }
        out["cached_query_vs_0shot_ttft"] = {
            str(k): round(r["cases"]["runtime_cached"]["ttft_ms"] / base["ttft_ms"], 4)
            for k, r in by_shots.items()
        }
    baselines = dict.fromkeys(b for r in results for b in r["ratios"])
    for baseline in baselines:
        for metric, label in (("total_ms", "end_to_end"), ("decode_ms_per_token", "decode")):
            speedups = {
                str(k): {
                    mode: _inverse(ratios[metric]) for mode, ratios in r["ratios"][baseline].items()
                }
                for k, r in by_shots.items()
                if baseline in r["ratios"]
            }
            if speedups:
                out[f"speedup_vs_{baseline}_{label}"] = speedups
    return out


def _export_case_name(path: Path, taken: dict[str, Any]) -> str:
    """`export:<folder name>`, numbered if two baseline folders share a name."""
    name = f"export:{path.name}"
    n = 2
    while name in taken:
        name, n = f"export:{path.name}#{n}", n + 1
    return name


def _import_frameworks() -> tuple[Any, Callable[..., Any]]:
    """torch, transformers' model classes and our loaders (their RSS is the baselines' cost)."""
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, CLIPVisionModelWithProjection  # noqa: F401

    from flamingo.loaders import load_flamingo

    return torch, load_flamingo


def _inverse(ratio: float | None) -> float | None:
    return round(1 / ratio, 4) if ratio else None


def _ru_maxrss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:  # pragma: no cover - not POSIX
        return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
