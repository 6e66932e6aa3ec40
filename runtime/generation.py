"""Decoding strategies (greedy, sampling, beam search) written once, in numpy only.

The PyTorch reference and the torch-free runtimes plug in behind the two-method ``StepModel``
protocol, so their generations can only differ by logits. The search reproduces Hugging Face
``generate`` of transformers 4.57.6 (``GenerationMixin._sample`` / ``_beam_search``,
``_get_logits_processor``; what the OpenFlamingo oracle calls): processor order, float32 beam
bookkeeping with HF's -1e9 masks, the length-normalised finished pool and its stopping rule.
Known differences (float64 top-p mass, ties to the lowest index, a seeded PCG64 Gumbel-max
sampler instead of torch's random stream) and the rule-by-rule walk-through: docs/generation.md.
Importable with numpy alone: no torch / transformers imports anywhere.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import FlamingoExportError

__all__ = [
    "MAX_NUM_BEAMS",
    "GenerationConfig",
    "GenerationError",
    "GenerationResult",
    "ShouldStop",
    "StepModel",
    "generate",
    "log_softmax",
    "process_scores",
]

ShouldStop = Callable[[int], bool]

_NEG = np.float32(-1.0e9)  # HF's "very large negative" beam mask value (float32-exact)
_FLT_MAX = float(np.finfo(np.float32).max)
_FLT_TINY = float(np.finfo(np.float32).tiny)
# Beam search ranks the finished pool by score, with tiers below every float32 score for an
# empty slot and for a candidate that may not enter (HF uses -1e9 for both, which a score
# below -1e9, e.g. under a negative length_penalty, would pass).
_EMPTY_SLOT = -1.0e300
_EXCLUDED = -2.0e300

# The most beams the search accepts. OpenFlamingo evaluates with 3; every beam holds its own
# copy of the KV cache (and, in the runtime, of the image K/V).
MAX_NUM_BEAMS = 64

# Settings that only act in one decoding mode (HF warns about the same ones).
_SAMPLING_ONLY = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "seed": None}
_BEAMS_ONLY = {"length_penalty": 1.0, "early_stopping": False}


class GenerationError(FlamingoExportError, RuntimeError):
    """The search cannot go on: non-finite logits, every token filtered out, out of memory."""


class StepModel(Protocol):
    """Incremental LM: the backend owns the KV cache, the search owns everything else."""

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run new tokens (N, T) int64 with the full attention mask (N, past+T) (1 = real,
        0 = left pad); advance the internal KV cache; return float32 logits of the LAST
        position (N, V)."""
        ...

    def reorder_cache(self, index: np.ndarray) -> None:
        """Keep/duplicate batch rows of the internal state: ``new_state[i] = state[index[i]]``
        (used to expand to beams after prefill and to reorder beams)."""
        ...


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _int_field(name: str, value: Any, low: int, high: int | None = None) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {_got(value)}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _real_field(name: str, value: Any) -> float:
    if not _is_real(value):
        raise ValueError(f"{name} must be a number, got {_got(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_seed(value: Any, name: str = "seed") -> None:
    """A seed is None (fresh entropy) or an int >= 0 (numpy's SeedSequence)."""
    if value is not None:
        _int_field(name, value, 0)


@dataclass
class GenerationConfig:
    """Subset of HF ``GenerationConfig`` that the Flamingo demo and oracle use.

    Every field is checked when the config is built (and by :meth:`validate`): a ValueError
    names the field and what it must be. ``eos_token_ids`` / ``pad_token_id`` left at None
    mean "the model's": the pipeline and the reference fill in the export's
    ``<|endofchunk|>`` and pad ids, as OpenFlamingo's ``generate`` does; ``eos_token_ids=()``
    never stops early. Settings that only act when sampling (temperature, top_k, top_p, seed)
    or with beams (length_penalty, early_stopping) warn when given without it.
    """

    max_new_tokens: int = 20
    num_beams: int = 1  # 1 .. MAX_NUM_BEAMS
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # False, True or "never" (HF semantics)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # every row's own random stream starts from it (see `generate`)
    no_repeat_ngram_size: int = 0
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's; an int is one id
    pad_token_id: int | None = None  # None: the model's
    num_return_sequences: int = 1  # beams only, <= num_beams

    def __post_init__(self) -> None:
        if _is_int(self.eos_token_ids):
            self.eos_token_ids = (self.eos_token_ids,)
        elif isinstance(self.eos_token_ids, list):
            self.eos_token_ids = tuple(self.eos_token_ids)
        self.validate()
        for only, keys, mode in (
            (not self.do_sample, _SAMPLING_ONLY, "sampling (do_sample=True)"),
            (self.num_beams == 1, _BEAMS_ONLY, "beam search (num_beams > 1)"),
        ):
            given = [f"{k}={getattr(self, k)!r}" for k, v in keys.items() if getattr(self, k) != v]
            if only and given:
                warnings.warn(
                    f"{', '.join(given)}: only used by {mode}, which this config does not select",
                    UserWarning,
                    stacklevel=3,
                )

    def validate(self) -> None:
        """Raise ValueError naming the first field that is of the wrong type or out of range
        (HF's own checks plus the bounds this search needs: finite numbers, MAX_NUM_BEAMS)."""
        _int_field("max_new_tokens", self.max_new_tokens, 0)
        _int_field("num_beams", self.num_beams, 1, MAX_NUM_BEAMS)
        _real_field("length_penalty", self.length_penalty)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(
                f"early_stopping must be True, False or 'never', got {_got(self.early_stopping)}"
            )
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {_got(self.do_sample)}")
        if not _real_field("temperature", self.temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        _int_field("top_k", self.top_k, 0)
        if not 0.0 <= _real_field("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        check_seed(self.seed)
        _int_field("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if self.eos_token_ids is not None:
            if not isinstance(self.eos_token_ids, (tuple, list)):
                raise ValueError(
                    "eos_token_ids must be None (the model's), an int or a tuple of ints, got "
                    + _got(self.eos_token_ids)
                )
            for token in self.eos_token_ids:
                _int_field("eos_token_ids", token, 0)
        if self.pad_token_id is not None:
            _int_field("pad_token_id", self.pad_token_id, 0)
        _int_field("num_return_sequences", self.num_return_sequences, 1)
        if self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                f"({self.num_beams}): several sequences per prompt are the best beams"
            )

    def with_model_defaults(
        self, eos_token_ids: Sequence[int], pad_token_id: int
    ) -> GenerationConfig:
        """A copy with unset (None) eos / pad ids filled in from the model (not re-warned)."""
        out = copy.copy(self)
        if out.eos_token_ids is None:
            out.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        if out.pad_token_id is None:
            out.pad_token_id = int(pad_token_id)
        out.validate()
        return out


@dataclass
class GenerationResult:
    """Generated continuations, one entry per (row, return sequence), row-major."""

    sequences: list[list[int]]  # generated ids, eos included if hit, no padding
    logprobs: list[list[float]]  # log_softmax(raw logits)[chosen token], per generated token
    scores: list[float] | None = None  # beam search: length-normalised score (HF sequences_scores)


# --------------------------------------------------------------------------- score processing


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable log-softmax over the last axis, computed in float64 and returned as float32."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        lse = np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)) + m
    return (x - lse).astype(np.float32)


def _no_repeat_ngram(sequences: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """Ban tokens that would repeat an n-gram already present in the row (HF/fairseq rule)."""
    rows, cur_len = sequences.shape
    if cur_len < n:  # no complete n-gram yet (HF: `cur_len + 1 < n` or an empty n-gram table)
        return scores
    scores = scores.copy()
    windows = np.lib.stride_tricks.sliding_window_view(sequences, n, axis=1)  # (R, L-n+1, n)
    prefix = sequences[:, cur_len + 1 - n :]  # (R, n-1)
    match = np.all(windows[:, :, :-1] == prefix[:, None, :], axis=-1)  # (R, L-n+1)
    for r in range(rows):
        banned = windows[r, match[r], -1]
        if banned.size:
            scores[r, banned] = -np.inf
    return scores


def _top_k_filter(scores: np.ndarray, top_k: int, min_tokens_to_keep: int) -> np.ndarray:
    """HF TopKLogitsWarper: drop everything strictly below the k-th largest score."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]
    return np.where(scores < kth, np.float32(-np.inf), scores).astype(np.float32)


def _top_p_filter(scores: np.ndarray, top_p: float, min_tokens_to_keep: int) -> np.ndarray:
    """HF TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is
    <= 1 - top_p, always keep the ``min_tokens_to_keep`` most likely ones."""
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1).astype(np.float64)
    top = sorted_scores[:, -1:]
    weights = np.exp(sorted_scores - np.where(np.isfinite(top), top, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):  # a row with every token filtered out
        cum = np.cumsum(weights, axis=-1) / weights.sum(axis=-1, keepdims=True)
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[:, -min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(-np.inf), scores).astype(np.float32)


def _temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """HF TemperatureLogitsWarper in float32; a quotient beyond float32 saturates at +-max
    instead of overflowing to inf (so any temperature > 0 keeps the ranking, never NaN)."""
    t = np.float32(min(max(temperature, _FLT_TINY), _FLT_MAX))
    with np.errstate(over="ignore"):
        out = (scores / t).astype(np.float32)
    overflow = np.isinf(out) & np.isfinite(scores)
    if overflow.any():
        out[overflow] = np.copysign(np.float32(_FLT_MAX), out[overflow])
    return out


def process_scores(
    sequences: np.ndarray,
    scores: np.ndarray,
    config: GenerationConfig,
    min_tokens_to_keep: int = 1,
) -> np.ndarray:
    """Apply HF's logits processors for ``config`` in HF's order.

    ``sequences`` is the full (R, L) history incl. the padded prompt; ``scores`` (R, V) are raw
    logits (greedy/sampling) or log-probs (beam search). Returns a new float32 array.
    """
    out = np.asarray(scores, dtype=np.float32)
    if config.no_repeat_ngram_size > 0:
        out = _no_repeat_ngram(sequences, out, config.no_repeat_ngram_size)
    if config.do_sample:
        if config.temperature != 1.0:
            out = _temperature(out, config.temperature)
        if config.top_k != 0:
            out = _top_k_filter(out, config.top_k, min_tokens_to_keep)
        if config.top_p < 1.0:
            out = _top_p_filter(out, config.top_p, min_tokens_to_keep)
    return out


def _topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a 2-D array, descending, ties resolved to the lowest index."""
    rows, n = x.shape
    k = min(k, n)
    kth = -np.partition(-x, k - 1, axis=-1)[:, k - 1]
    idx = np.empty((rows, k), dtype=np.int64)
    for r in range(rows):
        cand = np.flatnonzero(x[r] >= kth[r])  # ascending index: stable sort keeps ties ordered
        idx[r] = cand[np.argsort(-x[r, cand], kind="stable")[:k]]
    return np.take_along_axis(x, idx, axis=-1), idx


# --------------------------------------------------------------------------- decoding


def generate(
    model: StepModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: GenerationConfig,
    on_token: Callable[[int, int], None] | None = None,
    should_stop: ShouldStop | None = None,
    *,
    seeds: Sequence[int | None] | None = None,
) -> GenerationResult:
    """Decode continuations of a left-padded prompt batch with HF 4.57 ``generate`` semantics.

    Greedy / sampling stream ``on_token(row, token_id)`` as tokens are chosen. Beam search only
    knows its winners at the end, so it calls ``on_token(out_row, token_id)`` once per token of
    every returned sequence after the search (``out_row = row * num_return_sequences + j``).

    ``should_stop(row)`` (e.g. a client that went away) is asked after every step: greedy /
    sampling finish that row as if it had hit eos (the others go on); beam search stops when
    every row asks (its result is then whatever the finished pool holds).

    Sampling draws every row from its own random stream, seeded by ``seeds[row]`` (default
    ``config.seed`` for every row; None: fresh entropy), so a seeded row gets the same tokens
    alone or in any batch. Unset eos means none, unset pad means the first eos (else 0), as in
    HF. Raises GenerationError for non-finite logits (NaN or +inf), a row whose every token is
    filtered out, or too little memory for the batch.
    """
    config.validate()
    input_ids = np.asarray(input_ids, dtype=np.int64)
    attention_mask = np.asarray(attention_mask, dtype=np.int64)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError("input_ids and attention_mask must both be (N, T)")
    n_rows = input_ids.shape[0]
    eos = tuple(config.eos_token_ids or ())
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    config = config.with_model_defaults(eos, pad)
    rngs = _row_rngs(config, n_rows, seeds)
    n_ret = config.num_return_sequences if config.num_beams > 1 else 1
    if config.max_new_tokens == 0:
        empty: list[list[int]] = [[] for _ in range(n_rows * n_ret)]
        scores = [0.0] * len(empty) if config.num_beams > 1 else None
        return GenerationResult(empty, [[] for _ in empty], scores)
    try:
        if config.num_beams == 1:
            return _greedy_or_sample(
                model, input_ids, attention_mask, config, rngs, on_token, should_stop
            )
        return _beam_search(model, input_ids, attention_mask, config, rngs, on_token, should_stop)
    except MemoryError as e:
        raise GenerationError(
            f"not enough memory to decode {n_rows} row(s) x {config.num_beams} beam(s) of up to "
            f"{input_ids.shape[1]} + {config.max_new_tokens} tokens: use fewer beams, rows or "
            "new tokens"
        ) from e


_COLUMNS = 256  # generated columns the greedy/sampling buffers start with (then doubled)


def _row_rngs(
    config: GenerationConfig, n_rows: int, seeds: Sequence[int | None] | None
) -> list[np.random.Generator] | None:
    """One generator per row (sampling only): PCG64(seed) for a seeded row."""
    if seeds is not None:
        seeds = list(seeds)
        if len(seeds) != n_rows:
            raise ValueError(f"{len(seeds)} seeds for {n_rows} rows")
        for seed in seeds:
            check_seed(seed, "seeds")
    if not config.do_sample:
        return None
    row_seeds: list[Any] = list(seeds) if seeds is not None else [config.seed] * n_rows
    if any(seed is None for seed in row_seeds):
        fresh = iter(np.random.SeedSequence().spawn(n_rows))
        row_seeds = [next(fresh) if seed is None else seed for seed in row_seeds]
    return [np.random.Generator(np.random.PCG64(seed)) for seed in row_seeds]


def _gumbel(rngs: list[np.random.Generator], shape: tuple[int, int]) -> np.ndarray:
    """(rows, n) standard Gumbel noise, row r drawn from rngs[r]."""
    return np.stack([rng.gumbel(size=shape[1]) for rng in rngs])


def _step(model: StepModel, ids: np.ndarray, mask: np.ndarray, step: int) -> np.ndarray:
    return _step_max(model, ids, mask, step)[0]


def _step_max(
    model: StepModel, ids: np.ndarray, mask: np.ndarray, step: int
) -> tuple[np.ndarray, np.ndarray]:
    """`model.step`'s (N, V) float32 logits, checked finite, and their row maxima (N,)."""
    logits = np.asarray(model.step(ids, mask), dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != ids.shape[0] or logits.shape[1] == 0:
        raise ValueError(f"StepModel.step must return (N, V >= 1) logits, got {logits.shape}")
    row_max = logits.max(axis=1)
    _check_finite(logits, row_max, step)
    return logits, row_max


def _check_finite(logits: np.ndarray, row_max: np.ndarray, step: int) -> None:
    """Raise for a row with NaN or +inf, or without any finite logit; -inf alone is a token
    the model rules out. `row_max` = logits.max(axis=1): NaN anywhere, +inf anywhere and
    "every logit -inf" all make it non-finite, so one test of it covers the three."""
    if np.isfinite(row_max).all():
        return
    bad = np.isnan(logits).any(axis=1) | np.isposinf(logits).any(axis=1)
    bad |= ~np.isfinite(logits).any(axis=1)
    raise GenerationError(
        f"the model produced non-finite logits (NaN or inf) for row(s) "
        f"{np.flatnonzero(bad).tolist()[:8]} at generated token {step}: its weights or "
        "inputs are broken (check the export with `flamingo-export parity`)"
    )


def _chosen_logprobs(logits: np.ndarray, tokens: np.ndarray, row_max: np.ndarray) -> np.ndarray:
    """(N,) float32 log_softmax(logits)[row, tokens[row]]: `log_softmax`'s arithmetic (float64)
    for the chosen tokens alone; `row_max` = logits.max(axis=1), finite (`_check_finite`)."""
    x = logits.astype(np.float64)
    m = row_max.astype(np.float64)
    lse = np.log(np.exp(x - m[:, None]).sum(axis=-1)) + m
    return (x[np.arange(len(tokens)), tokens] - lse).astype(np.float32)


def _all_filtered(rows: np.ndarray, step: int, config: GenerationConfig) -> GenerationError:
    return GenerationError(
        f"every token is filtered out for row(s) {rows.tolist()[:8]} at generated token {step} "
        f"(no_repeat_ngram_size={config.no_repeat_ngram_size} bans every token of the "
        "vocabulary): use a larger no_repeat_ngram_size or none"
    )


def _greedy_or_sample(
    model: StepModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: GenerationConfig,
    rngs: list[np.random.Generator] | None,
    on_token: Callable[[int, int], None] | None,
    should_stop: ShouldStop | None = None,
) -> GenerationResult:
    """HF ``_sample``: processors on raw logits, argmax or categorical draw, pad finished rows."""
    n_rows, prompt_len = input_ids.shape
    eos = np.asarray(config.eos_token_ids, dtype=np.int64)
    pad = config.pad_token_id
    # history (prompt + generated) and mask live in buffers that each step writes one column
    # of and passes views of, instead of concatenating O(T) arrays per token; they grow by
    # doubling, so memory follows the tokens actually generated, not max_new_tokens
    width = prompt_len + min(config.max_new_tokens, _COLUMNS)
    history = np.empty((n_rows, width), dtype=np.int64)
    history[:, :prompt_len] = input_ids
    mask = np.ones((n_rows, width), dtype=np.int64)
    mask[:, :prompt_len] = attention_mask
    unfinished = np.ones(n_rows, dtype=bool)
    sequences: list[list[int]] = [[] for _ in range(n_rows)]
    logprobs: list[list[float]] = [[] for _ in range(n_rows)]
    plain = not config.do_sample and config.no_repeat_ngram_size == 0  # argmax of raw logits

    logits, row_max = _step_max(model, input_ids, attention_mask, 0)
    for step in range(config.max_new_tokens):
        length = prompt_len + step
        scores = logits if plain else process_scores(history[:, :length], logits, config)
        if not plain:
            stuck = unfinished & ~np.isfinite(scores).any(axis=1)
            if stuck.any():
                raise _all_filtered(np.flatnonzero(stuck), step, config)
        if rngs is not None:
            keys = scores.astype(np.float64) + _gumbel(rngs, scores.shape)
            tokens = np.argmax(keys, axis=-1)
        else:
            tokens = np.argmax(scores, axis=-1)
        token_lp = _chosen_logprobs(logits, tokens, row_max)  # before finished rows get pad
        if eos.size or should_stop is not None:
            tokens = np.where(unfinished, tokens, pad)
        for r in np.flatnonzero(unfinished).tolist():
            tok = int(tokens[r])
            sequences[r].append(tok)
            logprobs[r].append(float(token_lp[r]))
            if on_token is not None:
                on_token(r, tok)
        if length == history.shape[1]:
            history, mask = _widen(history, 1), _widen(mask, 1)
        history[:, length] = tokens
        if eos.size:
            unfinished &= ~(tokens[:, None] == eos).any(axis=1)
        if should_stop is not None:
            for r in np.flatnonzero(unfinished):
                if should_stop(int(r)):
                    unfinished[r] = False
        if step + 1 == config.max_new_tokens or not unfinished.any():
            break
        logits, row_max = _step_max(
            model, history[:, length : length + 1], mask[:, : length + 1], step + 1
        )
    return GenerationResult(sequences, logprobs, None)


def _widen(buffer: np.ndarray, fill: int) -> np.ndarray:
    """`buffer` (N, W) copied into one of twice the width, the new columns `fill`."""
    wider = np.full((buffer.shape[0], 2 * buffer.shape[1]), fill, dtype=buffer.dtype)
    wider[:, : buffer.shape[1]] = buffer
    return wider


def _length_norm(scores: np.ndarray, length: int, length_penalty: float) -> np.ndarray:
    """HF's ``sum_logprobs / length ** length_penalty`` in float32, for any finite penalty:
    the divisor is kept within float32's range and quotients saturate at -max instead of -inf,
    so scores stay ordered and finite."""
    with np.errstate(over="ignore", under="ignore"):
        divisor = float(np.power(np.float64(length), length_penalty))
        divisor32 = np.float32(min(max(divisor, _FLT_TINY), _FLT_MAX))
        out = (scores / divisor32).astype(np.float32)
    return np.maximum(out, np.float32(-_FLT_MAX))


def _beam_search(
    model: StepModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: GenerationConfig,
    rngs: list[np.random.Generator] | None,
    on_token: Callable[[int, int], None] | None,
    should_stop: ShouldStop | None = None,
) -> GenerationResult:
    """Vectorised HF 4.57 ``_beam_search`` (+ beam sampling), arrays shaped (batch, beam, ...).

    Histories grow by one column per step, so memory follows the tokens actually generated,
    not ``max_new_tokens``.
    """
    n_batch, prompt_len = input_ids.shape
    n_beams = config.num_beams
    max_new = config.max_new_tokens
    eos = np.asarray(config.eos_token_ids, dtype=np.int64)
    n_keep = max(2, 1 + eos.size) * n_beams  # candidates kept per step (HF `beams_to_keep`)
    min_tokens_to_keep = max(2, eos.size + 1)  # HF keeps one non-eos token for beam sampling
    lp_pow = float(config.length_penalty)
    early = config.early_stopping
    batch_ix = np.arange(n_batch)[:, None]

    # Running beams and the finished pool, both (batch, beam, ...).
    running_seq = np.repeat(input_ids[:, None, :], n_beams, axis=1)
    running_tok_lp = np.zeros((n_batch, n_beams, 0), dtype=np.float32)
    running_scores = np.zeros((n_batch, n_beams), dtype=np.float32)
    running_scores[:, 1:] = _NEG  # only beam 0 expands on the first step (identical beams)
    fin_seq = running_seq.copy()
    fin_tok_lp = running_tok_lp.copy()
    fin_len = np.zeros((n_batch, n_beams), dtype=np.int64)
    fin_scores = np.full((n_batch, n_beams), _NEG, dtype=np.float32)
    is_sent_finished = np.zeros((n_batch, n_beams), dtype=bool)
    heuristic_unsatisfied = np.ones((n_batch, 1), dtype=bool)

    logits = _step(model, input_ids, attention_mask, 0)
    model.reorder_cache(np.repeat(np.arange(n_batch), n_beams))
    logits = np.repeat(logits, n_beams, axis=0)
    mask = np.repeat(attention_mask, n_beams, axis=0)
    cur_len = prompt_len
    for step in range(max_new):
        vocab = logits.shape[-1]
        raw_lp = log_softmax(logits)
        flat_hist = running_seq.reshape(n_batch * n_beams, cur_len)
        lp = process_scores(flat_hist, raw_lp, config, min_tokens_to_keep)
        acc = lp.reshape(n_batch, n_beams, vocab) + running_scores[:, :, None]
        acc = acc.reshape(n_batch, n_beams * vocab)
        stuck = ~np.isfinite(acc).any(axis=1)
        if stuck.any():
            raise _all_filtered(np.flatnonzero(stuck), step, config)

        # c. top-K continuations over all beams (or K draws without replacement).
        if rngs is not None:
            keys = acc.astype(np.float64) + _gumbel(rngs, acc.shape)
            cand = _topk(keys, n_keep)[1]
            cand_scores = np.take_along_axis(acc, cand, axis=-1)
        else:
            cand_scores, cand = _topk(acc, n_keep)
        parent = cand // vocab
        tokens = cand % vocab
        cand_seq = np.concatenate([running_seq[batch_ix, parent], tokens[:, :, None]], axis=2)
        cand_lp = np.take_along_axis(raw_lp.reshape(n_batch, n_beams * vocab), cand, axis=-1)
        cand_tok_lp = np.concatenate(
            [running_tok_lp[batch_ix, parent], cand_lp[:, :, None]], axis=2
        )

        # d. stopping criteria per candidate: eos, or the length limit (hits everything).
        hits = np.isin(tokens, eos) if eos.size else np.zeros(tokens.shape, dtype=bool)
        if step + 1 >= max_new:
            hits = np.ones_like(hits)

        # e. best num_beams unfinished candidates keep running.
        cand_running_scores = cand_scores + _mask(hits)
        keep = _topk(cand_running_scores, n_beams)[1]
        running_seq = np.take_along_axis(cand_seq, keep[:, :, None], axis=1)
        running_tok_lp = np.take_along_axis(cand_tok_lp, keep[:, :, None], axis=1)
        running_scores = np.take_along_axis(cand_running_scores, keep, axis=1)
        running_parent = np.take_along_axis(parent, keep, axis=1)

        # f. merge newly finished top-num_beams candidates into the finished pool: HF's ranking
        # (-1e9 masks) with empty slots and excluded candidates below every real score.
        just_finished = hits & (np.arange(cand.shape[1]) < n_beams)[None, :]
        fin_cand = _length_norm(cand_scores, step + 1, lp_pow)
        pool_full = np.all(is_sent_finished, axis=-1, keepdims=True) & (early is True)
        eligible = just_finished & ~pool_full & heuristic_unsatisfied
        rank = np.concatenate(
            [
                np.where(is_sent_finished, fin_scores.astype(np.float64), _EMPTY_SLOT),
                np.where(eligible, fin_cand.astype(np.float64), _EXCLUDED),
            ],
            axis=1,
        )
        pick = _topk(rank, n_beams)[1]
        fin_scores = np.take_along_axis(np.concatenate([fin_scores, fin_cand], axis=1), pick, 1)
        fin_seq = np.concatenate([fin_seq, np.full((n_batch, n_beams, 1), config.pad_token_id)], 2)
        fin_seq = np.take_along_axis(
            np.concatenate([fin_seq, cand_seq], axis=1), pick[:, :, None], axis=1
        )
        fin_tok_lp = np.concatenate([fin_tok_lp, np.zeros((n_batch, n_beams, 1), np.float32)], 2)
        fin_tok_lp = np.take_along_axis(
            np.concatenate([fin_tok_lp, cand_tok_lp], axis=1), pick[:, :, None], axis=1
        )
        fin_len = np.take_along_axis(
            np.concatenate([fin_len, np.full(cand.shape, step + 1, dtype=np.int64)], axis=1),
            pick,
            axis=1,
        )
        is_sent_finished = np.take_along_axis(
            np.concatenate([is_sent_finished, eligible], axis=1), pick, axis=1
        )

        # g. can any batch item still improve?  (HF `_check_early_stop_heuristic`: the best
        # running beam against the worst finished one, or an empty slot)
        cur_len += 1
        best_len = max_new if early == "never" and lp_pow > 0.0 else step + 1
        best_running = _length_norm(running_scores[:, :1], best_len, lp_pow)
        worst_finished = np.min(fin_scores, axis=1, keepdims=True)
        can_improve = ~np.all(is_sent_finished, axis=1, keepdims=True) | (
            best_running > worst_finished
        )
        heuristic_unsatisfied = heuristic_unsatisfied & can_improve
        improvement_possible = bool(np.any(heuristic_unsatisfied))
        exists_open_beam = not (bool(np.all(is_sent_finished)) and early is True)
        valid_continuations = not bool(np.all(hits))
        if not (improvement_possible and exists_open_beam and valid_continuations):
            break
        if should_stop is not None and all(should_stop(b) for b in range(n_batch)):
            break

        model.reorder_cache((batch_ix * n_beams + running_parent).reshape(-1))
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
        last = running_seq[:, :, cur_len - 1].reshape(n_batch * n_beams, 1)
        logits = _step(model, last, mask, step + 1)

    n_ret = config.num_return_sequences
    sequences: list[list[int]] = []
    logprobs: list[list[float]] = []
    scores: list[float] = []
    for b in range(n_batch):
        for j in range(n_ret):
            length = int(fin_len[b, j])
            seq = [int(t) for t in fin_seq[b, j, prompt_len : prompt_len + length]]
            sequences.append(seq)
            logprobs.append([float(v) for v in fin_tok_lp[b, j, :length]])
            scores.append(float(fin_scores[b, j]))
            if on_token is not None:
                for tok in seq:
                    on_token(b * n_ret + j, tok)
    return GenerationResult(sequences, logprobs, scores)


def _mask(flags: np.ndarray) -> np.ndarray:
    """float32 ``flags * -1e9``, HF's way of taking entries out of a top-k."""
    return flags.astype(np.float32) * _NEG
