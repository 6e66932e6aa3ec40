"""serving/ is torch-free, never imports click and imports only `runtime` among our packages;
`flamingo-export serve` refuses what it cannot do before starting anything."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
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
    assert (
        batch.exit_code == 2 and "--max-batch-size" in batch.output and "[1, 1024]" in batch.output
    )


def test_serve_stops_with_the_error_when_the_export_cannot_load(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", str(tmp_path), "--port", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"cannot serve {tmp_path}" in result.stderr and "manifest" in result.stderr
    assert "Traceback" not in result.stderr


def _asgi_get(app: object, path: str) -> tuple[int, bytes]:
    """One GET through the ASGI app, without a server."""
    import asyncio

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [], "scheme": "http", "server": ("127.0.0.1", 1), "client": None,
             "root_path": ""}  # fmt: skip
    asyncio.run(app(scope, receive, send))  # type: ignore[operator]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


def test_health_is_503_until_the_engine_is_loaded(demo_export: Path) -> None:
    import json

    from runtime.manifest import ManifestError
    from runtime.pipeline import FlamingoPipeline
    from serving.app import AppSettings, create_app
    from serving.engine import Engine

    engine = Engine(lambda: FlamingoPipeline(demo_export, threads=1))
    app = create_app(engine, AppSettings(model_id="demo"))
    status, body = _asgi_get(app, "/health")
    assert status == 503 and json.loads(body)["status"] == "loading"
    engine.load()
    try:
        status, body = _asgi_get(app, "/health")
        assert status == 200 and json.loads(body) == {"status": "ok", "model": "demo"}
        status, body = _asgi_get(app, "/v1/nothing")
        assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    finally:
        engine.close()
    failing = Engine(lambda: FlamingoPipeline(demo_export / "missing"))
    with pytest.raises(ManifestError):
        failing.load()
    status, body = _asgi_get(create_app(failing, AppSettings(model_id="x")), "/health")
    assert status == 503 and "missing" in json.loads(body)["error"]
