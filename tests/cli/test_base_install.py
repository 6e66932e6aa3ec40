"""With only the base install (no torch, transformers, safetensors or onnx), every command
that needs an extra ends in one line saying which one to install: never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "onnx_ir", "einops")


def _run_base_only(*args: str, blocked: tuple[str, ...] = BLOCKED):
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "from cli.main import main\n"
        "sys.exit(main())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("inspect", "export"),
        ("export", "export"),
        ("quantize", "export"),
        ("sensitivity", "export"),
        ("parity-torch", "export"),
        ("bench-reference", "export"),
        ("check", "check"),
    ],
)
def test_commands_name_the_extra_to_install(tiny_paths, tiny_export, tmp_path, command, extra):
    p = tiny_paths("mpt")
    export = str(tiny_export("mpt"))
    model = ["--lm", str(p.lm_dir), "--vision", str(p.vision_path),
             "--checkpoint", str(p.checkpoint_path)]  # fmt: skip
    args = {
        "inspect": ["inspect", *model],
        "export": ["export", *model, "-o", str(tmp_path / "o")],
        "quantize": ["quantize", export, "--precision", "fp16", "-o", str(tmp_path / "q")],
        "sensitivity": ["sensitivity", export, "--precision", "int8"],
        "parity-torch": ["parity", export, *model],
        "bench-reference": ["bench", export, *model],
        "check": ["check", export],
    }[command]
    result = _run_base_only(*args)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: `flamingo-export ")
    assert f"needs the '{extra}' extra" in line
    assert f"pip install 'flamingo-export[{extra}]'" in line
    assert list(tmp_path.iterdir()) == []


def test_base_install_still_runs_and_checks_with_only_onnx(tiny_export) -> None:
    """`run` needs nothing but the base install; `check` runs with onnx alone."""
    export = str(tiny_export("mpt"))
    ran = _run_base_only("run", export, "--prompt", "A red", "--max-new-tokens", "2")
    assert ran.returncode == 0, ran.stderr
    result = _run_base_only("check", export, blocked=("torch", "transformers", "safetensors"))
    assert result.returncode == 0, result.stderr
