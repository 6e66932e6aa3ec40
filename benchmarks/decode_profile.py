"""Where a batch-1 decode step's time goes, per decoder form (issue 18, deliver 1).

Runs one few-shot prompt (prefill + N greedy tokens) per form with onnxruntime's profiler on
the decoder session, and reports for the decode steps: the graph's time by op type (kernel
time summed over the step's nodes), the session's run time, and the step model's time outside
the session run (Python, numpy, IOBinding), as medians per step.

    python benchmarks/decode_profile.py EXPORT_DIR --shots 32 --threads 2 --json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bandwidth import cpu_name  # noqa: E402
from decode_forms_bench import timed_generate  # noqa: E402
from genai_peer import export_demo, prompt_ids  # noqa: E402

from runtime.spec import DecoderForm  # noqa: E402


def profile_form(folder: Path, threads: int | None, shots: int, new: int, seed: int) -> dict:
    import onnxruntime as ort

    from runtime.engine import NO_SPIN_GRAPHS, OnnxFlamingo, make_session

    prefix = str(Path(tempfile.mkdtemp(prefix="ort_profile_")) / "decoder")

    def factory(name: str, path: Path) -> ort.InferenceSession:
        if name != "decoder":
            return make_session(
                path, ["CPUExecutionProvider"], threads, spin=name not in NO_SPIN_GRAPHS
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = prefix
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    engine = OnnxFlamingo(folder, session_factory=factory)
    dims = engine.dims
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((shots + 1, 3, dims.image_size, dims.image_size))
    cross = engine.rows_cross_kv(
        engine.encode_images(pixels.astype(np.float32)), [list(range(shots + 1))]
    )
    ids = prompt_ids(engine.manifest, shots, seed)
    timed = timed_generate(engine, cross, shots + 1, ids, new)
    session = engine.sessions["decoder"]
    trace = json.loads(Path(session.end_profiling()).read_text())
    # node events per model run, in order; the first run is the prefill
    by_run: list[collections.Counter] = []
    for event in trace:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            by_run.append(collections.Counter())
        elif event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and by_run:
            by_run[-1][event["args"]["op_name"]] += event["dur"]
    decode = by_run[1:] if len(by_run) > 1 else by_run
    ops = collections.Counter()
    for counter in decode:
        ops.update(counter)
    total = sum(ops.values())
    steps, runs = timed["steps_ms"], timed["runs_ms"]
    return {
        "step_ms": round(statistics.median(steps), 3),
        "session_run_ms": round(statistics.median(runs), 3),
        "outside_run_ms": round(statistics.median(s - r for s, r in zip(steps, runs)), 3),
        "kernel_ms_per_step": round(total / 1e3 / max(1, len(decode)), 3),
        "op_share": {k: round(v / total, 3) for k, v in ops.most_common(10)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", nargs="?", type=Path, help="portable export (default demo)")
    parser.add_argument("--forms", default="portable;inplace")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from exporter.decoder_forms import derive_export

    report: dict[str, Any] = {"shots": args.shots, "threads": args.threads, "cpu": cpu_name()}
    with tempfile.TemporaryDirectory(prefix="decode_profile_") as tmp:
        src = args.export_dir or export_demo(Path(tmp) / "portable")
        for text in args.forms.split(";"):
            form = DecoderForm.parse(text)
            folder = src if form.portable else Path(tmp) / text.replace(",", "+")
            if not form.portable:
                derive_export(src, folder, form)
            report[text] = profile_form(
                folder, args.threads, args.shots, args.max_new_tokens, args.seed
            )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for text in args.forms.split(";"):
            r = report[text]
            print(
                f"{text}: step {r['step_ms']} ms = session run {r['session_run_ms']} + outside "
                f"{r['outside_run_ms']}; kernels {r['kernel_ms_per_step']} ms; {r['op_share']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
