"""Request validation names the field; stop sequences are cut like OpenAI's."""

from __future__ import annotations

import pytest

from serving.engine import StopMatcher
from serving.protocol import APIError, ChatCompletionRequest, parse_json, parse_request

BASE = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": "8"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"tools": []}, "tools"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_fields_are_400_naming_the_field(extra: dict, param: str) -> None:
    with pytest.raises(APIError) as e:
        parse_request(ChatCompletionRequest, {**BASE, **extra})
    assert e.value.status == 400 and e.value.param == param, e.value.message
    body = e.value.body()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param


def test_accepted_fields() -> None:
    req = parse_request(
        ChatCompletionRequest,
        {**BASE, "temperature": 0, "max_completion_tokens": 5, "stop": "x", "num_beams": 2,
         "frequency_penalty": 0, "stream": True, "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert req.max_new_tokens() == 5 and req.stops() == ["x"] and req.temperature == 0


def test_malformed_json() -> None:
    with pytest.raises(APIError, match="invalid JSON"):
        parse_json(b'{"model": ')
    with pytest.raises(APIError, match="JSON object"):
        parse_request(ChatCompletionRequest, [1])


def test_stop_matcher_holds_back_a_possible_start() -> None:
    m = StopMatcher(["END", "xy"])
    assert m.push("abc E") == ("abc ", False)  # "E" may start END
    assert m.push("N") == ("", False)
    assert m.push("Dtail") == ("", True)
    m = StopMatcher(["END"])
    assert m.push("aE") == ("a", False)
    assert m.push("x") == ("Ex", False)
    assert m.flush() == ""
