"""Scores per export and shot count, deltas against the first export, and the plot.

`format_table` is what `flamingo-export eval` prints; `write_report` writes the Markdown
report and a PNG of score vs shots beside it (`REPORT.png`), each written to a temporary file
and renamed, so an interrupted run leaves no half-written report.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from .runner import EvaluationResult, ExportResult
from .tasks import EvaluationError

__all__ = ["format_table", "markdown", "report_paths", "write_report"]


def _cell(row: dict, base: dict | None, trials: int) -> str:
    mean = row["mean"]
    if math.isnan(mean):
        return "nan"
    text = f"{mean:.2f}" + (f" ± {row['stddev']:.2f}" if trials > 1 else "")
    if base is not None and not math.isnan(base["mean"]):
        text += f" ({mean - base['mean']:+.2f})"
    return text


def _rows(result: EvaluationResult) -> tuple[list[str], list[list[str]]]:
    shots = list(result.protocol["shots"])
    trials = len(result.protocol["trial_seeds"])
    base = result.exports[0].scores()
    header = ["export", "precision", *[f"{s} shots" for s in shots]]
    rows = []
    for i, export in enumerate(result.exports):
        scores = export.scores()
        rows.append(
            [export.export, export.precision]
            + [_cell(scores[s], base[s] if i else None, trials) for s in shots]
        )
    return header, rows


def _breakdown(export: ExportResult) -> tuple[list[str], list[list[str]]] | None:
    """The demo task's per-attribute accuracy (first trial of each shot count)."""
    firsts = [t for t in export.trials if t.trial == 0 and t.breakdown]
    if not firsts:
        return None
    groups = list(firsts[0].breakdown)
    header = ["shots", "all", *groups]
    rows = [
        [str(t.shots), f"{t.score:.1f}%", *[f"{t.breakdown[g]:.1f}%" for g in groups]]
        for t in firsts
    ]
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def format_table(result: EvaluationResult) -> str:
    """Plain-text table: one row per export, one column per shot count (mean ± stddev over
    trials, and the difference to the first export in parentheses)."""
    header, rows = _rows(result)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [f"{result.task}: {result.metric}"]
    for r in [header, *rows]:
        lines.append("  ".join(v.ljust(w) if c < 2 else v.rjust(w)
                               for c, (v, w) in enumerate(zip(r, widths))))  # fmt: skip
    return "\n".join(lines)


def markdown(result: EvaluationResult, plot_name: str | None = None) -> str:
    p = result.protocol
    parts = [
        f"# {result.task}: {result.metric} by shots",
        "",
        f"Protocol: {p['source']}; demonstrations {p['demonstrations']}"
        + (f" ({p['rices_features']})" if p.get("rices_features") else "")
        + f"; {p['num_samples']} queries; trial seeds {p['trial_seeds']}; "
        f"{p['num_beams']} beam(s)"
        + (f", {p['max_new_tokens']} new tokens" if p.get("max_new_tokens") else "")
        + ". Differences are against the first export.",
        "",
        _markdown_table(*_rows(result)),
    ]
    for export in result.exports:
        table = _breakdown(export)
        if table is not None:
            parts += ["", f"By attribute, {export.export}:", "", _markdown_table(*table)]
    if plot_name:
        parts += ["", f"![{result.metric} vs shots]({plot_name})"]
    return "\n".join(parts) + "\n"


def _atomic_write(path: Path, write: callable) -> None:  # type: ignore[valid-type]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot(result: EvaluationResult, path: Path) -> None:
    """PNG of the mean score vs shot count, one line per export."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for export in result.exports:
        scores = export.scores()
        shots = sorted(scores)
        ax.plot(shots, [scores[s]["mean"] for s in shots], marker="o",
                label=f"{Path(export.export).name} ({export.precision})")  # fmt: skip
    ax.set_xlabel("shots")
    ax.set_ylabel(result.metric)
    ax.set_title(f"{result.task}: {result.metric} vs shots")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def report_paths(path: str | Path) -> tuple[Path, Path]:
    """(Markdown report, PNG plot) for `--report PATH`: PATH and PATH with suffix .png.
    EvaluationError for a PATH with no file name or one ending in .png (the plot would
    overwrite the report)."""
    path = Path(path)
    if not str(path) or not path.name or path.name in (".", ".."):
        raise EvaluationError(f"--report {str(path)!r}: expected a file name")
    png = path.with_suffix(".png")
    if png == path:
        raise EvaluationError(f"--report {path}: the plot is written beside it as {png}; "
                              "give the report another suffix (e.g. .md)")  # fmt: skip
    return path, png


def write_report(result: EvaluationResult, path: str | Path) -> tuple[Path, Path]:
    """Write the Markdown report at `path` and its plot beside it (`report_paths`)."""
    path, png = report_paths(path)
    _atomic_write(png, lambda tmp: plot(result, tmp))
    _atomic_write(path, lambda tmp: tmp.write_text(markdown(result, png.name)))
    return path, png
