"""Tests for runtime/prompts.py: OpenFlamingo templates, few-shot building, JSONL demos."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from runtime.prompts import (
    EOC_TOKEN,
    MEDIA_TOKEN,
    Demonstration,
    build_few_shot_prompt,
    caption_prompt,
    check_images_match,
    check_text,
    count_media,
    load_demos_jsonl,
    vqa_prompt,
)


def test_tokens_and_templates() -> None:
    assert MEDIA_TOKEN == "<image>"
    assert EOC_TOKEN == "<|endofchunk|>"
    assert caption_prompt("A dog.") == "<image>Output:A dog.<|endofchunk|>"
    assert caption_prompt() == "<image>Output:"
    assert vqa_prompt("What?", "cat") == "<image>Question:What? Short answer:cat<|endofchunk|>"
    assert vqa_prompt("What?") == "<image>Question:What? Short answer:"


def test_caption_few_shot() -> None:
    demos = [Demonstration("a.jpg", text=" A dog. "), Demonstration("b.jpg", text="A cat.")]
    prompt, images = build_few_shot_prompt(demos, task="caption")
    assert prompt == (
        "<image>Output:A dog.<|endofchunk|>\n<image>Output:A cat.<|endofchunk|>\n<image>Output:"
    )
    assert images == ["a.jpg", "b.jpg"]
    assert count_media(prompt) == len(images) + 1  # caller appends the query image
    prompt2, images2 = build_few_shot_prompt(demos, query_image="q.jpg", demo_separator="")
    assert prompt2 == prompt.replace("\n", "")
    assert images2 == ["a.jpg", "b.jpg", "q.jpg"]
    check_images_match(prompt2, len(images2))


def test_vqa_few_shot() -> None:
    demos = [Demonstration(1, question="Color?", answer="red")]
    prompt, images = build_few_shot_prompt(demos, "How many?", task="vqa", query_image=2)
    assert prompt == (
        "<image>Question:Color? Short answer:red<|endofchunk|>\n"
        "<image>Question:How many? Short answer:"
    )
    assert images == [1, 2]


def test_zero_shot_and_text_only_demos() -> None:
    prompt, images = build_few_shot_prompt([], task="caption")
    assert (prompt, images) == ("<image>Output:", [])
    demos = [Demonstration(None, question="Q1", answer="A1"), Demonstration("x", "", "Q2", "A2")]
    prompt, images = build_few_shot_prompt(demos, "Q3", task="vqa")
    assert prompt.startswith("Question:Q1 Short answer:A1<|endofchunk|>\n<image>Question:Q2")
    assert images == ["x"] and count_media(prompt) == 2


def test_raw_task() -> None:
    demos = [Demonstration("i", text="A photo of a cat")]
    prompt, images = build_few_shot_prompt(demos, "A photo of a", task="raw", query_image="j")
    assert prompt == "<image>A photo of a cat<|endofchunk|>\n<image>A photo of a"
    assert images == ["i", "j"]


def test_build_errors() -> None:
    with pytest.raises(ValueError, match="task"):
        build_few_shot_prompt([], task="classify")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query_question"):
        build_few_shot_prompt([], task="vqa")
    with pytest.raises(ValueError, match="query_question"):
        build_few_shot_prompt([], "why?", task="caption")
    with pytest.raises(ValueError, match=r"demonstration #1: .*question and answer"):
        build_few_shot_prompt(
            [Demonstration("a", question="q", answer="a"), Demonstration("b", question="q")],
            "q",
            task="vqa",
        )
    with pytest.raises(ValueError, match=r"demonstration #0: .*caption"):
        build_few_shot_prompt([Demonstration("a")], task="caption")
    with pytest.raises(ValueError, match="must not contain"):
        build_few_shot_prompt([Demonstration("a", text="<image>x")], task="caption")
    with pytest.raises(ValueError, match="must not contain"):
        build_few_shot_prompt([], "<image>?", task="vqa")


@pytest.mark.parametrize(
    ("demo", "task", "pattern"),
    [
        (Demonstration("a", text="red<|endofchunk|>Output:green"), "caption", "text"),
        (Demonstration("a", question="q<|endofchunk|>", answer="a"), "vqa", "question"),
        (Demonstration("a", question="q", answer="<|endofchunk|>a"), "vqa", "answer"),
        (Demonstration(None, text="x<|endofchunk|>"), "raw", "text"),
        (Demonstration("a", text="<image>"), "raw", "text"),
        # IDEFICS' markers (breaker pass 2: a caption with one changed the prompt's structure)
        (Demonstration("a", text="a<end_of_utterance>b"), "caption", "text"),
        (Demonstration("a", text="a<fake_token_around_image>"), "caption", "text"),
        (Demonstration("a", question="q<end_of_utterance>", answer="a"), "vqa", "question"),
    ],
)
def test_template_markers_are_refused_in_demonstration_text(
    demo: Demonstration, task: str, pattern: str
) -> None:
    """One record must stay one chunk of the template: a marker inside its text would be
    tokenized as the special token (an extra chunk, an extra image)."""
    question = "q" if task == "vqa" else None
    with pytest.raises(ValueError, match=rf"demonstration #1: {pattern} must not contain '<"):
        build_few_shot_prompt([Demonstration("a", "ok", "q", "a"), demo], question, task=task)


def test_question_text_is_checked_like_demonstrations() -> None:
    for task in ("vqa", "raw"):
        with pytest.raises(
            ValueError, match=re.escape("query_question must not contain '<|endofchunk|>'")
        ):
            build_few_shot_prompt([], "why<|endofchunk|>", task=task)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"query_question is not valid UTF-8 text: character 3"):
        build_few_shot_prompt([], "why\udcff?", task="vqa")
    with pytest.raises(ValueError, match="query_question must be a string, got int"):
        build_few_shot_prompt([], 3, task="vqa")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("a\ud800b", r"text is not valid UTF-8 text: character 1 \('\\ud800'\) is a lone"),
        ("\udcff<x", "text is not valid UTF-8"),
        (42, "text must be a string, got int"),
        (b"bytes", "text must be a string, got bytes"),
    ],
)
def test_demonstration_text_must_be_valid_unicode(text: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=rf"demonstration #0: {pattern}"):
        build_few_shot_prompt([Demonstration("a", text=text)])  # type: ignore[arg-type]


def test_check_text() -> None:
    assert check_text("<image>a<|endofchunk|>", "prompt") == "<image>a<|endofchunk|>"
    assert check_text("naïve 日本 🙂", "x", markers=False) == "naïve 日本 🙂"
    with pytest.raises(ValueError, match=r"^--prompt is not valid UTF-8 text: character 0"):
        check_text("\udcff<image>Output:", "--prompt")


def test_count_and_check() -> None:
    assert count_media("no images") == 0
    assert count_media("<image>a<image>b<image>") == 3
    check_images_match("<image>x<image>", 2)
    with pytest.raises(ValueError) as e:
        check_images_match("<image>a<image>b<image>", 2)
    assert str(e.value) == "prompt has 3 <image> markers but 2 images were given"
    with pytest.raises(ValueError, match="prompt has 1 <image> marker but 0 images were given"):
        check_images_match("<image>", 0)
    with pytest.raises(ValueError, match="prompt has 0 <image> markers but 1 image was given"):
        check_images_match("text", 1)


def _write_jsonl(path: Path, rows: list) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_load_demos_jsonl(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    elsewhere = tmp_path / "abs.png"
    elsewhere.write_bytes(b"x")
    sub = tmp_path / "demos"
    sub.mkdir()
    (sub / "local.jpg").write_bytes(b"x")
    jsonl = sub / "demos.jsonl"
    _write_jsonl(
        jsonl,
        [
            {"image": "local.jpg", "caption": "A dog."},
            "",
            {"image": "../imgs/a.jpg", "question": "Color?", "answer": "red"},
            {"image": str(elsewhere), "question": "Q", "answers": ["first", "second"]},
        ],
    )
    demos = load_demos_jsonl(jsonl)
    assert [Path(d.image).resolve() for d in demos] == [
        (sub / "local.jpg").resolve(),
        (tmp_path / "imgs" / "a.jpg").resolve(),
        elsewhere.resolve(),
    ]
    assert demos[0].text == "A dog." and demos[0].question is None
    assert (demos[1].question, demos[1].answer) == ("Color?", "red")
    assert demos[2].answer == "first"
    prompt, images = build_few_shot_prompt(demos[1:], "Size?", task="vqa")
    assert count_media(prompt) == 3 and len(images) == 2


@pytest.mark.parametrize(
    ("bad_line", "pattern"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"caption": "no image"}), "'image'"),
        (json.dumps({"image": "ok.jpg"}), "caption"),
        (json.dumps({"image": "ok.jpg", "question": "q"}), "caption"),
        (json.dumps({"image": "ok.jpg", "caption": 3}), "'caption' must be a string"),
        (json.dumps({"image": "ok.jpg", "question": "q", "answers": []}), "answers"),
        (json.dumps({"image": "missing.jpg", "caption": "c"}), "not found"),
        ('{"image": "ok.jpg", "caption": "\\ud800"}', "'caption' is not valid UTF-8 text"),
        ('{"image": "ok\\udcff.jpg", "caption": "c"}', "'image' is not valid UTF-8 text"),
        (json.dumps({"image": "ok.jpg", "caption": "a<|endofchunk|>b"}), "must not contain"),
        (json.dumps({"image": "ok.jpg", "question": "<image>?", "answer": "a"}), "'question'"),
        (json.dumps({"image": "ok.jpg", "question": "q", "answers": ["\ud800"]}), "answers"),
    ],
)
def test_load_demos_jsonl_errors(tmp_path: Path, bad_line: str, pattern: str) -> None:
    (tmp_path / "ok.jpg").write_bytes(b"x")
    jsonl = tmp_path / "d.jsonl"
    _write_jsonl(jsonl, [{"image": "ok.jpg", "caption": "fine"}, "", bad_line])
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: .*{pattern}"):
        load_demos_jsonl(jsonl)


def test_load_demos_jsonl_missing_file_and_no_check(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nope\.jsonl"):
        load_demos_jsonl(tmp_path / "nope.jsonl")
    jsonl = tmp_path / "d.jsonl"
    _write_jsonl(jsonl, [{"image": "later.jpg", "caption": "c"}])
    assert load_demos_jsonl(jsonl, check_exists=False)[0].image == str(tmp_path / "later.jpg")


def test_demonstrations_file_faults_are_one_line(tmp_path) -> None:
    """A FIFO (used to block `run --demos` forever), nesting too deep for the parser and an
    integer past Python's digit limit are ValueErrors naming the file (and line)."""
    import os

    from runtime.prompts import load_demos_jsonl

    fifo = tmp_path / "demos.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"demos\.jsonl: cannot read .*is a FIFO"):
        load_demos_jsonl(fifo)
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl:1: invalid JSON \(nested too deeply"):
        load_demos_jsonl(deep)
    big = tmp_path / "big.jsonl"
    big.write_text('{"image": "a.png", "caption": "x", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(ValueError, match=r"big\.jsonl:1: invalid JSON"):
        load_demos_jsonl(big)


def test_template_markers_cover_the_idefics_format() -> None:
    from runtime.idefics import IdeficsPromptFormat
    from runtime.prompts import TEMPLATE_MARKERS

    fmt = IdeficsPromptFormat("<s>", end_of_utterance_token="<end_of_utterance>")
    assert {fmt.image_token, fmt.fake_image_token, fmt.end_of_utterance_token} <= set(
        TEMPLATE_MARKERS
    )
