"""Serving benchmark: `flamingo-export serve` under 1, 4 and 16 concurrent clients against the
same requests run one by one through `FlamingoPipeline` in one process, in the same run.

Requests are 4-shot chats of the demo task's held-out evaluation episodes: a few shared
demonstration sets (`--demo-sets`, the demonstrations of episodes 0..k-1), each asked about the
query images of other held-out episodes (request i: demonstrations of set i % k, the query
image of episode i). Every client streams (`stream_options.include_usage`) over a keep-alive
connection (`--client http`: a lean standard-library SSE reader, since clients and server share
the cores; `--client openai`: the official client): latency = request sent -> last chunk,
time to first token (TTFT) = request sent -> first text. An error is a non-200 answer or an
answer that differs from the sequential pipeline's on the same prompt.

Then the memory check: the server's RSS (/proc/PID/status VmRSS) once its caches are warm and
full (distinct query images past the vision cache's 256 MiB, more demonstration sets than the
prefix cache's 8 entries), and after `--rss-requests` more.

    python benchmarks/serve_bench.py [--export OUT] [--threads 2] [--server-threads 1]
        [--requests 128] [--repeats 3] [--rss-requests 5000] [--json]

Sequential and server blocks are interleaved `--repeats` times (every repeat: the pipeline's
block, then each concurrency level) so both see the same machine load; the table gives
medians, the goals the median of the per-repeat ratios. The server is a subprocess on
127.0.0.1 (free port), stopped by its PID.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo.task import eval_episodes  # noqa: E402
from runtime.pipeline import FlamingoPipeline  # noqa: E402
from runtime.prompts import Demonstration, build_few_shot_prompt  # noqa: E402

MODEL = ROOT / "models" / "demo"
GOALS = {"throughput_x": 2.0, "ttft_p95_x": 3.0, "rss_growth": 0.05}


def png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Workload:
    """Request i: demonstration set i % k (PNG bytes, answers), the query image of episode i."""

    def __init__(self, n: int, demo_sets: int, seed: int = 1234, offset: int = 0) -> None:
        episodes = eval_episodes(n + offset, seed, shots=4)
        self.sets = []
        for ep in episodes[:demo_sets]:
            answers = [s.answer(ep.attribute) for s in ep.demos]
            self.sets.append(([png(s.render()) for s in ep.demos], answers))
        self.queries = [png(ep.query.render()) for ep in episodes[offset : offset + n]]
        self.k = demo_sets

    def prompt(self, i: int) -> tuple[str, list[bytes]]:
        images, answers = self.sets[i % self.k]
        demos = [Demonstration(img, text=a) for img, a in zip(images, answers)]
        return build_few_shot_prompt(demos, query_image=self.queries[i])

    def messages(self, i: int) -> list[dict]:
        images, answers = self.sets[i % self.k]
        out: list[dict] = []
        for img, answer in zip(images, answers):
            out.append({"role": "user", "content": [_part(img)]})
            out.append({"role": "assistant", "content": answer})
        out.append({"role": "user", "content": [_part(self.queries[i])]})
        return out


def _part(image: bytes) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sequential(pipe: FlamingoPipeline, work: Workload, n: int) -> dict[str, Any]:
    """The same requests one by one through FlamingoPipeline (warm caches, like the server)."""
    latencies, ttfts, answers, tokens = [], [], [], 0
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        stamps: list[float] = []
        out = pipe.generate(*work.prompt(i), on_token=lambda *_, s=stamps: s.append(
            time.perf_counter()))  # fmt: skip
        latencies.append(time.perf_counter() - t0)
        ttfts.append(stamps[0] - t0)
        answers.append(out.text)
        tokens += len(out.token_ids)
    wall = time.perf_counter() - start
    return {"answers": answers, **_summary(n, wall, tokens, latencies, ttfts, 0)}


def _summary(n: int, wall: float, tokens: int, lat: list[float], ttft: list[float],
             errors: int) -> dict[str, Any]:  # fmt: skip
    return {
        "requests": n,
        "wall_s": wall,
        "requests_per_s": n / wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_ms": 1e3 * pct(lat, 0.5),
        "latency_p95_ms": 1e3 * pct(lat, 0.95),
        "ttft_p50_ms": 1e3 * pct(ttft, 0.5),
        "ttft_p95_ms": 1e3 * pct(ttft, 0.95),
        "errors": errors,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export: Path, threads: int, log: Path, *extra: str) -> tuple[Any, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "cli.main", "serve", str(export), "--host", "127.0.0.1",
           "--port", str(port), "--threads", str(threads), "--log-level", "warning",
           "--max-queue", "256", *extra]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.25)
    raise SystemExit("server did not become healthy")


def stop_server(proc: Any) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def clients(port: int, work: Workload, ids: list[int], concurrency: int,
            expected: list[str] | None, kind: str = "http") -> dict[str, Any]:  # fmt: skip
    """`concurrency` clients, each streaming its share of `ids` one after another over its own
    keep-alive connection: `http` a lean standard-library SSE client (what the table uses: the
    clients share the server's 2 cores, so their own cost is kept small), `openai` the
    official client."""
    bodies = {i: json.dumps({"model": "m", "messages": work.messages(i), "stream": True,
                             "stream_options": {"include_usage": True}}).encode()
              for i in ids}  # fmt: skip
    lock = threading.Lock()
    lat: list[float] = []
    ttft: list[float] = []
    tokens = 0
    errors: list[str] = []

    def run_share(share: list[int]) -> None:
        nonlocal tokens
        stream = _openai_stream(port) if kind == "openai" else _HttpStream(port)
        for i in share:
            t0 = time.perf_counter()
            try:
                text, used, first = stream(bodies[i])
            except Exception as e:
                with lock:
                    errors.append(f"{i}: {type(e).__name__}: {e}")
                continue
            end = time.perf_counter()
            with lock:
                lat.append(end - t0)
                ttft.append((first or end) - t0)
                tokens += used
                if expected is not None and text != expected[i]:
                    errors.append(f"{i}: {text!r} != {expected[i]!r}")

    shares = [ids[c::concurrency] for c in range(concurrency)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(run_share, shares))
    wall = time.perf_counter() - start
    out = _summary(len(ids), wall, tokens, lat or [0.0], ttft or [0.0], len(errors))
    out["error_samples"] = errors[:5]
    return out


class _HttpStream:
    """POST a streaming chat request, read the SSE: (text, completion tokens, first-text time)."""

    def __init__(self, port: int) -> None:
        import http.client

        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def __call__(self, body: bytes) -> tuple[str, int, float | None]:
        self.conn.request("POST", "/v1/chat/completions", body=body,
                          headers={"Content-Type": "application/json"})  # fmt: skip
        r = self.conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
        text, used, first = "", 0, None
        for line in r:
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                break
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text += chunk["choices"][0]["delta"]["content"]
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
        r.read()
        return text, used, first


def _openai_stream(port: int) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

    def call(body: bytes) -> tuple[str, int, float | None]:
        request = json.loads(body)
        text, used, first = "", 0, None
        for chunk in client.chat.completions.create(**request):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return text, used, first

    return call


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def machine(threads: int) -> dict[str, Any]:
    cpu = "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                   if ln.startswith("Model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(),
            "threads": threads, "python": platform.python_version()}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, default=None, help="default: export models/demo")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (both sides)")
    parser.add_argument("--requests", type=int, default=128, help="requests per block")
    parser.add_argument("--demo-sets", type=int, default=4)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument(
        "--client",
        choices=["http", "openai"],
        default="http",
        help="benchmark client: lean stdlib SSE, or the openai package",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians)")
    parser.add_argument("--rss-requests", type=int, default=5000)
    parser.add_argument("--rss-warmup", type=int, default=800)
    parser.add_argument("--server-args", default="", help="extra `serve` flags, e.g. batch size")
    parser.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="the server's onnxruntime threads (default: --threads)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    export = args.export
    if export is None:
        export = tmp / "demo"
        subprocess.run(
            [sys.executable, "-m", "cli.main", "export", "--lm", str(MODEL / "lm"),
             "--vision", str(MODEL / "open_clip_model.safetensors"),
             "--checkpoint", str(MODEL / "checkpoint.safetensors"), "--output", str(export)],
            check=True, cwd=ROOT, capture_output=True,
        )  # fmt: skip
    n = args.requests
    work = Workload(n, args.demo_sets)
    report: dict[str, Any] = {"machine": machine(args.threads), "command": " ".join(sys.argv)}
    report["loadavg_start"] = os.getloadavg()
    pipe = FlamingoPipeline(export, threads=args.threads)
    for i in range(min(n, work.k)):  # warm: every demonstration set's prefix once
        pipe.generate(*work.prompt(i))
    server_threads = args.server_threads or args.threads
    proc, port = start_server(export, server_threads, tmp / "server.log", *args.server_args.split())
    repeats: list[dict[str, Any]] = []
    try:
        clients(port, work, list(range(min(n, work.k))), 1, None)  # warm the prefix cache
        for _ in range(args.repeats):  # interleaved: both sides see the same machine load
            seq = sequential(pipe, work, n)
            expected = seq.pop("answers")
            run: dict[str, Any] = {"sequential": seq, "server": {}}
            for c in (int(x) for x in args.concurrency.split(",")):
                batches = metric(port, "flamingo_engine_batches_total")
                rows = metric(port, "flamingo_engine_rows_total")
                level = clients(port, work, list(range(n)), c, expected, args.client)
                level["mean_batch"] = (metric(port, "flamingo_engine_rows_total") - rows) / max(
                    1.0, metric(port, "flamingo_engine_batches_total") - batches
                )
                run["server"][str(c)] = level
            run["goals"] = goals(run)
            repeats.append(run)
        if args.rss_requests:
            report["rss"] = rss_phase(proc.pid, port, args)
    finally:
        stop_server(proc)
    report["loadavg_end"] = os.getloadavg()
    report["repeats"] = repeats
    report.update(median_run(repeats))
    report["goals"] = {k: statistics.median(r["goals"][k] for r in repeats)
                       for k in repeats[0]["goals"]}  # fmt: skip
    report["goals"]["errors"] = sum(r["goals"]["errors"] for r in repeats)
    if "rss" in report:
        report["goals"]["rss_growth"] = report["rss"]["growth"]
        report["goals"]["errors"] += report["rss"]["errors"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


def rss_phase(pid: int, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Warm and fill the caches with distinct queries and 16 demonstration sets, then RSS
    before and after `--rss-requests` more (16 clients)."""
    total = args.rss_warmup + args.rss_requests
    work = Workload(total, demo_sets=16, offset=args.requests)
    clients(port, work, list(range(args.rss_warmup)), 16, None)
    before = rss_bytes(pid)
    run = clients(port, work, list(range(args.rss_warmup, total)), 16, None)
    after = rss_bytes(pid)
    return {"warmup_requests": args.rss_warmup, "requests": args.rss_requests,
            "rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20,
            "growth": after / before - 1, "errors": run["errors"],
            "requests_per_s": run["requests_per_s"]}  # fmt: skip


def goals(run: dict[str, Any]) -> dict[str, Any]:
    """One repeat's ratios: top concurrency vs sequential, its p95 TTFT vs a lone request's."""
    seq = run["sequential"]
    server = run["server"]
    top = server[max(server, key=int)]
    lone = server.get("1", top)
    return {
        "throughput_x": top["requests_per_s"] / seq["requests_per_s"],
        "ttft_p95_x": top["ttft_p95_ms"] / lone["ttft_p50_ms"],
        "errors": sum(s["errors"] for s in server.values()),
    }


def median_run(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per side and concurrency, the median of every number over the repeats."""

    def med(rows: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
        return {k: statistics.median(r[k] for r in rows) for k in keys}

    return {
        "sequential": med([r["sequential"] for r in repeats]),
        "server": {c: med([r["server"][c] for r in repeats]) for c in repeats[0]["server"]},
    }


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"{m['date']}  {m['cpu']}  {m['cores']} cores, {m['threads']} threads")
    print(f"command: {report['command']}")
    start, end = report["loadavg_start"], report["loadavg_end"]
    print(f"load average (1 min) at start {start[0]:.2f}, at end {end[0]:.2f}; medians of "
          f"{len(report['repeats'])} interleaved repeats")  # fmt: skip
    print(
        "| | clients | req/s | gen tok/s | p50 ms | p95 ms | TTFT p50 ms | TTFT p95 ms | errors "
        "| mean batch |"
    )
    print("|---" * 10 + "|")
    rows = [("pipeline, sequential", "1", report["sequential"])]
    rows += [("server", c, s) for c, s in report["server"].items()]
    for name, c, s in rows:
        print(
            f"| {name} | {c} | {s['requests_per_s']:.1f} | {s['tokens_per_s']:.1f} | "
            f"{s['latency_p50_ms']:.1f} | {s['latency_p95_ms']:.1f} | {s['ttft_p50_ms']:.1f} | "
            f"{s['ttft_p95_ms']:.1f} | {s['errors']} | {s.get('mean_batch', 1):.1f} |"
        )
    if "rss" in report:
        r = report["rss"]
        print(f"RSS {r['rss_before_mb']:.1f} -> {r['rss_after_mb']:.1f} MB over {r['requests']} "
              f"requests after {r['warmup_requests']} warm-up ({100 * r['growth']:+.2f}%), "
              f"{r['errors']} errors, {r['requests_per_s']:.1f} req/s")  # fmt: skip
    g = report["goals"]
    ratios = ", ".join(f"{r['goals']['throughput_x']:.2f}x" for r in report["repeats"])
    print(f"throughput per repeat: {ratios}")
    print(
        f"goals: throughput {g['throughput_x']:.2f}x (>= 2), TTFT p95 {g['ttft_p95_x']:.2f}x "
        f"a lone request's (<= 3), errors {g['errors']} (0)"
        + (f", RSS growth {100 * g['rss_growth']:+.2f}% (<= 5%)" if "rss_growth" in g else "")
    )


if __name__ == "__main__":
    main()
