"""`flamingo-export serve` on a tiny IDEFICS export: chat turns become the few-shot prompt in
the export's own format (runtime.idefics: -instruct demonstrations end with
<end_of_utterance>, no <|endofchunk|> text), the same answer and prompt as `run --demos`
(which tests/runtime/test_idefics.py holds to IdeficsProcessor + transformers' generate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main

from .conftest import chat_messages, data_url


def run_json(export: Path, *args: str) -> dict:
    result = CliRunner().invoke(main, ["run", str(export), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_chat_and_completions_on_idefics(server_factory, idefics_export: Path, episodes) -> None:
    from serving.chat import chat_to_prompt
    from serving.server import end_of_chunk

    assert end_of_chunk(idefics_export) == "<end_of_utterance>"
    ep = episodes(0)
    messages = chat_messages(ep)
    prompt, _ = chat_to_prompt(messages, lambda url, param: url, end_of_chunk(idefics_export))
    assert "<|endofchunk|>" not in prompt and prompt.count("<end_of_utterance>") == len(ep.demos)

    server = server_factory(idefics_export, "--threads", "1")
    expected = run_json(
        idefics_export, "--demos", str(ep.folder / "demos.jsonl"), "--image",
        str(ep.folder / "query.png"),
    )  # fmt: skip
    reply = server.client().chat.completions.create(model="m", messages=messages)
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.prompt_tokens == expected["stats"]["prompt_tokens"]
    assert reply.usage.completion_tokens == len(expected["token_ids"])

    raw = "User:<image>Describe it.<end_of_utterance>\nAssistant:"
    query = ep.folder / "query.png"
    expected = run_json(idefics_export, "--prompt", raw, "--image", str(query))
    reply = server.client().completions.create(
        model="m", prompt=raw, extra_body={"images": [data_url(query)]}
    )
    assert reply.choices[0].text == expected["text"]
    assert reply.usage.prompt_tokens == expected["stats"]["prompt_tokens"]
