"""The export's tokenizer, decoding exactly like transformers' `decode` (no transformers needed).

`tokenizers.Tokenizer.decode` is the backend of transformers' fast tokenizers, but
`PreTrainedTokenizerFast._decode` (transformers 4.57) then applies `clean_up_tokenization` when the
tokenizer's `clean_up_tokenization_spaces` is set, which `save_pretrained` always writes to
`tokenizer_config.json` (absent: transformers' default, False). Of transformers' fast tokenizers
only CodeGen, CPM and Whisper decode differently; none is a Flamingo LM family. `TextStream`
(runtime.pipeline) streams the same text: `stable_text` says how much of a partial decode no
later token can change.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .manifest import TOKENIZER_JSON, Manifest, ManifestError

TOKENIZER_CONFIG_JSON = "tokenizer/tokenizer_config.json"  # where clean_up_tokenization_spaces is

__all__ = [
    "ExportTokenizer",
    "clean_up_tokenization",
    "load_export_tokenizer",
    "read_tokenizer",
    "stable_text",
]

# transformers' PreTrainedTokenizerBase.clean_up_tokenization, applied in this order.
_CLEAN_UPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
# The starts of clean-up patterns (" ", " n" of " n't", " '" of " ' " and " 's", ...): text
# ending in one may still change when the next token completes the pattern.
_OPEN_ENDS = tuple(
    sorted({old[:i] for old, _ in _CLEAN_UPS for i in range(1, len(old))}, key=len, reverse=True)
)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (spaces before punctuation and contractions)."""
    for old, new in _CLEAN_UPS:
        text = text.replace(old, new)
    return text


def stable_text(raw: str, clean_up: bool) -> str:
    """The decoded text of `raw` that no continuation of it can change: all of it without
    clean-up; with clean-up, the cleaned text of the longest prefix (all of `raw`, or up to a
    space) that does not end in the start of a clean-up pattern (" ", " n", " '", ...): a
    later replacement could reach back over such an end. The result is a prefix of
    `clean_up_tokenization(raw + anything)`."""
    if not clean_up:
        return raw
    cut = len(raw)
    while cut > 0:
        head = raw[:cut]
        clean = clean_up_tokenization(head)  # a replacement can make an open end (" ' v")
        if not head.endswith(_OPEN_ENDS) and not clean.endswith(_OPEN_ENDS):
            return clean
        cut = raw.rfind(" ", 0, cut)
    return ""


class ExportTokenizer:
    """An export's `tokenizers.Tokenizer` whose `decode` equals transformers' `decode` for the
    same tokenizer files; every other attribute (`encode`, `token_to_id`, ...) is the
    wrapped tokenizer's."""

    def __init__(self, tokenizer: Tokenizer, clean_up_tokenization_spaces: bool = False) -> None:
        self.tokenizer = tokenizer
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of `ids` as transformers decodes it (`clean_up_tokenization_spaces=None`: the
        tokenizer's own setting, False: the backend's text as is)."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def decode_batch(
        self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]


def load_export_tokenizer(root: str | Path, manifest: Manifest) -> ExportTokenizer:
    """The tokenizer of the export at `root`: its tokenizer.json and, when listed,
    tokenizer_config.json, each read only because `manifest` vouches for it (sha256 checked by
    `load_manifest`). Raises ManifestError (a FlamingoExportError) naming the file when either
    cannot be used."""
    root = Path(root)
    config = TOKENIZER_CONFIG_JSON in manifest.tokenizer_files
    return read_tokenizer(
        manifest.path(root, TOKENIZER_JSON),
        manifest.path(root, TOKENIZER_CONFIG_JSON) if config else None,
    )


def read_tokenizer(tokenizer_json: Path, config_json: Path | None = None) -> ExportTokenizer:
    """An ExportTokenizer from a tokenizer.json and (optional) transformers'
    tokenizer_config.json; ManifestError naming the file that cannot be used."""
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise ManifestError(f"{tokenizer_json}: not a usable tokenizer ({e})") from e
    clean_up = False  # transformers' default when the config does not say
    if config_json is not None and config_json.is_file():
        try:
            config = json.loads(config_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{config_json}: cannot read ({e})") from e
        if not isinstance(config, dict):
            raise ManifestError(f"{config_json}: expected a JSON object")
        value = config.get("clean_up_tokenization_spaces", False)
        if not isinstance(value, bool):
            raise ManifestError(
                f"{config_json}: 'clean_up_tokenization_spaces' must be true or false, "
                f"got {value!r}"
            )
        clean_up = value
    return ExportTokenizer(tokenizer, clean_up)
