"""IDEFICS prompts (torch-free): the text IdeficsProcessor builds, from what the manifest records.

A prompt is written with `<image>` markers, as for OpenFlamingo; it is split there into the
processor's item list (text, image, text, ...; empty text between markers is no item) and
rebuilt as `IdeficsProcessor.__call__` does (transformers 4.57, processing_idefics.py):
BOS first; each text item stripped of spaces (`strip(" ")`); an image as
`<fake_token_around_image><image><fake_token_around_image>`, or `<image><fake_token_around_image>`
right after another image (they share the fake token); with an `<end_of_utterance>` token in
the tokenizer (-instruct), that token between two consecutive text items. The result is
tokenized without adding special tokens (the processor's add_special_tokens=False).

Few-shot prompts (`run --demos`, `FlamingoPipeline.few_shot`, the server's chat turns) use the
task templates of `runtime.prompts` with this format's end of a demonstration
(`IdeficsPromptFormat.end_of_chunk`) in place of OpenFlamingo's `<|endofchunk|>`, which an
IDEFICS tokenizer does not know: `<end_of_utterance>` where the tokenizer has it (-instruct:
the token that ends each turn in its training dialogues), nothing otherwise (base: the
demonstrations are separated by the template's "\n" only). The items IdeficsProcessor is given
for the same demonstrations are then [image, "Output:{caption}{end}\n", ..., image,
"Output:"] (tests/runtime/test_idefics.py compares the token ids).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .prompts import EOC_TOKEN

FORMAT = "idefics"


@dataclass(frozen=True)
class IdeficsPromptFormat:
    """The tokens IdeficsProcessor writes; `end_of_utterance_token` None where the tokenizer
    has none (then no separator is written). Stored as the manifest's `prompt`."""

    bos_token: str
    image_token: str = "<image>"
    fake_image_token: str = "<fake_token_around_image>"
    end_of_utterance_token: str | None = None

    @property
    def end_of_chunk(self) -> str:
        """What ends a few-shot demonstration (see the module doc)."""
        return self.end_of_utterance_token or ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IdeficsPromptFormat:
        if d.get("format") != FORMAT:
            raise ValueError(f"prompt format {d.get('format')!r} is not {FORMAT!r}")
        return cls(**{k: v for k, v in d.items() if k != "format"})


def few_shot_end_of_chunk(prompt_record: dict[str, Any] | None) -> str:
    """The end of a few-shot demonstration for an export whose manifest `prompt` is
    `prompt_record` (None: OpenFlamingo's `<|endofchunk|>`)."""
    if not prompt_record:
        return EOC_TOKEN
    return IdeficsPromptFormat.from_dict(prompt_record).end_of_chunk


def prompt_items(prompt: str, image_token: str = "<image>") -> list[str | None]:
    """`prompt` as the processor's item list: text strings, None for each image."""
    items: list[str | None] = []
    for i, text in enumerate(prompt.split(image_token)):
        if i:
            items.append(None)
        if text:
            items.append(text)
    return items


def idefics_text(prompt: str, fmt: IdeficsPromptFormat) -> str:
    """The processor's full text for a prompt with `<image>` markers (see the module doc)."""
    out = fmt.bos_token
    last_was_image = False
    for i, item in enumerate(prompt_items(prompt, fmt.image_token)):
        last_was_text = i > 0 and not last_was_image
        if item is None:
            if not last_was_image:
                out += fmt.fake_image_token
            out += fmt.image_token + fmt.fake_image_token
            last_was_image = True
        else:
            if fmt.end_of_utterance_token and last_was_text:
                out += fmt.end_of_utterance_token
            out += item.strip(" ")
            last_was_image = False
    return out
