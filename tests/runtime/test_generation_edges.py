"""GenerationConfig checks every field once, and the search stays sound over the whole range
the checks let through: per-row random streams, unset eos/pad, non-finite logits, extreme
penalties and temperatures, huge max_new_tokens. Torch-free (HF parity: test_generation.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from runtime.errors import FlamingoExportError
from runtime.generation import (
    MAX_NUM_BEAMS,
    GenerationConfig,
    GenerationError,
    generate,
)

VOCAB = 11
EOS = 10


class TableModel:
    """Logits of a row depend on its own last token only (a fixed random table), so a row's
    logits are exactly the same alone or batched with any other rows."""

    def __init__(self, seed: int = 0, eos_bias: float = 0.0) -> None:
        rng = np.random.default_rng(seed)
        self.table = rng.standard_normal((VOCAB, VOCAB)).astype(np.float32) * 2
        self.table[:, EOS] += eos_bias

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.table[input_ids[:, -1]].copy()

    def reorder_cache(self, index: np.ndarray) -> None:
        pass


class Fixed:
    """The same logits row for every row and step."""

    def __init__(self, logits: list[float] | np.ndarray) -> None:
        self.logits = np.asarray(logits, dtype=np.float32)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.logits, (input_ids.shape[0], self.logits.size)).copy()

    def reorder_cache(self, index: np.ndarray) -> None:
        pass


def _prompts(lengths: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = rng.integers(0, EOS, n)
        mask[r, width - n :] = 1
    return ids, mask


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", "5", "max_new_tokens must be an int, got str '5'"),
        ("max_new_tokens", 2.5, "max_new_tokens must be an int, got float 2.5"),
        ("max_new_tokens", True, "max_new_tokens must be an int, got bool"),
        ("max_new_tokens", -1, "max_new_tokens must be >= 0"),
        ("num_beams", 2.5, "num_beams must be an int"),
        ("num_beams", 0, r"num_beams must be in \[1, 64\]"),
        ("num_beams", MAX_NUM_BEAMS + 1, r"num_beams must be in \[1, 64\], got 65"),
        ("num_beams", 50_000, "num_beams must be in"),
        ("length_penalty", float("nan"), "length_penalty must be a finite number, got nan"),
        ("length_penalty", float("-inf"), "length_penalty must be a finite number, got -inf"),
        ("length_penalty", "1", "length_penalty must be a number, got str"),
        ("early_stopping", "sometimes", "early_stopping must be True, False or 'never'"),
        ("do_sample", 1, "do_sample must be True or False, got int 1"),
        ("temperature", 0.0, "temperature must be > 0"),
        ("temperature", float("inf"), "temperature must be a finite number"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("top_k", -1, "top_k must be >= 0"),
        ("top_k", 1.0, "top_k must be an int"),
        ("top_p", 1.5, r"top_p must be in \[0, 1\]"),
        ("top_p", float("nan"), "top_p must be a finite number"),
        ("seed", -1, "seed must be >= 0"),
        ("seed", "7", "seed must be an int"),
        ("no_repeat_ngram_size", -2, "no_repeat_ngram_size must be >= 0"),
        ("eos_token_ids", ("a",), "eos_token_ids must be an int"),
        ("eos_token_ids", (-1,), "eos_token_ids must be >= 0"),
        ("eos_token_ids", "2", "eos_token_ids must be None"),
        ("pad_token_id", -3, "pad_token_id must be >= 0"),
        ("num_return_sequences", 0, "num_return_sequences must be >= 1"),
        ("num_return_sequences", 3, r"num_return_sequences \(3\) must be <= num_beams \(1\)"),
    ],
)
def test_every_field_is_checked_when_built(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**{field: value})  # type: ignore[arg-type]
    config = GenerationConfig()
    setattr(config, field, value)  # changed after it was built: validate() (and the search)
    with pytest.raises(ValueError, match=message):
        config.validate()
    with pytest.raises(ValueError, match=message):
        generate(Fixed(np.zeros(VOCAB)), *_prompts((3,)), config)


def test_accepted_forms() -> None:
    assert GenerationConfig(eos_token_ids=7).eos_token_ids == (7,)
    assert GenerationConfig(eos_token_ids=[7, 8]).eos_token_ids == (7, 8)
    assert (
        GenerationConfig(
            max_new_tokens=np.int64(3), do_sample=True, top_p=np.float32(0.5)
        ).validate()
        is None
    )
    assert GenerationConfig(num_beams=MAX_NUM_BEAMS, num_return_sequences=MAX_NUM_BEAMS)


def test_settings_without_their_mode_warn() -> None:
    with pytest.warns(UserWarning, match=r"temperature=0\.7, seed=3: only used by sampling"):
        GenerationConfig(temperature=0.7, seed=3)
    with pytest.warns(UserWarning, match=r"length_penalty=0\.5: only used by beam search"):
        GenerationConfig(length_penalty=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GenerationConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=3)
        GenerationConfig(num_beams=3, length_penalty=0.5, early_stopping=True)
        config = GenerationConfig(temperature=0.7, do_sample=True)
        config.with_model_defaults((EOS,), 0)  # filling ids does not warn again


def test_unset_ids_mean_the_models() -> None:
    config = GenerationConfig(max_new_tokens=4)
    assert (config.eos_token_ids, config.pad_token_id) == (None, None)
    filled = config.with_model_defaults((EOS,), 3)
    assert (filled.eos_token_ids, filled.pad_token_id) == ((EOS,), 3)
    assert config.eos_token_ids is None  # a copy
    own = GenerationConfig(eos_token_ids=(), pad_token_id=1).with_model_defaults((EOS,), 3)
    assert (own.eos_token_ids, own.pad_token_id) == ((), 1)  # () = never stop, kept


def test_search_without_ids_never_stops_and_pads_with_eos() -> None:
    """The search itself (no model defaults): unset eos = no stop, unset pad = the first eos."""
    logits = np.zeros(VOCAB)
    logits[EOS] = 5.0
    ids, mask = _prompts((2, 4))
    res = generate(Fixed(logits), ids, mask, GenerationConfig(max_new_tokens=3))
    assert res.sequences == [[EOS] * 3, [EOS] * 3]

    fed: list[np.ndarray] = []

    class Recorder(TableModel):
        def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            fed.append(input_ids[:, -1].copy())
            out = np.zeros((len(input_ids), VOCAB), dtype=np.float32)
            out[0, EOS] = 9.0  # row 0 stops at once, row 1 goes on
            out[1, 3] = 9.0
            return out

    res = generate(Recorder(), ids, mask, GenerationConfig(max_new_tokens=3, eos_token_ids=EOS))
    assert res.sequences == [[EOS], [3, 3, 3]]
    assert [int(f[0]) for f in fed[1:]] == [EOS, EOS]  # finished row fed the eos


# ----------------------------------------------------------------------------- random streams


@pytest.mark.parametrize("num_beams", [1, 3])
def test_seeded_row_is_independent_of_its_batch(num_beams: int) -> None:
    """One random stream per row: a seeded row gets the same tokens alone, at any position of
    any batch (edge-04 at the search level)."""
    ids, mask = _prompts((3, 6, 2, 5), seed=1)
    config = GenerationConfig(
        max_new_tokens=8, do_sample=True, top_k=0, num_beams=num_beams, eos_token_ids=(EOS,)
    )
    seeds = [13, 7, 13, 99]
    batch = generate(TableModel(), ids, mask, config, seeds=seeds).sequences
    for r, seed in enumerate(seeds):
        alone_ids = ids[r : r + 1, mask[r].argmax() :]
        alone = GenerationConfig(**{**vars(config), "seed": seed})
        assert generate(TableModel(), alone_ids, np.ones_like(alone_ids), alone).sequences == [
            batch[r]
        ]
    # the shared config.seed gives every row that stream
    shared = GenerationConfig(**{**vars(config), "seed": 13})
    assert generate(TableModel(), ids, mask, shared).sequences[0] == batch[0]
    # different seeds differ somewhere, unseeded rows too
    others = [generate(TableModel(), ids, mask, config, seeds=[s] * 4).sequences for s in (1, 2)]
    assert others[0] != others[1]
    with pytest.raises(ValueError, match="3 seeds for 4 rows"):
        generate(TableModel(), ids, mask, config, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="seeds must be >= 0"):
        generate(TableModel(), ids, mask, config, seeds=[1, 2, 3, -4])


# ----------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
def test_non_finite_logits_are_an_error_not_an_answer(num_beams: int, bad: str) -> None:
    class Broken(Fixed):
        calls = 0

        def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            out = super().step(input_ids, attention_mask)
            self.calls += 1
            if self.calls == 2:  # the first decode step
                out[-1] = -np.inf if bad == "all -inf" else 0.0
                if bad != "all -inf":
                    out[-1, 4] = float(bad)
            return out

    ids, mask = _prompts((3, 5))
    config = GenerationConfig(max_new_tokens=4, num_beams=num_beams, eos_token_ids=())
    with pytest.raises(GenerationError, match=r"non-finite logits .* at generated token 1"):
        generate(Broken(np.arange(VOCAB, dtype=np.float32)), ids, mask, config)
    assert issubclass(GenerationError, FlamingoExportError)


def test_a_minus_inf_logit_is_a_token_ruled_out() -> None:
    logits = np.arange(VOCAB, dtype=np.float32)
    logits[[0, EOS]] = -np.inf
    ids, mask = _prompts((3,))
    for config in (
        GenerationConfig(max_new_tokens=3, eos_token_ids=()),
        GenerationConfig(max_new_tokens=3, num_beams=3, eos_token_ids=()),
        GenerationConfig(max_new_tokens=3, do_sample=True, top_k=0, seed=0, eos_token_ids=()),
    ):
        res = generate(Fixed(logits), ids, mask, config)
        assert all(0 not in s and EOS not in s and len(s) == 3 for s in res.sequences)
        assert all(np.isfinite(res.logprobs[0]))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_every_token_banned_is_an_error(num_beams: int) -> None:
    """no_repeat_ngram_size=1 bans every token already in the row: with a prompt that holds the
    whole vocabulary nothing is left (HF would emit token 0 or fail in multinomial)."""
    ids = np.arange(VOCAB, dtype=np.int64)[None]
    config = GenerationConfig(
        max_new_tokens=2, num_beams=num_beams, no_repeat_ngram_size=1, eos_token_ids=()
    )
    with pytest.raises(GenerationError, match=r"every token is filtered out .* no_repeat_ngram"):
        generate(Fixed(np.zeros(VOCAB)), ids, np.ones_like(ids), config)


def test_out_of_memory_names_the_batch() -> None:
    class Starved(Fixed):
        def reorder_cache(self, index: np.ndarray) -> None:
            raise MemoryError

    ids, mask = _prompts((3, 4))
    config = GenerationConfig(max_new_tokens=4, num_beams=8, eos_token_ids=())
    with pytest.raises(GenerationError, match=r"not enough memory .* 2 row\(s\) x 8 beam"):
        generate(Starved(np.zeros(VOCAB)), ids, mask, config)


# ----------------------------------------------------------------------------- extreme values


@pytest.mark.parametrize("length_penalty", [-1e30, -50.0, -10.0, -1e-30, 0.0, 50.0, 1e30])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_any_finite_length_penalty_gives_real_hypotheses(
    length_penalty: float, early_stopping: bool | str
) -> None:
    """HF marks empty pool slots with -1e9; a score below it (strongly negative penalties) used
    to lose to an empty slot and come back as an empty answer. Every returned sequence is a
    real hypothesis with a finite score, and nothing warns."""
    ids, mask = _prompts((4, 6), seed=3)
    config = GenerationConfig(
        max_new_tokens=12,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_ids=(EOS,),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = generate(TableModel(seed=2, eos_bias=1.0), ids, mask, config)
    assert len(res.sequences) == 6
    for seq, lps, score in zip(res.sequences, res.logprobs, res.scores or []):
        assert 1 <= len(seq) <= 12 and len(lps) == len(seq)
        assert seq[-1] == EOS or len(seq) == 12
        assert np.isfinite(score) and np.all(np.isfinite(lps))


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-3, 1e30, 1e300])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_any_positive_temperature_samples_without_nan(temperature: float, num_beams: int) -> None:
    logits = np.array([1e4, 3.0, -2.0, 1e4 - 1, 0.5, 0.0, 1.0, 2.0, -1.0, 0.1, -5.0])
    ids, mask = _prompts((3, 4))
    config = GenerationConfig(
        max_new_tokens=3,
        num_beams=num_beams,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=0.9,
        seed=0,
        eos_token_ids=(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = generate(Fixed(logits), ids, mask, config)
    assert all(len(s) == 3 for s in res.sequences)
    if temperature <= 1e-30 and num_beams == 1:  # the t -> 0 limit is greedy
        assert all(s == [0, 0, 0] for s in res.sequences)


def test_huge_max_new_tokens_allocates_for_what_is_generated() -> None:
    """Beam search used to allocate (batch, beams, prompt + max_new_tokens) up front."""
    ids, mask = _prompts((3, 5))
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[EOS] = 8.0
    for num_beams in (1, 4):
        config = GenerationConfig(max_new_tokens=10**12, num_beams=num_beams, eos_token_ids=EOS)
        res = generate(Fixed(logits), ids, mask, config)
        assert res.sequences == [[EOS], [EOS]]


def test_more_eos_ids_than_the_vocabulary_holds() -> None:
    """HF keeps (1 + n_eos) x num_beams candidates a step: more than beams x vocab here."""
    ids, mask = _prompts((3, 4))
    config = GenerationConfig(
        max_new_tokens=3, num_beams=3, num_return_sequences=3, eos_token_ids=tuple(range(10)) * 2
    )
    res = generate(TableModel(), ids, mask, config)
    assert len(res.sequences) == 6 and all(1 <= len(s) <= 3 for s in res.sequences)


def test_a_pad_id_outside_the_vocabulary_pads_finished_rows() -> None:
    """A pad id the logits have no column for (e.g. a tokenizer's extra pad token) only fills
    finished rows; log-probs are the chosen tokens' (breaker pass, 2026-11-30: an IndexError)."""
    logits = np.full((2, VOCAB), -5.0, dtype=np.float32)
    logits[0, EOS] = 5.0  # row 0 ends at once
    logits[1, 4] = 5.0
    config = GenerationConfig(max_new_tokens=3, eos_token_ids=(EOS,), pad_token_id=VOCAB + 5)

    class PerRow(Fixed):
        def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            return self.logits.copy()

    out = generate(PerRow(logits), np.zeros((2, 2), np.int64), np.ones((2, 2), np.int64), config)
    assert out.sequences == [[EOS], [4, 4, 4]]
    assert all(np.isfinite(lp) for row in out.logprobs for lp in row)


def test_logits_without_a_vocabulary_are_named() -> None:
    """A StepModel returning (N, 0) logits: a ValueError naming the shape, not numpy's
    zero-size reduction error (breaker pass, 2026-11-30)."""

    class Empty(Fixed):
        def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            return np.zeros((input_ids.shape[0], 0), dtype=np.float32)

    for beams in (1, 2):
        config = GenerationConfig(max_new_tokens=3, num_beams=beams, eos_token_ids=())
        with pytest.raises(ValueError, match=r"\(N, V >= 1\) logits"):
            generate(Empty([0.0]), np.ones((1, 2), np.int64), np.ones((1, 2), np.int64), config)
