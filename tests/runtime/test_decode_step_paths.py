"""The per-step shortcuts of the decode loop (issue 18, deliver 1) give exactly what the
general code gives: the position ids and media index of a one-token step, the chosen tokens'
log-probs, the growing history/mask buffers. Torch-free."""

from __future__ import annotations

import numpy as np
import pytest

import runtime.generation as generation
from runtime.decoding import MediaCounter, position_ids
from runtime.generation import GenerationConfig, _chosen_logprobs, generate, log_softmax

MEDIA = 7


def _general_positions(mask: np.ndarray) -> np.ndarray:
    pos = np.cumsum(mask, axis=-1, dtype=np.int64) - 1
    pos[mask == 0] = 1
    return pos[:, -1:]


@pytest.mark.parametrize("seed", range(5))
def test_one_token_positions_equal_the_cumsum_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = (rng.random((4, 9)) < 0.7).astype(np.int64)  # pads anywhere, last column too
    assert np.array_equal(position_ids(mask, 1), _general_positions(mask))


@pytest.mark.parametrize("seed", range(5))
def test_token_by_token_media_index_equals_one_call(seed: int) -> None:
    """MediaCounter fed one token per call (the decode shortcut) indexes a sequence exactly
    as one call over all of it, generated `<image>` tokens past the image count included."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 10, (3, 40))  # ~10% <image>: more than each row has images
    images = np.array([0, 2, 5])
    whole = MediaCounter(MEDIA, images)(ids)
    stepped = MediaCounter(MEDIA, images)
    one_by_one = np.concatenate([stepped(ids[:, i : i + 1]) for i in range(ids.shape[1])], 1)
    assert np.array_equal(whole, one_by_one)
    prefix = MediaCounter(MEDIA, images)
    split = np.concatenate(
        [prefix(ids[:, :25])] + [prefix(ids[:, i : i + 1]) for i in range(25, 40)], 1
    )
    assert np.array_equal(whole, split)


def test_chosen_logprobs_are_log_softmax_values_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 300)) * 30).astype(np.float32)
    logits[1, :50] = -np.inf  # tokens ruled out stay allowed
    tokens = np.array([0, 60, 299, 7, 150])
    full = log_softmax(logits)[np.arange(5), tokens]
    chosen = _chosen_logprobs(logits, tokens, logits.max(axis=1))
    assert chosen.dtype == np.float32 and np.array_equal(chosen, full)


class Echo:
    """Logits from a fixed table of the last token and the step's mask length, and a record
    of the ids and masks each step saw (history/mask buffers are checked through it)."""

    def __init__(self) -> None:
        self.table = np.random.default_rng(1).standard_normal((13, 13)).astype(np.float32)
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.seen.append((input_ids.copy(), attention_mask.copy()))
        shift = np.float32(attention_mask.sum() % 3)
        return self.table[input_ids[:, -1]] + shift

    def reorder_cache(self, index: np.ndarray) -> None:
        pass


@pytest.mark.parametrize("no_repeat", [0, 3])
def test_growing_buffers_give_the_unbuffered_run(no_repeat: int, monkeypatch) -> None:
    """Buffers that start at 2 columns and double many times decode what buffers holding the
    whole run decode: same tokens, log-probs, and the same ids/mask passed at every step."""
    ids = np.array([[0, 3, 4, 5], [1, 2, 3, 6]])
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    config = GenerationConfig(max_new_tokens=70, eos_token_ids=(), no_repeat_ngram_size=no_repeat)
    runs = []
    for columns in (2, 1000):
        monkeypatch.setattr(generation, "_COLUMNS", columns)
        model = Echo()
        runs.append((generate(model, ids, mask, config), model.seen))
    (small, seen_small), (large, seen_large) = runs
    assert small.sequences == large.sequences and small.logprobs == large.logprobs
    assert len(small.sequences[0]) == 70
    assert len(seen_small) == len(seen_large) == 70
    for (a_ids, a_mask), (b_ids, b_mask) in zip(seen_small, seen_large):
        assert np.array_equal(a_ids, b_ids) and np.array_equal(a_mask, b_mask)
    # the masks passed grow one all-ones column per step after the prompt's own
    last_mask = seen_small[-1][1]
    assert np.array_equal(last_mask[:, :4], mask) and (last_mask[:, 4:] == 1).all()
    assert last_mask.shape[1] == 4 + 69
