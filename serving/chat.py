"""Chat messages -> an OpenFlamingo few-shot prompt, through `runtime.prompts`.

The mapping (docs/serving.md):

* roles alternate user, assistant, user, ..., user; the last user turn is the query, every
  (user, assistant) pair before it is a demonstration;
* a user turn is a string or a list of parts; its image part (at most one: the templates have
  one `<image>` per example) becomes the template's `<image>` marker, its text parts (joined
  with "\\n") the question;
* an image-only turn uses the caption template, a turn with text the VQA template, via
  `build_few_shot_prompt` exactly as `flamingo-export run --demos` (demonstrations joined by
  "\\n"):  caption `<image>Output:{answer}<|endofchunk|>` ... `<image>Output:`; VQA
  `<image>Question:{text} Short answer:{answer}<|endofchunk|>` ... `<image>Question:{text}
  Short answer:`. A text-only demonstration (no image) keeps its text without a marker, as
  OpenFlamingo does; the query needs its image;
* all turns of a conversation use one template (the function takes one task), so mixing
  image-only and image+text turns is refused: send such prompts to /v1/completions.

`affinity_key` hashes what a prefix-cache entry depends on (the prompt up to its last
`<|endofchunk|>` and the images before it), so requests that would share a cached prefix can be
sent to the same replica.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.prompts import EOC_TOKEN, Demonstration, build_few_shot_prompt, count_media

from .protocol import APIError

ResolveImage = Callable[[object, str], Any]  # (url, param) -> the image (serving.media)


@dataclass
class _UserTurn:
    image: Any  # None: a text-only turn
    text: str | None
    param: str  # messages[i].content


def chat_to_prompt(
    messages: Sequence[Any], resolve: ResolveImage, end_of_chunk: str = EOC_TOKEN
) -> tuple[str, list[Any]]:
    """`(prompt, images)` for a chat conversation (the images as `resolve` returns them, in
    marker order); a 400 naming the message otherwise. `end_of_chunk` ends each demonstration:
    the export's (`runtime.idefics.few_shot_end_of_chunk`: IDEFICS has its own)."""
    users: list[_UserTurn] = []
    answers: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"'{where}' must be an object", param=where)
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise APIError(400, f"unsupported field '{where}.{unknown[0]}'", param=where)
        role = message.get("role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role in ("system", "developer", "tool", "function"):
            raise APIError(
                400,
                f"'{where}.role': {role!r} messages are not supported: a Flamingo export has no "
                "system prompt; show the task with (user, assistant) demonstrations",
                param=f"{where}.role",
            )
        if role != expected:
            raise APIError(
                400,
                f"'{where}.role' must be {expected!r} (roles alternate user, assistant, ..., "
                f"user), got {role!r}",
                param=f"{where}.role",
            )
        if role == "user":
            users.append(_user_turn(message.get("content"), f"{where}.content", resolve))
        else:
            answers.append(_assistant_text(message.get("content"), f"{where}.content"))
    if len(users) == len(answers):
        where = f"messages[{len(messages) - 1}]"
        raise APIError(400, "the last message must be the user's query", param=where)
    return _build(users, answers, end_of_chunk)


def _user_turn(content: Any, param: str, resolve: ResolveImage) -> _UserTurn:
    if isinstance(content, str):
        parts: list[Any] = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise APIError(400, f"'{param}' must be a string or a list of parts", param=param)
    texts: list[str] = []
    image = None
    for k, part in enumerate(parts):
        where = f"{param}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"'{where}.text' must be a string", param=f"{where}.text")
            texts.append(text)
        elif kind == "image_url":
            if image is not None:
                raise APIError(
                    400,
                    f"'{where}': one image per user turn (the few-shot templates have one "
                    "<image> per example); interleaved prompts go to /v1/completions",
                    param=where,
                )
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else None
            image = resolve(url, f"{where}.image_url.url")
        else:
            raise APIError(
                400, f"'{where}.type' must be 'text' or 'image_url', got {kind!r}", param=where
            )
    text = "\n".join(texts)
    return _UserTurn(image, text if text.strip() else None, param)


def _assistant_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"'{param}' must be a string or a list of text parts", param=param)


def _build(users: list[_UserTurn], answers: list[str], end_of_chunk: str) -> tuple[str, list[Any]]:
    query = users[-1]
    if query.image is None:
        raise APIError(400, f"'{query.param}': the query needs an image", param=query.param)
    task = "caption" if query.text is None else "vqa"
    demos = []
    for turn, answer in zip(users, answers):
        if turn.image is None and turn.text is None:
            raise APIError(400, f"'{turn.param}' is empty", param=turn.param)
        if ("caption" if turn.text is None else "vqa") != task:
            raise APIError(
                400,
                f"'{turn.param}': this conversation mixes image-only turns (caption template) "
                "and turns with text (VQA template); use one, or /v1/completions",
                param=turn.param,
            )
        demos.append(Demonstration(turn.image, text=answer, question=turn.text, answer=answer))
    try:
        prompt, images = build_few_shot_prompt(
            demos,
            query.text,
            task,
            query_image=query.image,  # type: ignore[arg-type]
            end_of_chunk=end_of_chunk,
        )
    except ValueError as e:  # e.g. a text containing the <image> marker itself
        raise APIError(400, f"messages: {e}", param="messages") from None
    return prompt, images


def affinity_key(prompt: str, images: Sequence[bytes], end_of_chunk: str = EOC_TOKEN) -> str:
    """sha256 of the demonstrations (prompt up to its last `end_of_chunk`, their images);
    empty when the prompt has none (or the export's demonstrations end with no marker)."""
    end = prompt.rfind(end_of_chunk) if end_of_chunk else -1
    if end < 0:
        return ""
    prefix = prompt[: end + len(end_of_chunk)]
    digest = hashlib.sha256(prefix.encode())
    for image in images[: count_media(prefix)]:
        digest.update(hashlib.sha256(image).digest())
    return digest.hexdigest()
