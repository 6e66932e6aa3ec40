"""Chat -> few-shot prompt: the same prompt `run --demos` builds, refusals that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.prompts import build_few_shot_prompt, load_demos_jsonl
from serving.chat import affinity_key, chat_to_prompt
from serving.protocol import APIError

from .conftest import QUESTION, chat_messages, data_url


def _resolve(url: object, param: str) -> bytes:
    return str(url).encode()  # the URL stands for the image's bytes


def _expected(ep, vqa: bool) -> tuple[str, list[bytes]]:
    """What `flamingo-export run --demos demos.jsonl --image query.png [--task vqa]` builds."""
    demos = load_demos_jsonl(ep.folder / "demos.jsonl")
    for d in demos:
        d.image = _url_bytes(d.image)
        if vqa:
            d.question, d.answer = QUESTION, d.text
    question = QUESTION if vqa else None
    task = "vqa" if vqa else "caption"
    query = _url_bytes(ep.folder / "query.png")
    return build_few_shot_prompt(demos, question, task, query_image=query)


def _url_bytes(path: object) -> bytes:
    return data_url(Path(str(path))).encode()


@pytest.mark.parametrize("vqa", [False, True], ids=["caption", "vqa"])
def test_chat_builds_the_run_demos_prompt(episodes, vqa: bool) -> None:
    ep = episodes(0)
    prompt, images = chat_to_prompt(chat_messages(ep, vqa=vqa), _resolve)
    assert (prompt, images) == _expected(ep, vqa)
    template = "<image>Question:" if vqa else "<image>Output:"
    assert prompt.count(template) == 5 and prompt.count("<|endofchunk|>") == 4


def test_string_content_and_text_parts() -> None:
    img = {"type": "image_url", "image_url": {"url": "A"}}
    messages = [
        {"role": "user", "content": [img, {"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": "shape?"},  # a text-only demonstration: no marker
        {"role": "assistant", "content": "circle"},
        {"role": "user", "content": [{"type": "text", "text": "size?"}, img]},
    ]
    prompt, images = chat_to_prompt(messages, _resolve)
    assert prompt == (
        "<image>Question:colour? Short answer:red<|endofchunk|>\n"
        "Question:shape? Short answer:circle<|endofchunk|>\n"
        "<image>Question:size? Short answer:"
    )
    assert images == [b"A", b"A"]


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        ([{"role": "system", "content": "be brief"}], "messages[0].role", "system"),
        ([{"role": "assistant", "content": "x"}], "messages[0].role", "must be 'user'"),
        ([{"role": "user", "content": "no image"}], "messages[0].content", "needs an image"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "A"}}] * 2}],
         "messages[0].content[1]", "one image per user turn"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0]", "type"),
        ([{"role": "user", "content": 3}], "messages[0].content", "string or a list"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "A"}}]},
          {"role": "assistant", "content": "red"}], "messages[1]", "last message"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "A"}}]},
          {"role": "assistant", "content": "red"},
          {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "A"}},
                                       {"type": "text", "text": "q"}]}],
         "messages[0].content", "mixes"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "A"}},
                                       {"type": "text", "text": "<image>"}]}],
         "messages", "must not contain"),
        (["hello"], "messages[0]", "object"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(messages: list, param: str, words: str) -> None:
    with pytest.raises(APIError) as e:
        chat_to_prompt(messages, _resolve)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_affinity_key_is_the_demonstrations() -> None:
    demos = "<image>Output:red<|endofchunk|>\n<image>Output:blue<|endofchunk|>\n"
    a = affinity_key(demos + "<image>Output:", [b"1", b"2", b"q1"])
    assert a == affinity_key(demos + "<image>Output:", [b"1", b"2", b"q2"])  # other query
    assert a != affinity_key(demos + "<image>Output:", [b"1", b"3", b"q1"])  # other demo image
    assert a != affinity_key(demos.replace("red", "green") + "<image>Output:", [b"1", b"2", b"q"])
    assert affinity_key("<image>Output:", [b"q"]) == ""  # no demonstrations: any replica
