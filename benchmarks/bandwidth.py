"""Memory read bandwidth, the denominator of the decode step's weight floor (issue 18 (b)).

Why: at batch 1 a decode step reads every decoder weight once, so (weight bytes / read
bandwidth) is the time no decode step can beat. The bandwidth has to be the machine's real read
rate at the thread count the step uses, measured beside the step (a shared VM's bandwidth moves
by 2x within minutes), over an array much larger than the last-level cache (this VM reports a
260 MB L3), by readers that are not compute-bound (numpy's float64 `sum` is, at ~8 GB/s per
core). Two readers, each splitting the array over `threads`:

* `numpy_max`: float32 `max` over slices in a thread pool (numpy releases the GIL);
* `onnxruntime_gemv`: onnxruntime's MatMul of a (1, K) row by the array as a (K, M) matrix at
  `intra_op_num_threads=threads`, the same MLAS GEMV a decode step runs on its weights.

The higher of the two is the bandwidth (the lower, stricter floor).

    python benchmarks/bandwidth.py --threads 2 --rounds 5 --json   # default threads: all CPUs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

DEFAULT_BYTES = 1 << 30  # 1 GiB: several times any last-level cache we have met
GEMV_K = 4096


def cpu_name() -> str:
    """lscpu's model name (or platform's processor string)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def last_level_cache_bytes() -> int | None:
    """lscpu's largest cache level (e.g. "L3 cache: 260 MiB (1 instance)"), or None."""
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "K": 1 << 10, "M": 1 << 20}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    sizes = []
    for line in out.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("L2 cache", "L3 cache") and value.split():
            number, *unit = value.split()
            try:
                sizes.append(int(float(number) * units.get(unit[0] if unit else "K", 1)))
            except ValueError:
                continue
    return max(sizes) if sizes else None


def machine(threads: int) -> dict[str, Any]:
    """What a benchmark figure must name: CPU, threads, CPUs, load average, UTC date."""
    return {
        "cpu": cpu_name(),
        "threads": threads,
        "cpus": os.cpu_count(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def busy_warning() -> str | None:
    """A warning when other processes already keep the CPUs busy (1-minute load average >=
    CPU count): then every figure, the bandwidth probe's included, measures a share of
    contended cores, and ratios to the floor look better than the machine is."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load < cpus:
        return None
    return (
        f"load average {load:.1f} on {cpus} CPUs before this run: other processes share the "
        "cores, so these figures (the bandwidth probe's too) measure contention, not the "
        "machine; rerun on a quiet machine"
    )


class ReadProbe:
    """Read bandwidth in GB/s (1e9 bytes/s) at `threads`; holds its array and session, so
    `measure` can be called between a benchmark's runs."""

    def __init__(self, threads: int, size_bytes: int = DEFAULT_BYTES) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        self.threads = threads
        rows = max(1, size_bytes // 4 // GEMV_K)
        self.array = np.ones((GEMV_K, rows), dtype=np.float32)  # written once: pages in
        self.nbytes = self.array.nbytes
        flat = self.array.reshape(-1)
        self._slices = np.array_split(flat, threads)
        self._pool = ThreadPoolExecutor(threads)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, GEMV_K])
        w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [GEMV_K, rows])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv", [x, w], [y]
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(model.SerializeToString(), options)
        self._feed = {"x": np.ones((1, GEMV_K), dtype=np.float32), "w": self.array}

    def _numpy_max(self) -> None:
        list(self._pool.map(np.max, self._slices))

    def _gemv(self) -> None:
        self._session.run(None, self._feed)

    def measure(self, repeats: int = 3) -> dict[str, Any]:
        """Best GB/s of each reader over `repeats` passes (after one warm pass), and `gbs`,
        the higher of the two."""
        out: dict[str, Any] = {}
        for name, read in (("numpy_max", self._numpy_max), ("onnxruntime_gemv", self._gemv)):
            read()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                read()
                times.append(time.perf_counter() - start)
            out[f"{name}_gbs"] = round(self.nbytes / min(times) / 1e9, 2)
        out["gbs"] = max(out["numpy_max_gbs"], out["onnxruntime_gemv_gbs"])
        return out

    def close(self) -> None:
        self._pool.shutdown()
        del self._session, self._feed, self.array, self._slices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--rounds", type=int, default=5, help="measurements, spread reported")
    parser.add_argument("--size-mb", type=int, default=DEFAULT_BYTES >> 20)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    if threads < 1 or args.rounds < 1 or args.size_mb < 1:
        parser.error("--threads, --rounds and --size-mb must be >= 1")
    warning = busy_warning()
    if warning:
        print(f"[bandwidth] warning: {warning}", file=sys.stderr)
    try:
        probe = ReadProbe(threads, args.size_mb << 20)
    except MemoryError:
        parser.error(f"--size-mb {args.size_mb}: not enough memory for the probe's array")
    rounds = [probe.measure() for _ in range(args.rounds)]
    probe.close()
    gbs = [r["gbs"] for r in rounds]
    report = {
        **machine(threads),
        "array_bytes": args.size_mb << 20,
        "passes_per_round": 3,
        "rounds": rounds,
        "median_gbs": round(statistics.median(gbs), 2),
        "min_gbs": min(gbs),
        "max_gbs": max(gbs),
        "busy_warning": warning,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for i, r in enumerate(rounds, 1):
            print(
                f"round {i}: numpy max {r['numpy_max_gbs']} GB/s, onnxruntime GEMV "
                f"{r['onnxruntime_gemv_gbs']} GB/s (best of 3 passes each)"
            )
        print(
            f"read bandwidth at {threads} thread(s): median {report['median_gbs']} GB/s "
            f"(min {report['min_gbs']}, max {report['max_gbs']}); {report['cpu']}, load "
            f"average {report['loadavg'][0]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
