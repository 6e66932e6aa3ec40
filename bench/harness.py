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
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import FlamingoExportError

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
        if self.settle_ms < 0:
            raise BenchError("settle_ms must be >= 0")

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

    lm_dir: Path
    vision_path: Path
    checkpoint_path: Path
    cross_attn_every_n_layers: int | None = None
    oracle_vision_dir: Path | None = None
    load_options: dict[str, Any] = field(default_factory=dict)  # more load_flamingo keywords

    def resolve_oracle_vision(self) -> Path:
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


# ------------------------------------------------------------------------------------ memory


class RssMeter:
    """Resident memory of this process from /proc (Linux); zeros elsewhere."""

    def __init__(self) -> None:
        self.resettable = True

    @staticmethod
    def _status(key: str) -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def current(self) -> int:
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        """Set the high-water mark to the current RSS (so a run's own peak can be read)."""
        if not self.resettable:
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False  # then peaks are the process's running maximum


# ------------------------------------------------------------------------------------ backends


@dataclass
class Sample:
    """One timed generation."""

    vision_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    new_tokens: int
    prompt_tokens: int
    images: int
    images_encoded: int
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    work_rss_bytes: int = 0  # high-water mark during the run minus RSS at its start
    peak_rss_bytes: int = 0  # estimated peak had the backend run alone (docs/bench.md)


class RuntimeBackend:
    """The export under onnxruntime (FlamingoPipeline), with its caches on or off per call."""

    name = "runtime"

    def __init__(self, export_dir: Path, threads: int, new_tokens: int) -> None:
        from runtime.pipeline import FlamingoPipeline

        self.pipe = FlamingoPipeline(export_dir, threads=threads)
        self.config = self.pipe.default_config(max_new_tokens=new_tokens, eos_token_ids=())
        self.media_token_id = self.pipe.engine.media_token_id

    def encode(self, prompt: str) -> list[int]:
        return self.pipe.tokenizer.encode(prompt).ids

    def run(self, prompt: str, images: Sequence[np.ndarray], cached: bool) -> Sample:
        self.pipe.use_prefix_cache = cached
        self.pipe.use_vision_cache = cached
        out = self.pipe.generate(prompt, images, self.config)
        t = out.timings_ms
        cached_tokens = out.stats["cached_tokens"]
        ids = self.encode(prompt)
        reused_images = sum(1 for i in ids[:cached_tokens] if i == self.media_token_id)
        return Sample(
            vision_ms=t["vision"],
            prefill_ms=t["prefill"],
            decode_ms=t["decode"],
            total_ms=t["total"],
            new_tokens=len(out.token_ids),
            prompt_tokens=out.stats["prompt_tokens"],
            images=len(images),
            images_encoded=len(images) - reused_images,
            cached_tokens=cached_tokens,
            token_ids=list(out.token_ids),
        )


class ReferenceBackend:
    """Our PyTorch reference: flamingo.model under the shared numpy search (flamingo.generate)."""

    name = "reference"

    def __init__(self, model: Any, runtime: RuntimeBackend, new_tokens: int) -> None:
        from runtime.generation import GenerationConfig

        self.model = model
        self.runtime = runtime  # tokenizer and preprocessing of the export (same ids, pixels)
        self.config = GenerationConfig(
            max_new_tokens=new_tokens, eos_token_ids=(), pad_token_id=model.cfg.pad_token_id
        )

    def run(self, prompt: str, images: Sequence[np.ndarray], cached: bool) -> Sample:
        import torch

        from flamingo.generate import TorchStepModel
        from runtime.generation import generate as search
        from runtime.images import preprocess

        start = time.perf_counter()
        with torch.inference_mode():
            ids = np.array([self.runtime.encode(prompt)], dtype=np.int64)
            pixels = preprocess(images, self.runtime.pipe.preprocess_config)
            vision_x = torch.from_numpy(pixels)[None, :, None]
            step = TorchStepModel(self.model, vision_x, np.array([len(images)]))
            vision_end = time.perf_counter()
            result = search(step, ids, np.ones_like(ids), self.config)
        end = time.perf_counter()
        prefill_end = step.prefill_end or end
        return Sample(
            vision_ms=(vision_end - start) * 1e3,
            prefill_ms=(prefill_end - vision_end) * 1e3,
            decode_ms=(end - prefill_end) * 1e3,
            total_ms=(end - start) * 1e3,
            new_tokens=len(result.sequences[0]),
            prompt_tokens=ids.shape[1],
            images=len(images),
            images_encoded=len(images),
            token_ids=list(result.sequences[0]),
        )


