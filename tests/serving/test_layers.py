"""serving/ is torch-free, never imports click and imports only `runtime` among our packages;
`flamingo-export serve` refuses what it cannot do before starting anything."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from cli.main import main

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
OURS = ("flamingo", "exporter", "precision", "trt", "bench", "cli", "demo", "fixtures")


def test_serving_imports_no_torch_and_only_runtime() -> None:
    code = f"""
import sys
for name in ("torch", "transformers"):
    sys.modules[name] = None
import serving.app, serving.chat, serving.engine, serving.media, serving.metrics
import serving.protocol, serving.server, serving.ray_deploy
loaded = {{m.split(".")[0] for m, v in sys.modules.items() if v is not None}}
bad = sorted(loaded & {set(OURS) | {"torch", "transformers", "ray"}!r})
assert not bad, bad
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_serving_never_imports_click() -> None:
    """click belongs to cli/ (uvicorn's own command line imports it; serving's code does not)."""
    for path in sorted((ROOT / "serving").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] == "click"], path


def test_serve_refuses_missing_tensorrt_and_bad_options(demo_export: Path) -> None:
    runner = CliRunner()
    export = str(demo_export)
    if importlib.util.find_spec("tensorrt") is None:
        out = runner.invoke(main, ["serve", export, "--engine", "tensorrt"])
        assert out.exit_code == 1 and "needs 'tensorrt'" in out.output
        assert "pip install" in out.output and "Traceback" not in out.output
    replicas = runner.invoke(main, ["serve", export, "--replicas", "2"])
    assert replicas.exit_code == 2 and "--replicas and --ray-address need --ray" in replicas.output
    batch = runner.invoke(main, ["serve", export, "--max-batch-size", "0"])
    assert batch.exit_code == 2 and "max_batch_size must be >= 1" in batch.output


def test_serve_stops_with_the_error_when_the_export_cannot_load(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", str(tmp_path), "--port", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"cannot serve {tmp_path}" in result.stderr and "manifest" in result.stderr
    assert "Traceback" not in result.stderr
