"""The bench report as a Markdown table: one row per (shots, backend), then the ratios."""

from __future__ import annotations

from typing import Any

from .harness import RATIO_LABELS, RATIO_METRICS

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
