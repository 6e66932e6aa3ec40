"""runtime.tokenizer decodes exactly like transformers' `decode` for the same tokenizer files,
streaming included, on several tokenizer kinds and `clean_up_tokenization_spaces` settings."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from runtime.manifest import ManifestError  # noqa: E402
from runtime.pipeline import TextStream  # noqa: E402
from runtime.tokenizer import (  # noqa: E402
    ExportTokenizer,
    clean_up_tokenization,
    read_tokenizer,
    stable_text,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<|endofchunk|>", "<image>"]
CORPUS = (
    "A dog , a cat . Is it red ? it 's here , do n't go ! we 're ' quoted ' I 'm done , we 've "
    "seen it . Output: a red circle . Short answer: yes ! Don't , won't ; can't . "
    "naïve café 日本 ok ... ? ! ' ' n't 's 'm 've 're"
)


def _byte_bpe():
    from fixtures.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer("gpt_neox").backend_tokenizer


def _trained(model, trainer, pre, decoder):
    from tokenizers import Tokenizer

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre
    tok.decoder = decoder
    tok.train_from_iterator([CORPUS] * 20, trainer)
    return tok


def _metaspace_bpe():
    """Llama-like: sentencepiece spaces (▁), byte fallback, the first space stripped."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    return _trained(
        models.BPE(unk_token="<unk>", byte_fallback=True),
        trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[:3] + byte_tokens),
        pre_tokenizers.Metaspace(),
        decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        ),
    )


def _wordpiece():
    """BERT-like: words and punctuation split, joined back with spaces (" ." everywhere)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    return _trained(
        models.WordPiece(unk_token="<unk>"),
        trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS[:3]),
        pre_tokenizers.BertPreTokenizer(),
        decoders.WordPiece(cleanup=False),
    )


KINDS = {"byte_bpe": _byte_bpe, "metaspace_bpe": _metaspace_bpe, "wordpiece": _wordpiece}


@pytest.fixture(scope="module", params=[(k, c) for k in KINDS for c in (True, False, None)])
def saved(request, tmp_path_factory) -> tuple[Path, str]:
    """A tokenizer folder as `save_pretrained` writes it (clean-up True / False / key absent),
    with the Flamingo markers added as special tokens."""
    from tokenizers import AddedToken

    kind, clean_up = request.param
    backend = KINDS[kind]()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|endofchunk|>", "<image>")]
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", clean_up_tokenization_spaces=bool(clean_up)
    )
    folder = tmp_path_factory.mktemp(f"tok-{kind}-{clean_up}")
    tok.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if clean_up is None:
        del config["clean_up_tokenization_spaces"]
        config_path.write_text(json.dumps(config))
    else:
        assert config["clean_up_tokenization_spaces"] is clean_up
    return folder, kind


def _id_sequences(hf, n: int = 60) -> list[list[int]]:
    rng = random.Random(0)
    words = hf(CORPUS, add_special_tokens=False).input_ids
    specials = [hf.convert_tokens_to_ids(t) for t in ("<|endofchunk|>", "<image>")]
    out = [words, words[::-1]]
    for _ in range(n):
        start = rng.randrange(len(words))
        seq = words[start : start + rng.randrange(1, 25)]
        seq += [rng.randrange(len(hf)) for _ in range(rng.randrange(4))]
        if rng.random() < 0.3:
            seq.insert(rng.randrange(len(seq) + 1), rng.choice(specials))
        out.append(seq)
    return out


def test_decode_equals_transformers(saved: tuple[Path, str]) -> None:
    folder, kind = saved
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = _read(folder)
    assert ours.clean_up_tokenization_spaces is bool(hf.clean_up_tokenization_spaces)
    changed = 0
    for ids in _id_sequences(hf):
        for skip in (True, False):
            expect = hf.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expect, (kind, ids)
        raw = ours.decode(ids, clean_up_tokenization_spaces=False)
        changed += raw != ours.decode(ids)
    # the clean-up did act on these texts when it is on (the test covers it)
    assert (changed > 0) == ours.clean_up_tokenization_spaces
    assert (
        ours.encode("A dog , a cat").ids == hf("A dog , a cat", add_special_tokens=False).input_ids
    )


def test_stream_adds_up_to_the_text_and_never_takes_back(saved: tuple[Path, str]) -> None:
    folder, kind = saved
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = _read(folder)
    eoc = hf.convert_tokens_to_ids("<|endofchunk|>")
    for ids in _id_sequences(hf, 40):
        expect = hf.decode([t for t in ids if t != eoc], skip_special_tokens=True)
        stream = TextStream(ours, skip_ids=(eoc,))
        shown = ""
        for token in ids:
            shown += stream.push(token)
            assert expect.startswith(shown), (kind, ids, shown)
        assert shown + stream.flush() == expect


def test_stream_holds_back_only_what_clean_up_can_change() -> None:
    """Streaming " do n't" must not print "do n" before the "'t" that cleans it to "don't"."""
    for raw, shown in [
        ("A dog", "A dog"),
        ("A dog ,", "A dog,"),
        ("A dog , it", "A dog, it"),
        ("do n", "do"),
        ("do n'", "do"),
        ("do n't", "don't"),
        ("x ' ", "x"),
        ("x ' s", "x's"),
        ("a  ' v", "a"),  # the clean-up itself makes " 'v", which an "e" would complete
        ("end ", "end"),
    ]:
        assert stable_text(raw, True) == clean_up_tokenization(shown) == shown, raw
        assert stable_text(raw, False) == raw


def test_stable_text_is_a_prefix_of_every_continuation() -> None:
    """Exhaustive over short strings of the characters clean-up patterns are made of."""
    alphabet = " 'ntvse"  # "  ' ve": the clean-up itself can open a pattern
    for length in range(1, 7):
        for chars in itertools.product(alphabet, repeat=length):
            text = "".join(chars)
            final = clean_up_tokenization(text)
            for cut in range(length + 1):
                assert final.startswith(stable_text(text[:cut], True)), (text, cut)


def test_wrapping_and_errors(tmp_path: Path) -> None:
    from fixtures.tiny import build_tiny_tokenizer

    backend = build_tiny_tokenizer("llama").backend_tokenizer
    wrapped = ExportTokenizer(backend, clean_up_tokenization_spaces=True)
    assert wrapped.token_to_id("<s>") == backend.token_to_id("<s>")  # everything else delegated
    stream = TextStream(backend)  # a plain tokenizers.Tokenizer still streams (no clean-up)
    assert stream.push(backend.token_to_id("A")) == "A"
    with pytest.raises(ManifestError, match=r"tokenizer\.json: not a usable tokenizer"):
        _read(tmp_path)
    backend.save(str(tmp_path / "tokenizer.json"))
    assert _read(tmp_path).clean_up_tokenization_spaces is False
    for bad, message in (("{", "cannot read"), ("[]", "expected a JSON object"), (
        '{"clean_up_tokenization_spaces": "yes"}', "must be true or false")):  # fmt: skip
        (tmp_path / "tokenizer_config.json").write_text(bad)
        with pytest.raises(ManifestError, match=message):
            _read(tmp_path)


def _read(folder: Path) -> ExportTokenizer:
    """An export's tokenizer/ folder as the runtime reads it (runtime.tokenizer)."""
    return read_tokenizer(folder / "tokenizer.json", folder / "tokenizer_config.json")
