"""What a breaker pass found in `flamingo-export serve`, each at the layer it was born in:
work kept off the event loop, finite settings, a per-request decoded-pixel budget, file://
reads of regular files only, malformed input as a 400 (never a 500), sendable API keys, the
bound URL announced, and client messages free of server paths."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import weakref
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main
from runtime.images import ImageError
from runtime.pipeline import FlamingoPipeline
from serving import media
from serving.app import AppSettings, create_app
from serving.engine import Engine, EngineSettings, GenerateRequest, SamplingParams
from serving.media import MediaLimits, MediaReader
from serving.protocol import APIError, parse_json
from serving.server import http_url

from .conftest import ROOT, stop_server
from .test_layers import _asgi_get

NAN_INF = ("nan", "inf", "-inf")


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit all-black PNG: a few KB that decode to width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    head = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png(width: int = 8, height: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(out, "PNG")
    return out.getvalue()


def _refused(call, param: str) -> str:
    with pytest.raises(APIError) as e:
        call()
    assert e.value.status == 400 and e.value.param == param, e.value.message
    return e.value.message


# ---------------------------------------------------------------- media (findings 3, 4, 5, 8)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_request_is_refused_past_its_decoded_pixel_budget_before_decoding() -> None:
    bomb = bomb_png(13000, 13000)  # 169 Mpx, under Pillow's own refusal (2 x 89 Mpx)
    assert len(bomb) < 100_000
    url = "data:image/png;base64," + base64.b64encode(bomb).decode()
    message = _refused(lambda: MediaReader(MediaLimits()).load(url, "images[0]"), "images[0]")
    assert "13000x13000" in message and "megapixels" in message
    # the budget is per request: images that fit alone are refused together
    small = "data:image/png;base64," + base64.b64encode(png(100, 100)).decode()
    reader = MediaReader(MediaLimits(max_request_pixels=25_000))
    reader.load(small, "images[0]")
    reader.load(small, "images[1]")
    _refused(lambda: reader.load(small, "images[2]"), "images[2]")
    MediaReader(MediaLimits(max_request_pixels=25_000)).load(small, "images[2]")  # a new request


def _file(limits: MediaLimits, url: str) -> str:
    return _refused(lambda: MediaReader(limits).load(url, "images[0]"), "images[0]")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_file_urls_read_only_regular_files_within_the_limit(tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png())
    os.mkfifo(allowed / "pipe.png")
    with open(allowed / "big.png", "wb") as f:  # sparse: 1 GB that takes no disk
        f.truncate(1 << 30)
    secret = tmp_path / "secret-target"
    secret.mkdir()
    (secret / "x.png").write_bytes(png())
    (allowed / "link.png").symlink_to(secret / "x.png")
    limits = MediaLimits(allowed_dir=allowed, max_file_bytes=1 << 20)
    assert MediaReader(limits).load(f"file://{allowed}/ok.png", "images[0]").image.size == (8, 8)
    done: list[str] = []
    worker = threading.Thread(
        target=lambda: done.append(_file(limits, f"file://{allowed}/pipe.png")), daemon=True
    )
    worker.start()
    worker.join(10)
    assert done and "not a regular file" in done[0]  # answered, not blocked on the FIFO
    assert "more than the" in _file(limits, f"file://{allowed}/big.png")
    assert "NUL" in _file(limits, f"file://{allowed}/%00x.png")
    # messages name the URL as sent, never where it resolves to
    for url in (f"file://{allowed}/link.png", "file:///proc/self/exe"):
        message = _file(limits, url)
        assert url in message and "outside the allowed media folder" in message
        assert str(secret) not in message and sys.executable not in message
        assert os.path.realpath(sys.executable) not in message


def test_decoder_text_stays_in_the_log(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def leaky(data: bytes, name: str) -> Image.Image:
        try:
            raise OSError("gs -sOutputFile=/tmp/tmpab12/secret.png failed")
        except OSError as e:
            raise ImageError(f"{name}: cannot decode image ({e})") from e

    monkeypatch.setattr(media, "load_image", leaky)
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    message = _refused(lambda: MediaReader(MediaLimits()).load(url, "images[0]"), "images[0]")
    assert "/tmp/tmpab12" not in message and "gs " not in message
    assert "images[0]" in message
    assert "/tmp/tmpab12" in caplog.text


def test_malformed_json_is_a_400() -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}"):
        with pytest.raises(APIError) as e:
            parse_json(body)
        assert e.value.status == 400


# ---------------------------------------------------------------- engine (findings 1, 2, 3)


@pytest.fixture(scope="module")
def engine(demo_export: Path):
    engine = Engine(lambda: FlamingoPipeline(demo_export, threads=1))
    engine.load()
    yield engine
    engine.close()


def _events(engine: Engine, request: GenerateRequest) -> list[dict]:
    async def run() -> list[dict]:
        return [event async for event in engine.generate(request)]

    return asyncio.run(run())


def test_prompts_are_checked_before_and_tokenized_off_the_event_loop(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = GenerateRequest("a " * 4_000_000, [], SamplingParams(max_tokens=1))
    start = time.perf_counter()
    (event,) = _events(engine, huge)
    assert event["type"] == "error" and event["param"] == "prompt", event
    assert "characters" in event["message"] and time.perf_counter() - start < 5
    (event,) = _events(engine, GenerateRequest("\ud800<image>Output:", [b"x"]))
    assert event["status"] == 400 and event["param"] == "prompt" and "surrogate" in event["message"]

    negative = SamplingParams(max_tokens=1, temperature=1.0, seed=-5)
    (event,) = _events(engine, GenerateRequest("red", [], negative))
    assert event["status"] == 400 and event["param"] == "seed", event

    plan = engine.plan

    def slow_plan(request: GenerateRequest):
        time.sleep(1.0)
        return plan(request)

    monkeypatch.setattr(engine, "plan", slow_plan)

    async def both() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        request = GenerateRequest("red", [], SamplingParams(max_tokens=1))
        [event async for event in engine.generate(request)]
        task.cancel()
        return ticks

    assert asyncio.run(both()) >= 5  # the loop went on while the prompt was planned


def test_finished_jobs_are_not_kept_alive(engine: Engine, episodes) -> None:
    ep = episodes(0)
    image = Image.open(ep.image("query.png"))
    image.load()
    ref = weakref.ref(image)
    events = _events(engine, GenerateRequest("<image>Output:", [image], SamplingParams(2)))
    assert events[-1]["type"] == "usage"
    del image, events
    gc.collect()
    time.sleep(0.2)  # the batch thread is back waiting for a job
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 1e9])
def test_engine_settings_must_be_finite_and_in_range(value: float) -> None:
    with pytest.raises(ValueError, match="batch_wait_ms"):
        EngineSettings(batch_wait_ms=value)


def test_health_is_503_when_the_batch_thread_dies(demo_export: Path, monkeypatch) -> None:
    engine = Engine(lambda: FlamingoPipeline(demo_export, threads=1))

    def broken(last_rows: int):
        raise OverflowError("timeout value is too large")

    monkeypatch.setattr(engine, "_next_batch", broken)
    engine.load()
    engine._thread.join(10)
    app = create_app(engine, AppSettings(model_id="demo"))
    status, body = _asgi_get(app, "/health")
    assert status == 503 and "batch thread" in json.loads(body)["error"]
    engine.close()


# ---------------------------------------------------------------- CLI (findings 2, 6, 7)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        *[(["--batch-wait-ms", v], "--batch-wait-ms") for v in NAN_INF],
        *[(["--max-body-mb", v], "--max-body-mb") for v in (*NAN_INF, "0")],
        *[(["--max-request-megapixels", v], "--max-request-megapixels") for v in NAN_INF],
        (["--batch-wait-ms", "1e9"], "--batch-wait-ms"),
        (["--max-queue", "0"], "--max-queue"),
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
        (["--api-key", ""], "--api-key"),
        (["--api-key", "sécret"], "--api-key"),
        (["--api-key", "key "], "--api-key"),
        (["--api-key", " key"], "--api-key"),
    ],
)
def test_serve_refuses_options_that_cannot_work(demo_export: Path, args, option: str) -> None:
    out = CliRunner().invoke(main, ["serve", str(demo_export), *args])
    assert out.exit_code == 2 and option in out.output, out.output
    assert "Traceback" not in out.output


def test_serve_refuses_an_empty_api_key_from_the_environment(demo_export: Path) -> None:
    out = CliRunner(env={"FLAMINGO_API_KEY": ""}).invoke(main, ["serve", str(demo_export)])
    assert out.exit_code == 2 and "FLAMINGO_API_KEY" in out.output, out.output


def test_urls_bracket_ipv6_hosts() -> None:
    assert http_url("::1", 8000) == "http://[::1]:8000"
    assert http_url("127.0.0.1", 80) == "http://127.0.0.1:80"


def test_port_0_announces_the_port_bound(demo_export: Path) -> None:
    cmd = [sys.executable, "-m", "cli.main", "serve", str(demo_export), "--host", "127.0.0.1",
           "--port", "0", "--json", "--threads", "1", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    server = type("S", (), {"proc": proc})
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        info = json.loads(line)
        host_port = info["url"].removeprefix("http://").removesuffix("/v1")
        port = int(host_port.rsplit(":", 1)[1])
        assert host_port.startswith("127.0.0.1:") and port > 0
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        stop_server(server)  # type: ignore[arg-type]
