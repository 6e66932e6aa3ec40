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

    python benchmarks/bandwidth.py --threads 2 --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

DEFAULT_BYTES = 1 << 30  # 1 GiB: several times any last-level cache we have met
GEMV_K = 4096


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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="measurements, spread reported")
    parser.add_argument("--size-mb", type=int, default=DEFAULT_BYTES >> 20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.size_mb < 1:
        parser.error("--threads, --rounds and --size-mb must be >= 1")
    probe = ReadProbe(args.threads, args.size_mb << 20)
    rounds = [probe.measure() for _ in range(args.rounds)]
    probe.close()
    gbs = [r["gbs"] for r in rounds]
    report = {
        "threads": args.threads,
        "array_bytes": args.size_mb << 20,
        "rounds": rounds,
        "median_gbs": statistics.median(gbs),
        "min_gbs": min(gbs),
        "max_gbs": max(gbs),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for r in rounds:
            print(r)
        print(
            f"read bandwidth at {args.threads} thread(s): median {report['median_gbs']} GB/s "
            f"(min {report['min_gbs']}, max {report['max_gbs']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
