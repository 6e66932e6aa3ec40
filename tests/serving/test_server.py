"""`flamingo-export serve` as a real process on 127.0.0.1, called with the official `openai`
client: the same answers as `flamingo-export run`, streaming, prefix-cache hits, concurrency,
every bad input with its status (and the server still answering), a client that goes away."""

from __future__ import annotations

import http.client as http_client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from cli.main import main

from .conftest import QUESTION, chat_messages, data_url, http, image_part

KEY = "test-key"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, episodes) -> Path:
    folder = tmp_path_factory.mktemp("media")
    (folder / "query.png").write_bytes((episodes(0).folder / "query.png").read_bytes())
    return folder


@pytest.fixture(scope="module")
def server(server_factory, demo_export: Path, media: Path):
    return server_factory(
        demo_export, "--api-key", KEY, "--allowed-media-dir", str(media), "--max-body-mb", "1",
        "--threads", "1",
    )  # fmt: skip


def run_json(export: Path, ep, vqa: bool = False) -> dict:
    """`flamingo-export run --demos ... --json` on the same episode."""
    demos = ep.folder / "demos.jsonl"
    extra: list[str] = []
    if vqa:
        demos = ep.folder / "demos_vqa.jsonl"
        lines = [json.dumps({"image": d["image"], "question": QUESTION, "answer": d["caption"]})
                 for d in ep.demos]  # fmt: skip
        demos.write_text("\n".join(lines) + "\n")
        extra = ["--task", "vqa", "--question", QUESTION]
    result = CliRunner().invoke(
        main, ["run", str(export), "--demos", str(demos), "--image",
               str(ep.folder / "query.png"), "--json", *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("vqa", [False, True], ids=["caption", "vqa"])
def test_four_shot_chat_answers_like_run(server, demo_export: Path, episodes, vqa: bool) -> None:
    ep = episodes(0)
    expected = run_json(demo_export, ep, vqa)
    reply = server.client().chat.completions.create(
        model="anything", messages=chat_messages(ep, vqa=vqa)
    )
    assert reply.choices[0].message.content == expected["text"]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == expected["stats"]["prompt_tokens"]  # the same prompt
    assert reply.usage.completion_tokens == len(expected["token_ids"])
    if not vqa:
        assert expected["text"] == ep.answer  # the demo model reads this episode right
    assert reply.model == demo_export.name


def test_stream_equals_non_stream_and_cache_hits(server, episodes) -> None:
    client = server.client()
    ep = episodes(2)
    first = client.chat.completions.create(model="m", messages=chat_messages(ep), max_tokens=8)
    again = client.chat.completions.create(
        model="m", messages=chat_messages(ep, query=ep.demos[0]["image"]), max_tokens=8
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # same demonstrations
    chunks = list(client.chat.completions.create(
        model="m", messages=chat_messages(ep), max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        first.usage.completion_tokens
    )
    plain = list(client.chat.completions.create(
        model="m", messages=chat_messages(ep), max_tokens=8, stream=True
    ))  # fmt: skip
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)
    raw = http(server, "POST", "/v1/chat/completions",
               {"model": "m", "messages": chat_messages(ep), "stream": True})  # fmt: skip
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_completions_n_stop_and_models(server, episodes) -> None:
    client = server.client()
    ep = episodes(0)
    prompt = "".join(f"<image>Output:{d['caption']}<|endofchunk|>\n" for d in ep.demos)
    prompt += "<image>Output:"
    images = [data_url(ep.image(d["image"])) for d in ep.demos] + [data_url(ep.image("query.png"))]
    reply = client.completions.create(
        model="m", prompt=prompt, max_tokens=8, n=2, extra_body={"images": images}
    )
    assert [c.text for c in reply.choices] == [ep.answer] * 2  # greedy: n equal choices
    cut = client.completions.create(
        model="m", prompt=prompt, max_tokens=8, stop=[ep.answer[1:]],
        extra_body={"images": images},
    )  # fmt: skip
    assert cut.choices[0].text == ep.answer[:1] and cut.choices[0].finish_reason == "stop"
    long = client.completions.create(
        model="m", prompt=prompt, max_tokens=5, extra_body={"images": images, "ignore_eos": True}
    )
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 5
    beams = client.chat.completions.create(
        model="m", messages=chat_messages(ep), n=2, extra_body={"num_beams": 3}
    )
    assert len(beams.choices) == 2 and beams.choices[0].message.content == ep.answer
    assert [m.id for m in client.models.list()] == [reply.model]  # the export folder's name


def test_sixteen_concurrent_clients(server, demo_export: Path, episodes) -> None:
    from runtime.pipeline import FlamingoPipeline
    from runtime.prompts import build_few_shot_prompt, load_demos_jsonl

    pipe = FlamingoPipeline(demo_export, threads=1)
    jobs = [(episodes(i % 4), f"demo_{i // 4}.png" if i >= 4 else "query.png") for i in range(16)]
    expected = []
    for ep, query in jobs:  # the pipeline alone, in this process
        demos = load_demos_jsonl(ep.folder / "demos.jsonl")
        prompt, images = build_few_shot_prompt(demos, query_image=str(ep.image(query)))
        expected.append(pipe.generate(prompt, images).text)
    client = server.client()
    barrier = threading.Barrier(len(jobs))

    def ask(job: tuple) -> str:
        ep, query = job
        messages = chat_messages(ep, query=query)
        barrier.wait()
        reply = client.chat.completions.create(model="m", messages=messages)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == expected


def _post(server, body: object, key: str | None = KEY, raw: bytes | None = None):
    return http(server, "POST", "/v1/chat/completions", body, raw=raw, key=key)


def test_bad_inputs_get_their_status_and_the_server_goes_on(server, episodes, media) -> None:
    ep = episodes(0)
    good = {"model": "m", "messages": chat_messages(ep)}
    query = image_part(ep.image("query.png"))

    def user(*parts: dict) -> dict:
        return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}

    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
    outside = {"type": "image_url", "image_url": {"url": f"file://{ep.image('query.png')}"}}
    remote = {"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}}
    cases = [  # (body or raw bytes, status, param)
        (b'{"model": "m", "messages": [', 400, None),
        ({**good, "max_tokens": "eight"}, 400, "max_tokens"),
        ({**good, "messages": "hello"}, 400, "messages"),
        (user(broken), 400, "messages[0].content[0].image_url.url"),
        (user(outside), 400, "messages[0].content[0].image_url.url"),
        (user(remote), 400, "messages[0].content[0].image_url.url"),
        ({**good, "max_tokens": 5000}, 400, "max_tokens"),
        ({**good, "tools": [{"type": "function"}]}, 400, "tools"),
        ({**good, "messages": [{"role": "user", "content": [query] * 2}]}, 400,
         "messages[0].content[1]"),
    ]  # fmt: skip
    for body, status, param in cases:
        raw = body if isinstance(body, bytes) else None
        r = _post(server, body, raw=raw)
        assert r.status == status, (body if raw is None else raw, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"], r.text
        assert error["type"] == "invalid_request_error"
    # too many images and an over-long prompt (the export: 32 images, 512 tokens)
    tiny = data_url(ep.image("query.png"))
    for body, param in (
        ({"model": "m", "prompt": "<image>" * 33, "images": [tiny] * 33}, "images"),
        ({"model": "m", "prompt": "red " * 2100}, "prompt"),
    ):
        r = http(server, "POST", "/v1/completions", body)
        assert r.status == 400 and r.json()["error"]["param"] == param, r.text
    big = _post(server, {**good, "pad": "x" * (1 << 20)})
    assert big.status == 413 and "error" in big.json()
    for key in (None, "wrong"):
        r = _post(server, good, key=key)
        assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    inside = {"type": "image_url", "image_url": {"url": f"file://{media / 'query.png'}"}}
    allowed = chat_messages(ep)
    allowed[-1]["content"] = [inside]
    r = _post(server, {"model": "m", "messages": allowed})
    assert r.status == 200, r.text
    reply = server.client().chat.completions.create(model="m", messages=chat_messages(ep))
    assert reply.choices[0].message.content == r.json()["choices"][0]["message"]["content"]
    metrics = http(server, "GET", "/metrics").text
    assert 'flamingo_request_errors_total{code="400"}' in metrics
    assert 'flamingo_request_errors_total{code="413"}' in metrics
    assert http(server, "GET", "/health").json()["status"] == "ok"


def _metric(server, name: str) -> float:
    for line in http(server, "GET", "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_and_a_client_that_goes_away(server, demo_export: Path, episodes) -> None:
    ep = episodes(0)
    before = _metric(server, "flamingo_engine_generated_tokens_total")
    cancelled = _metric(server, "flamingo_engine_cancelled_jobs_total")
    # as many tokens as the export's context leaves after the prompt
    context = json.loads((demo_export / "manifest.json").read_text())["limits"]["max_seq_len"]
    probe = {"model": "m", "messages": chat_messages(ep), "max_tokens": 1}
    most = context - _post(server, probe).json()["usage"]["prompt_tokens"]
    body = {"model": "m", "messages": chat_messages(ep), "stream": True, "max_tokens": most,
            "ignore_eos": True}  # fmt: skip
    conn = http_client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    r = conn.getresponse()
    assert r.status == 200
    got = [r.readline() for _ in range(6)]
    assert any(line.startswith(b"data: ") for line in got)
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    # the connection is closed: the row must stop long before its `most` tokens
    deadline = time.monotonic() + 30
    while _metric(server, "flamingo_engine_cancelled_jobs_total") == cancelled:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.1)
    generated = _metric(server, "flamingo_engine_generated_tokens_total") - before
    assert 1 <= generated < most
    text = http(server, "GET", "/metrics").text
    for name in ("flamingo_requests_total", "flamingo_prompt_tokens_total",
                 "flamingo_generated_tokens_total", "flamingo_queue_depth",
                 "flamingo_prefix_cache_hit_rate", "flamingo_request_latency_seconds_bucket",
                 "flamingo_time_to_first_token_seconds_bucket"):  # fmt: skip
        assert name in text, name


@pytest.mark.slow
def test_full_queue_answers_429(server_factory, demo_export: Path, episodes) -> None:
    tight = server_factory(demo_export, "--max-queue", "1", "--max-batch-size", "1",
                           "--threads", "1")  # fmt: skip
    ep = episodes(0)
    body = {"model": "m", "messages": chat_messages(ep), "max_tokens": 300, "ignore_eos": True}

    def post(_: int) -> int:
        return http(tight, "POST", "/v1/chat/completions", body).status

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(post, range(6)))
    assert 429 in codes and 200 in codes, codes
    r = http(tight, "POST", "/v1/chat/completions", {**body, "max_tokens": 4})
    assert r.status == 200, r.text


def test_malformed_input_is_a_400_naming_the_field_never_a_500(server, media) -> None:
    """Input that used to raise inside the server (RecursionError, ValueError, TypeError) and
    file URLs that would leak server paths."""
    deep = b"[" * 100_000 + b"]" * 100_000
    huge_int = b'{"model": "m", "prompt": "x", "seed": ' + b"9" * 5000 + b"}"
    for raw in (deep, huge_int):
        r = http(server, "POST", "/v1/completions", raw=raw)
        assert r.status == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    surrogate = b'{"model": "m", "prompt": "\\ud800<image>Output:", "images": ["%s"]}'
    r = http(
        server, "POST", "/v1/completions", raw=surrogate % data_url(media / "query.png").encode()
    )
    assert r.status == 400 and r.json()["error"]["param"] == "prompt", r.text
    for url in (f"file://{media}/%00x.png", "file:///proc/self/exe", "file://[/x"):
        body = {"model": "m", "prompt": "<image>Output:", "images": [url]}
        r = http(server, "POST", "/v1/completions", body)
        assert r.status == 400 and r.json()["error"]["param"] == "images[0]", r.text
        assert "/root" not in r.text and "python" not in r.text, r.text
    assert http(server, "GET", "/health").status == 200
    assert "Traceback" not in server.output()
