"""Decode ms/token per decoder form and shot count, side by side in one run (issue 18).

Why: the portable decoder's `present = Concat(past, new)` copies the whole self-attention cache
every step, and its IOBinding rebinds every present; the in-place form (runtime.spec.DecoderForm
kv_cache="inplace") appends into one preallocated buffer bound once. This script derives the
forms from one portable export, prefills the same few-shot prompt (k shots: k image-text chunks
and the query's image), decodes greedily, and records every decode step's time (the step
model's call: graph run, binding, feeds). Each repeat first measures the read bandwidth
(benchmarks/bandwidth.py, a 1 GiB probe) and then runs every shot count x form, so the forms and
shot counts share the machine's load and each repeat has its own floor (decoder weight bytes
read per step / that repeat's bandwidth: a VM's bandwidth moves by 2x within minutes). Reported:
the median step over all repeats, where a median step goes (onnxruntime's run vs the rest), the
decode loop's wall time per token and its part outside the graph runs (search, step model,
binding: what the runtime adds per token), and as medians of per-repeat ratios (with their
range): step / floor and step / the first shot count's step.

    python benchmarks/decode_forms_bench.py EXPORT_DIR --threads 2 --shots 0,4,16,32 --json

`--precision fp32,int8-weight-only,int4` (runtime_bench.PRECISION_VARIANTS) quantizes every form
(fp32 form first, then quantize, as `export --decoder-form` + `quantize` do) and times each
precision x form in the same alternation; each precision has its own floor (its decoder's
weight bytes) and its forms must give identical tokens (precisions differ from each other).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # run as a plain script from anywhere
        sys.path.insert(0, str(path))

from bandwidth import ReadProbe, busy_warning, cpu_name, last_level_cache_bytes  # noqa: E402
from genai_peer import export_demo, prompt_ids  # noqa: E402
from runtime_bench import decode_weight_bytes, precision_export  # noqa: E402

from runtime.errors import FlamingoExportError  # noqa: E402
from runtime.spec import DecoderForm  # noqa: E402


def say(message: str) -> None:
    print(f"[decode_forms_bench] {message}", file=sys.stderr, flush=True)


def timed_generate(engine: Any, cross: dict, n_images: int, ids: np.ndarray, new: int) -> dict:
    """One greedy generation; per decode step: wall time of `step` and of onnxruntime's run."""
    from runtime.generation import GenerationConfig, generate

    model = engine.step_model(cross, np.array([n_images]))
    session = engine.sessions["decoder"]
    run_times: list[float] = []
    step_times: list[float] = []
    original_step = model.step
    run = session.run_with_iobinding

    def timed_run(*args: Any) -> Any:
        start = time.perf_counter()
        out = run(*args)
        run_times.append(time.perf_counter() - start)
        return out

    def timed_step(*args: Any) -> Any:
        start = time.perf_counter()
        out = original_step(*args)
        step_times.append(time.perf_counter() - start)
        return out

    model.step = timed_step  # type: ignore[method-assign]
    session.run_with_iobinding = timed_run
    try:
        out = generate(model, ids, np.ones_like(ids), GenerationConfig(new, eos_token_ids=()))
        end = time.perf_counter()
    finally:
        del session.run_with_iobinding
    decode_s = end - model.prefill_end  # every decode step with the search around it
    return {
        "tokens": out.sequences[0],
        "wall_ms_per_token": 1e3 * decode_s / max(1, len(step_times) - 1),
        "prefill_ms": 1e3 * step_times[0],
        "steps_ms": [1e3 * t for t in step_times[1:]],
        "runs_ms": [1e3 * t for t in run_times[1:]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", nargs="?", type=Path, help="portable export (default demo)")
    parser.add_argument(
        "--forms", default="portable;inplace", help="';'-separated forms (each a comma list)"
    )
    parser.add_argument("--shots", default="0,4,16,32")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--precision", default="fp32", help="comma list (runtime_bench's names)")
    parser.add_argument(
        "--no-allow-spinning", action="store_true", help="onnxruntime's workers do not spin"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep derived exports here")
    parser.add_argument(
        "--probe-mb", type=int, default=1024, help="bandwidth probe array (default 1024: > L3)"
    )
    args = parser.parse_args(argv)
    try:
        shots = [int(s) for s in args.shots.split(",")]
        forms = {text: DecoderForm.parse(text) for text in args.forms.split(";")}
    except (ValueError, FlamingoExportError) as e:
        parser.error(f"--shots is a comma list of ints >= 0, --forms of decoder forms: {e}")
    if min(shots) < 0 or args.repeats < 1 or args.max_new_tokens < 2 or args.probe_mb < 1:
        parser.error("--shots >= 0, --repeats >= 1, --max-new-tokens >= 2, --probe-mb >= 1")
    if args.threads is not None and args.threads < 0:
        parser.error("--threads >= 0 (0: all CPUs)")
    if args.export_dir is not None and not (args.export_dir / "manifest.json").is_file():
        parser.error(f"{args.export_dir}: not an export folder (no manifest.json)")
    try:
        return run(args, shots, forms)
    except FlamingoExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, shots: list[int], forms: dict[str, DecoderForm]) -> int:
    """The benchmark over checked arguments; prints the report, returns the exit status."""
    from exporter.decoder_forms import derive_export
    from runtime.engine import OnnxFlamingo

    threads = args.threads or os.cpu_count() or 1
    warning = busy_warning()  # before any work of ours adds to the load
    if warning:
        say(f"warning: {warning}")
    cache = last_level_cache_bytes()
    if cache is not None and args.probe_mb << 20 < 2 * cache:
        say(f"warning: a {args.probe_mb} MB probe is read partly from the {cache >> 20} MB cache")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    with tempfile.TemporaryDirectory(prefix="decode_forms_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        src = args.export_dir or export_demo(work / "portable")
        engines = {}
        weights_of = {}
        for text, form in forms.items():
            folder = src if form.portable else work / text.replace(",", "+")
            if not form.portable and not folder.exists():
                derive_export(src, folder, form)
            for precision in precisions:
                say(f"{precision} {text}")
                path = precision_export(folder, precision)
                if form.portable:
                    weights_of[precision] = decode_weight_bytes(path)
                name = text if precisions == ["fp32"] else f"{precision} {text}"
                engines[name] = (
                    precision,
                    OnnxFlamingo(path, threads=args.threads, spin=not args.no_allow_spinning),
                )
        if not weights_of:  # no portable form asked: the first form's weights
            weights_of = {p: decode_weight_bytes(precision_export(folder, p)) for p in precisions}
        say(f"read bandwidth probe ({args.probe_mb} MB)")
        probe = ReadProbe(threads, args.probe_mb << 20)
        weights = weights_of[precisions[0]]
        first = next(iter(engines.values()))[1]
        manifest, dims = first.manifest, first.dims
        prompts = {}
        for k in shots:
            n_images = k + 1
            rng = np.random.default_rng(args.seed)
            size = dims.image_size
            pixels = rng.standard_normal((n_images, 3, size, size)).astype(np.float32)
            cross = first.rows_cross_kv(first.encode_images(pixels), [list(range(n_images))])
            prompts[k] = (n_images, cross, prompt_ids(manifest, k, args.seed))
            say(f"{k} shots: {prompts[k][2].shape[1]} prompt tokens")
            for _, engine in engines.values():  # warm-up
                timed_generate(engine, cross, n_images, prompts[k][2], 4)
        # every repeat: the bandwidth probe, then every shot count x engine, so each repeat's
        # steps are set against the bandwidth of that minute (a VM's moves by 2x in minutes)
        samples: dict[int, dict[str, list[dict]]] = {k: {t: [] for t in engines} for k in shots}
        probes = []
        for rep in range(args.repeats):
            probes.append(probe.measure(repeats=2))
            say(f"repeat {rep + 1}/{args.repeats}: read bandwidth {probes[-1]['gbs']} GB/s")
            for k, (n_images, cross, ids) in prompts.items():
                for t, (_, engine) in engines.items():
                    samples[k][t].append(
                        timed_generate(engine, cross, n_images, ids, args.max_new_tokens)
                    )
        probe.close()
        rows = []
        for k in shots:
            row: dict[str, Any] = {"shots": k, "prompt_tokens": int(prompts[k][2].shape[1])}
            # the forms of one precision give its tokens exactly; precisions differ
            first_of: dict[str, list[int]] = {}
            for t, runs in samples[k].items():
                first_of.setdefault(engines[t][0], runs[0]["tokens"])
            row["tokens_identical"] = all(
                s["tokens"] == first_of[engines[t][0]]
                for t, runs in samples[k].items()
                for s in runs
            )
            for t, runs in samples[k].items():
                steps = [x for s in runs for x in s["steps_ms"]]
                ort = [x for s in runs for x in s["runs_ms"]]
                bytes_ = weights_of[engines[t][0]]["per_step_bytes"]
                # per repeat: its median step over its own minute's floor
                per_rep = [
                    statistics.median(s["steps_ms"]) / (bytes_ / (b["gbs"] * 1e9) * 1e3)
                    for s, b in zip(runs, probes)
                ]
                # per repeat: its decode loop's wall time per token minus its mean graph run
                outside = [s["wall_ms_per_token"] - statistics.fmean(s["runs_ms"]) for s in runs]
                row[t] = {
                    "decode_ms_per_token": round(statistics.median(steps), 3),
                    "onnxruntime_run_ms": round(statistics.median(ort), 3),
                    # the whole decode loop per token (search, step model, binding) minus the
                    # graph run: what our runtime adds per token
                    "wall_ms_per_token": round(
                        statistics.median(s["wall_ms_per_token"] for s in runs), 3
                    ),
                    "outside_run_ms": round(statistics.median(outside), 3),
                    "mean_ms_per_token": round(statistics.fmean(steps), 3),
                    "prefill_ms": round(statistics.median(s["prefill_ms"] for s in runs), 2),
                    "repeat_ms_per_token": [
                        round(statistics.median(s["steps_ms"]), 3) for s in runs
                    ],
                    "vs_weights_floor": round(statistics.median(per_rep), 3),
                    "vs_weights_floor_range": [round(min(per_rep), 3), round(max(per_rep), 3)],
                }
            rows.append(row)
    bandwidths = [b["gbs"] for b in probes]
    gbs = statistics.median(bandwidths)
    floor_ms = weights["per_step_bytes"] / (gbs * 1e9) * 1e3
    for row in rows:
        for t in engines:
            r = row[t]
            r["floor_ms"] = round(
                weights_of[engines[t][0]]["per_step_bytes"] / (gbs * 1e9) * 1e3, 3
            )
            zero = rows[0][t]
            # per repeat too: the two shot counts ran minutes apart at most, in the same repeat
            per_rep = [a / b for a, b in zip(r["repeat_ms_per_token"], zero["repeat_ms_per_token"])]
            r["vs_first_shots"] = round(statistics.median(per_rep), 3)
            r["vs_first_shots_range"] = [round(min(per_rep), 3), round(max(per_rep), 3)]
    report = {
        "rows": rows,
        "forms": {t: f.to_dict() for t, f in forms.items()},
        "weights_per_step_bytes": weights["per_step_bytes"],
        "weights_per_step_bytes_by_precision": {
            p: w["per_step_bytes"] for p, w in weights_of.items()
        },
        "allow_spinning": not args.no_allow_spinning,
        "bandwidth_gbs": gbs,
        "bandwidth_probes": probes,
        "bandwidth_range_gbs": [min(bandwidths), max(bandwidths)],
        "floor_ms": round(floor_ms, 3),
        # the floor assumes the weights stream from DRAM; under the cache size they do not
        "last_level_cache_bytes": cache,
        "weights_in_cache": cache is not None and weights["per_step_bytes"] < cache,
        "threads": threads,
        "cpu": cpu_name(),
        "loadavg": os.getloadavg(),
        "busy_warning": warning,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "export": str(args.export_dir or "models/demo (exported fp32)"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(
        f"{report['cpu']}, {threads} threads, read bandwidth {gbs:.1f} GB/s (median of "
        f"{args.repeats} probes, {min(bandwidths)}-{max(bandwidths)}), weight floor "
        f"{floor_ms:.2f} ms/token; medians of every decode step over {args.repeats} repeats; "
        "vs floor: median over repeats of each repeat's step / its own probe's floor"
    )
    names = list(engines)
    first = rows[0]["shots"]
    columns = (
        ("decode_ms_per_token", "step ms"),
        ("outside_run_ms", "outside run ms"),
        ("vs_weights_floor", "vs floor"),
        ("vs_first_shots", f"vs {first} shots"),
    )
    print("step ms: the step model's call (median step); outside run ms: the decode loop's "
          "wall time per token minus its graph runs (median over repeats)")  # fmt: skip
    if report["weights_in_cache"]:
        print("note: the decoder's weights fit in the last-level cache: the DRAM floor does "
              "not bound this step")  # fmt: skip
    for key, label in columns:
        print(f"\n{label}")
        print(f"{'shots':>5} {'prompt':>6} " + " ".join(f"{n:>26}" for n in names)
              + "  identical")  # fmt: skip
        for row in rows:
            print(f"{row['shots']:>5} {row['prompt_tokens']:>6} "
                  + " ".join(f"{row[n][key]:>26.3f}" for n in names)
                  + f"  {row['tokens_identical']}")  # fmt: skip
    return 0 if all(r["tokens_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
