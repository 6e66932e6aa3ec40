"""Kill `flamingo-export export` and `quantize` at random points and check what is left.

Each trial starts the command in a subprocess (half of them replacing an existing OUT with
--force), waits until its temporary folder appears, sleeps a random 0-90% of the time the
command then needed in a clean run, and sends SIGKILL or SIGTERM. Invariants checked after
every trial:

* OUT is absent (there was none) or a complete export that `load_manifest` verifies (every
  sha256); with --force it is never absent: the old export or the new one;
* after SIGTERM nothing is left beside OUT (no temporary folder, no lock file), and the exit
  status is 143 (or the command had already finished);
* after SIGKILL the next run of the same command to the same OUT succeeds and leaves nothing
  beside OUT either (it reclaims the killed writer's folders).

    python benchmarks/kill_trials.py --trials 100 --json out/kill.json

tests/exporter/test_kill.py runs a handful of trials in CI. Model files default to the demo
model (models/demo); the trials use the same machine's CPU for everything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.manifest import load_manifest  # noqa: E402

CLI = [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())"]


def _command(kind: str, model: list[str], source: Path, out: Path, force: bool) -> list[str]:
    if kind == "export":
        args = ["export", *model, "--output", str(out)]
    else:
        args = ["quantize", str(source), "--precision", "int8", "--int8-mode", "weight-only",
                "--output", str(out)]  # fmt: skip
    return [*CLI, *args, "-q", *(["--force"] if force else [])]


def _beside(out: Path) -> list[str]:
    """What a writer may leave next to OUT: `.OUT.*` (temporary folders, lock)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _valid(out: Path) -> bool:
    try:
        load_manifest(out)
    except Exception:
        return False
    return True


def _run(cmd: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode
    return rc, time.perf_counter() - start


def _write_window(cmd: list[str], out: Path) -> float:
    """Seconds from the temporary folder's appearance to the command's end (one clean run)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = None
    while proc.poll() is None:
        if seen is None and _beside(out):
            seen = time.perf_counter()
        time.sleep(0.005)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    return time.perf_counter() - (seen or time.perf_counter())


def trial(
    kind: str, sig: int, force: bool, model: list[str], source: Path, work: Path,
    window: float, rng: random.Random,
) -> dict[str, Any]:  # fmt: skip
    folder = Path(tempfile.mkdtemp(dir=work))
    out = folder / "OUT"
    if force:
        shutil.copytree(source, out)
    cmd = _command(kind, model, source, out, force)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not [n for n in _beside(out) if ".tmp-" in n or ".fp32-" in n]:
        time.sleep(0.002)
    delay = rng.uniform(0, 0.9 * window)
    time.sleep(delay)
    finished_first = proc.poll() is not None
    if not finished_first:
        proc.send_signal(sig)
    rc = proc.wait()
    left = _beside(out)
    record: dict[str, Any] = {
        "kind": kind, "signal": signal.Signals(sig).name, "force": force,
        "delay_s": round(delay, 3), "exit": rc, "finished_before_signal": finished_first,
        "out": "valid" if _valid(out) else ("absent" if not out.exists() else "INVALID"),
        "left_behind": left,
    }  # fmt: skip
    ok = record["out"] == "valid" or (record["out"] == "absent" and not force)
    if sig == signal.SIGTERM:
        # 143: unwound and cleaned up; -15: the signal came during interpreter exit, after the
        # command had published OUT and restored the default handler (nothing left to clean)
        late = rc == -signal.SIGTERM and record["out"] == "valid"
        record["signal_during_exit"] = late
        ok = ok and not left and (rc in (0, 128 + signal.SIGTERM) or late)
    if sig == signal.SIGKILL:
        again, _ = _run(_command(kind, model, source, out, force=True))
        record["rerun_exit"] = again
        record["left_after_rerun"] = _beside(out)
        ok = ok and again == 0 and not record["left_after_rerun"] and _valid(out)
    record["ok"] = ok
    shutil.rmtree(folder, ignore_errors=True)
    return record


def run_trials(
    trials: int, model: list[str], work: Path, seed: int = 0, say=print
) -> dict[str, Any]:
    """`trials` kills alternating export/quantize, SIGKILL/SIGTERM, with/without --force."""
    rng = random.Random(seed)
    source = work / "source"
    rc, export_s = _run(_command("export", model, source, source, force=False))
    if rc != 0:
        raise SystemExit(f"the reference export failed (exit {rc})")
    probe = work / "probe"
    probe.mkdir()
    windows = {
        kind: _write_window(_command(kind, model, source, probe / kind, False), probe / kind)
        for kind in ("export", "quantize")
    }
    records = []
    for i in range(trials):
        kind = ("export", "quantize")[i % 2]
        sig = (signal.SIGKILL, signal.SIGTERM)[(i // 2) % 2]
        force = (i // 4) % 2 == 1
        record = trial(kind, sig, force, model, source, work, windows[kind], rng)
        records.append(record)
        say(f"trial {i + 1}/{trials}: {kind:<8} {record['signal']:<7} force={force!s:<5} "
            f"after {record['delay_s']:.2f}s: exit {record['exit']}, OUT {record['out']}, "
            f"left {record['left_behind'] or 'nothing'}"
            + (f", rerun exit {record['rerun_exit']}" if "rerun_exit" in record else "")
            + ("" if record["ok"] else "  <-- INVARIANT BROKEN"))  # fmt: skip
    killed = [
        r for r in records if not r["finished_before_signal"] and not r.get("signal_during_exit")
    ]
    return {
        "trials": trials,
        "seed": seed,
        "export_s": round(export_s, 2),
        "write_window_s": {k: round(v, 2) for k, v in windows.items()},
        "killed_while_writing": len(killed),
        "sigterm_during_interpreter_exit": sum(bool(r.get("signal_during_exit")) for r in records),
        "finished_before_the_signal": sum(r["finished_before_signal"] for r in records),
        "out_invalid": sum(r["out"] == "INVALID" for r in records),
        "out_absent_with_force": sum(r["out"] == "absent" and r["force"] for r in records),
        "sigkill_left_folders": sum(
            bool(r["left_behind"]) for r in killed if r["signal"] == "SIGKILL"
        ),
        "left_after_sigterm": sum(
            bool(r["left_behind"]) for r in records if r["signal"] == "SIGTERM"
        ),
        "left_after_rerun": sum(bool(r.get("left_after_rerun")) for r in records),
        "broken": sum(not r["ok"] for r in records),
        "records": records,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm", default=str(ROOT / "models/demo/lm"))
    parser.add_argument("--vision", default=str(ROOT / "models/demo/open_clip_model.safetensors"))
    parser.add_argument("--checkpoint", default=str(ROOT / "models/demo/checkpoint.safetensors"))
    parser.add_argument("--json", type=Path, default=None, help="Write the summary here.")
    args = parser.parse_args(argv)
    model = ["--lm", args.lm, "--vision", args.vision, "--checkpoint", args.checkpoint]
    work = Path(tempfile.mkdtemp(prefix="kill-trials-"))
    try:
        summary = run_trials(args.trials, model, work, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    brief = {k: v for k, v in summary.items() if k != "records"}
    print(json.dumps(brief, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["broken"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