class OracleBackend:
    """The published open_flamingo `Flamingo.generate` (HF generate, greedy, use_cache=True)."""

    name = "oracle"

    def __init__(self, model: Any, pad_token_id: int, runtime: RuntimeBackend, n: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.runtime = runtime
        self.new_tokens = n
        self._marks: list[float] = []
        lm = model.lang_encoder
        lm.register_forward_pre_hook(lambda *_: self._marks.append(time.perf_counter()))
        lm.register_forward_hook(lambda *_: self._marks.append(time.perf_counter()))

    def run(self, prompt: str, images: Sequence[np.ndarray], cached: bool) -> Sample:
        import torch

        from runtime.images import preprocess

        self._marks.clear()
        start = time.perf_counter()
        with torch.inference_mode():
            ids = torch.tensor([self.runtime.encode(prompt)], dtype=torch.int64)
            pixels = preprocess(images, self.runtime.pipe.preprocess_config)
            vision_x = torch.from_numpy(pixels)[None, :, None]
            out = self.model.generate(
                vision_x,
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,
                eos_token_id=None,  # the stop token is disabled for timing
                pad_token_id=self.pad_token_id,
                do_sample=False,
                num_beams=1,
                use_cache=True,
            )
        end = time.perf_counter()
        # marks: [LM forward start, end] per step; before the first: vision (+ HF setup)
        vision_end = self._marks[0] if self._marks else end
        prefill_end = self._marks[1] if len(self._marks) > 1 else end
        new = out[0, ids.shape[1] :].tolist()
        return Sample(
            vision_ms=(vision_end - start) * 1e3,
            prefill_ms=(prefill_end - vision_end) * 1e3,
            decode_ms=(end - prefill_end) * 1e3,
            total_ms=(end - start) * 1e3,
            new_tokens=len(new),
            prompt_tokens=ids.shape[1],
            images=len(images),
            images_encoded=len(images),
            token_ids=new,
        )


@contextmanager
def _quiet(hf: bool) -> Any:
    """HF generate warns on every call about flags it ignores; keep the output readable.

    transformers is touched only when a baseline needs it (the runtime-only bench never
    imports it, so its memory numbers stay those of the torch-free runtime).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not hf:
            yield
            return
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)


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


def _prompt(k: int) -> str:
    from runtime.prompts import Demonstration, build_few_shot_prompt

    demos = [Demonstration(image=i, text=CAPTIONS[i % len(CAPTIONS)]) for i in range(k)]
    prompt, _ = build_few_shot_prompt(demos, task="caption", query_image="query")
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
        lambda: RuntimeBackend(Path(export_dir), threads, options.new_tokens)
    )
    model_rss = {"runtime": runtime_rss}
    baselines: dict[str, Any] = {}
    for path in baseline_exports:
        name = _export_case_name(Path(path), baselines)
        say(f"loading baseline export {path}")
        baselines[name], model_rss[name] = loaded(
            lambda p=path: RuntimeBackend(Path(p), threads, options.new_tokens)
        )
    versions = {"onnxruntime": _version("onnxruntime"), "numpy": np.__version__}
    framework_rss = 0  # torch + transformers: the baselines need them, the runtime does not
    if files is not None:
        (torch, load_flamingo), framework_rss = loaded(_import_frameworks)
        torch.set_num_threads(threads)
        versions.update(torch=torch.__version__, transformers=_version("transformers"))
        say("loading the PyTorch reference")
        (model, _, _), model_rss["reference"] = loaded(
            lambda: load_flamingo(
                files.lm_dir,
                files.vision_path,
                files.checkpoint_path,
                cross_attn_every_n_layers=files.cross_attn_every_n_layers,
                **files.load_options,
            )
        )
        baselines["reference"] = ReferenceBackend(model, runtime, options.new_tokens)
        if oracle:
            from flamingo.oracle import load_open_flamingo

            say("loading the published open_flamingo model")
            with _quiet(hf=True):
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
    with _quiet(hf=bool(baselines)):
        for k in options.shots:
            demos = _images(rng, k, options.image_size)
            prompt = _prompt(k)
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
            "template": "caption: <image>Output:{caption}<|endofchunk|> ... <image>Output:",
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
    first = samples["runtime_uncached"][0]
    return {
        "shots": k,
        "images": first.images,
        "prompt_tokens": first.prompt_tokens,
        "cases": cases,
        "ratios": ratios,
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


# ------------------------------------------------------------------------------------ report

CASE_LABELS = {
    "runtime_uncached": "runtime",
    "runtime_cached": "runtime, prefix cached",
    "reference": "PyTorch reference",
    "oracle": "open_flamingo generate",
}


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f}"


def format_table(report: dict[str, Any]) -> str:
    """Markdown: one row per (shots, backend), then the runtime/baseline ratios."""
    s = report["settings"]
    lines = [
        f"{s['new_tokens']} new tokens (greedy, stop token off), {s['threads']} threads, "
        f"median of {s['repeats']} (warm-up excluded); load average "
        f"{report['machine']['load_avg_start'][0]} at start, "
        f"{report['machine']['load_avg_end'][0]} at end"
        + (
            " (oversubscribed: load + threads > CPUs)"
            if report["machine"]["oversubscribed"]
            else ""
        ),
        "",
        "| shots | backend | prompt tok (cached) | vision ms/img | prefill ms | decode ms/tok "
        "| TTFT ms | total ms | tok/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for name, m in r["cases"].items():
            cached = f" ({m['cached_tokens']})" if m["cached_tokens"] else ""
            lines.append(
                f"| {r['shots']} | {CASE_LABELS.get(name, name)} | {m['prompt_tokens']}{cached} "
                f"| {m['vision_ms_per_image']:.1f} | {m['prefill_ms']:.1f} "
                f"| {m['decode_ms_per_token']:.1f} | {m['ttft_ms']:.1f} | {m['total_ms']:.1f} "
                f"| {m['tokens_per_s']:.2f} | {_mb(m['peak_rss_bytes'])} |"
            )
    lines += [
        "",
        "Prefix-cached rows: demos warmed once, each query a new image; vision ms/img is per "
        "encoded image (the query's), though every image is still preprocessed and hashed. "
        "Peak RSS: estimated for the backend alone (see bench/harness.py).",
    ]
    has_baselines = any(r["ratios"] for r in report["results"])
    if has_baselines:
        lines += [
            "",
            "Runtime / baseline, median of per-repeat ratios (times and RSS: < 1 is better; "
            "tok/s: > 1 is better):",
            "",
            "| shots | runtime | vs | " + " | ".join(RATIO_LABELS[k] for k in RATIO_METRICS) + " |",
            "|---|---|---|" + "---|" * len(RATIO_METRICS),
        ]
        for r in report["results"]:
            for baseline, modes in r["ratios"].items():
                for mode, ratio in modes.items():
                    cells = " | ".join(
                        "-" if ratio[k] is None else f"{ratio[k]:.2f}" for k in RATIO_METRICS
                    )
                    label = CASE_LABELS.get(baseline, baseline)
                    lines.append(f"| {r['shots']} | {mode} | {label} | {cells} |")
    summary = report["summary"]
    if "cached_query_vs_0shot_total" in summary:
        parts = ", ".join(
            f"{k}-shot {v:.2f}x" for k, v in summary["cached_query_vs_0shot_total"].items()
        )
        lines += ["", f"Prefix-cached query total / 0-shot total: {parts}"]
    return "\n".join(lines)
