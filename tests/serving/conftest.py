"""Fixtures of the serving tests: episodes as files, real server processes (the demo export is
tests/conftest.py's `demo_export`).

Servers are `flamingo-export serve` subprocesses bound to 127.0.0.1 on a free port, stopped by
their PID (SIGINT, then SIGKILL of that PID if it hangs).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Episode:
    """A held-out demo episode written as files (`python -m demo.task DIR --index i`)."""

    folder: Path
    demos: list[dict]  # the demos.jsonl records
    answer: str

    def image(self, name: str) -> Path:
        return self.folder / name


@pytest.fixture(scope="session")
def episodes(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Episode]:
    from demo.task import main as write_task

    root = tmp_path_factory.mktemp("episodes")
    cache: dict[int, Episode] = {}

    def get(index: int) -> Episode:
        if index not in cache:
            folder = root / f"ep{index}"
            write_task([str(folder), "--shots", "4", "--index", str(index)])
            lines = (folder / "demos.jsonl").read_text().splitlines()
            meta = json.loads((folder / "episode.json").read_text())
            cache[index] = Episode(folder, [json.loads(x) for x in lines], meta["answer"])
        return cache[index]

    return get


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


QUESTION = "What is shown?"  # the VQA form of an episode asks this of every image


def chat_messages(ep: Episode, query: str = "query.png", vqa: bool = False) -> list[dict]:
    """The episode as a chat: (user: image [+ question], assistant: answer) x k, then the query.
    VQA form: every user turn also asks QUESTION (the answer is still the caption)."""
    messages: list[dict] = []
    turns = [(d["image"], d["caption"]) for d in ep.demos] + [(query, None)]
    for name, answer in turns:
        content = [image_part(ep.image(name))]
        if vqa:
            content.append({"type": "text", "text": QUESTION})
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    api_key: str | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw: object):  # the official openai client
        from openai import OpenAI

        options = {"base_url": self.base + "/v1", "api_key": self.api_key or "unused",
                   "max_retries": 0, **kw}  # fmt: skip
        return OpenAI(**options)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(export: Path, log: Path, *args: str, timeout: float = 120.0) -> Server:
    """`flamingo-export serve EXPORT --port P ARGS`, waited for until /health answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "cli.main", "serve", str(export), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *args]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    key = args[args.index("--api-key") + 1] if "--api-key" in args else None
    server = Server(proc, port, log, key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.output()}")
        try:
            with urllib.request.urlopen(server.base + "/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise AssertionError(f"server not healthy after {timeout} s:\n{server.output()}")


def stop_server(server: Server, timeout: float = 60.0) -> None:
    """SIGINT to the server's PID (a clean shutdown: Ray through its API), SIGKILL if stuck."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def make(export: Path, *args: str, timeout: float = 120.0) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = start_server(export, log, *args, timeout=timeout)
        started.append(server)
        return server

    yield make
    for server in started:
        stop_server(server)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> object:
        return json.loads(self.text)


def http(
    server: Server,
    method: str,
    path: str,
    body: object = None,
    raw: bytes | None = None,
    key: str | None = "server",
    timeout: float = 120,
) -> Reply:
    """One request with the standard library (status, headers, body); `key="server"` sends the
    server's API key, None none."""
    import http.client

    headers = {"Content-Type": "application/json"}
    key = server.api_key if key == "server" else key
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
    finally:
        conn.close()
