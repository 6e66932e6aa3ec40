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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "ShouldStop",
    "StepModel",
    "generate",
    "log_softmax",
    "process_scores",
]

ShouldStop = Callable[[int], bool]

_NEG = np.float32(-1.0e9)  # HF's "very large negative" beam mask value (float32-exact)


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


@dataclass
class GenerationConfig:
    """Subset of HF ``GenerationConfig`` that the Flamingo demo and oracle use."""

    max_new_tokens: int = 20
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # False, True or "never" (HF semantics)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    no_repeat_ngram_size: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    num_return_sequences: int = 1  # beams only, <= num_beams

    def validate(self) -> None:
        """Reject settings HF would reject (or that this implementation does not support)."""
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError("early_stopping must be True, False or 'never'")
        if self.num_return_sequences < 1 or self.num_return_sequences > self.num_beams:
            raise ValueError("num_return_sequences must be in [1, num_beams] (beam search only)")
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError("temperature must be > 0")
            if self.top_k < 0:
                raise ValueError("top_k must be >= 0 (0 = off)")
            if not 0.0 <= self.top_p <= 1.0:
                raise ValueError("top_p must be in [0, 1]")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0")


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
    cum = np.cumsum(weights, axis=-1) / weights.sum(axis=-1, keepdims=True)
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[:, -min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(-np.inf), scores).astype(np.float32)


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
            out = (out / np.float32(config.temperature)).astype(np.float32)
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
) -> GenerationResult:
    """Decode continuations of a left-padded prompt batch with HF 4.57 ``generate`` semantics.

    Greedy / sampling stream ``on_token(row, token_id)`` as tokens are chosen. Beam search only
    knows its winners at the end, so it calls ``on_token(out_row, token_id)`` once per token of
    every returned sequence after the search (``out_row = row * num_return_sequences + j``).

    ``should_stop(row)`` (e.g. a client that went away) is asked after every step: greedy /
    sampling finish that row as if it had hit eos (the others go on); beam search stops when
    every row asks (its result is then whatever the finished pool holds).
    """
    config.validate()
    input_ids = np.asarray(input_ids, dtype=np.int64)
    attention_mask = np.asarray(attention_mask, dtype=np.int64)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError("input_ids and attention_mask must both be (N, T)")
    n_rows = input_ids.shape[0]
    n_ret = config.num_return_sequences if config.num_beams > 1 else 1
    if config.max_new_tokens == 0:
        empty: list[list[int]] = [[] for _ in range(n_rows * n_ret)]
        scores = [0.0] * len(empty) if config.num_beams > 1 else None
        return GenerationResult(empty, [[] for _ in empty], scores)
    if config.num_beams == 1:
        return _greedy_or_sample(model, input_ids, attention_mask, config, on_token, should_stop)
    return _beam_search(model, input_ids, attention_mask, config, on_token, should_stop)


def _rng(config: GenerationConfig) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(config.seed))


def _step(model: StepModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    logits = np.asarray(model.step(ids, mask), dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != ids.shape[0]:
        raise ValueError(f"StepModel.step must return (N, V) logits, got {logits.shape}")
    return logits


def _greedy_or_sample(
    model: StepModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: GenerationConfig,
    on_token: Callable[[int, int], None] | None,
    should_stop: ShouldStop | None = None,
) -> GenerationResult:
    """HF ``_sample``: processors on raw logits, argmax or categorical draw, pad finished rows."""
    n_rows = input_ids.shape[0]
    eos = np.asarray(config.eos_token_ids, dtype=np.int64)
    rng = _rng(config) if config.do_sample else None
    history = input_ids
    mask = attention_mask
    unfinished = np.ones(n_rows, dtype=bool)
    sequences: list[list[int]] = [[] for _ in range(n_rows)]
    logprobs: list[list[float]] = [[] for _ in range(n_rows)]

    logits = _step(model, input_ids, mask)
    for step in range(config.max_new_tokens):
        raw_lp = log_softmax(logits)
        scores = process_scores(history, logits, config)
        if rng is not None:
            keys = scores.astype(np.float64) + rng.gumbel(size=scores.shape)
            tokens = np.argmax(keys, axis=-1)
        else:
            tokens = np.argmax(scores, axis=-1)
        if eos.size or should_stop is not None:
            tokens = np.where(unfinished, tokens, config.pad_token_id)
        for r in np.flatnonzero(unfinished):
            tok = int(tokens[r])
            sequences[r].append(tok)
            logprobs[r].append(float(raw_lp[r, tok]))
            if on_token is not None:
                on_token(int(r), tok)
        history = np.concatenate([history, tokens[:, None].astype(np.int64)], axis=1)
        if eos.size:
            unfinished &= ~np.isin(tokens, eos)
        if should_stop is not None:
            for r in np.flatnonzero(unfinished):
                if should_stop(int(r)):
                    unfinished[r] = False
        if step + 1 == config.max_new_tokens or not unfinished.any():
            break
        mask = np.concatenate([mask, np.ones((n_rows, 1), dtype=mask.dtype)], axis=1)
        logits = _step(model, tokens[:, None].astype(np.int64), mask)
    return GenerationResult(sequences, logprobs, None)


def _beam_search(
    model: StepModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: GenerationConfig,
    on_token: Callable[[int, int], None] | None,
    should_stop: ShouldStop | None = None,
) -> GenerationResult:
    """Vectorised HF 4.57 ``_beam_search`` (+ beam sampling), arrays shaped (batch, beam, ...)."""
    n_batch, prompt_len = input_ids.shape
    n_beams = config.num_beams
    max_new = config.max_new_tokens
    max_length = prompt_len + max_new
    eos = np.asarray(config.eos_token_ids, dtype=np.int64)
    n_keep = max(2, 1 + eos.size) * n_beams  # candidates kept per step (HF `beams_to_keep`)
    top_num_beam_mask = np.arange(n_keep) < n_beams
    min_tokens_to_keep = max(2, eos.size + 1)  # HF keeps one non-eos token for beam sampling
    lp_pow = float(config.length_penalty)
    early = config.early_stopping
    rng = _rng(config) if config.do_sample else None
    batch_ix = np.arange(n_batch)[:, None]

    # Running beams and the finished pool, both (batch, beam, ...).
    running_seq = np.full((n_batch, n_beams, max_length), config.pad_token_id, dtype=np.int64)
    running_seq[:, :, :prompt_len] = input_ids[:, None, :]
    running_tok_lp = np.zeros((n_batch, n_beams, max_new), dtype=np.float32)
    running_scores = np.zeros((n_batch, n_beams), dtype=np.float32)
    running_scores[:, 1:] = _NEG  # only beam 0 expands on the first step (identical beams)
    fin_seq = running_seq.copy()
    fin_tok_lp = running_tok_lp.copy()
    fin_len = np.zeros((n_batch, n_beams), dtype=np.int64)
    fin_scores = np.full((n_batch, n_beams), _NEG, dtype=np.float32)
    is_sent_finished = np.zeros((n_batch, n_beams), dtype=bool)
    heuristic_unsatisfied = np.ones((n_batch, 1), dtype=bool)

    logits = _step(model, input_ids, attention_mask)
    model.reorder_cache(np.repeat(np.arange(n_batch), n_beams))
    logits = np.repeat(logits, n_beams, axis=0)
    mask = np.repeat(attention_mask, n_beams, axis=0)
    cur_len = prompt_len
    for step in range(max_new):
        vocab = logits.shape[-1]
        raw_lp = log_softmax(logits)
        flat_hist = running_seq[:, :, :cur_len].reshape(n_batch * n_beams, cur_len)
        lp = process_scores(flat_hist, raw_lp, config, min_tokens_to_keep)
        acc = lp.reshape(n_batch, n_beams, vocab) + running_scores[:, :, None]
        acc = acc.reshape(n_batch, n_beams * vocab)

        # c. top-K continuations over all beams (or K draws without replacement).
        if rng is not None:
            keys = acc.astype(np.float64) + rng.gumbel(size=acc.shape)
            cand = _topk(keys, n_keep)[1]
            cand_scores = np.take_along_axis(acc, cand, axis=-1)
        else:
            cand_scores, cand = _topk(acc, n_keep)
        parent = cand // vocab
        tokens = cand % vocab
        cand_seq = running_seq[batch_ix, parent]  # fancy indexing copies
        cand_seq[:, :, cur_len] = tokens
        cand_tok_lp = running_tok_lp[batch_ix, parent]
        cand_tok_lp[:, :, step] = np.take_along_axis(
            raw_lp.reshape(n_batch, n_beams * vocab), cand, axis=-1
        )

        # d. stopping criteria per candidate: eos, or the length limit (hits everything).
        hits = np.isin(tokens, eos) if eos.size else np.zeros(tokens.shape, dtype=bool)
        if cur_len + 1 >= max_length:
            hits = np.ones_like(hits)

        # e. best num_beams unfinished candidates keep running.
        cand_running_scores = cand_scores + _mask(hits)
        keep = _topk(cand_running_scores, n_beams)[1]
        running_seq = np.take_along_axis(cand_seq, keep[:, :, None], axis=1)
        running_tok_lp = np.take_along_axis(cand_tok_lp, keep[:, :, None], axis=1)
        running_scores = np.take_along_axis(cand_running_scores, keep, axis=1)
        running_parent = np.take_along_axis(parent, keep, axis=1)

        # f. merge newly finished top-num_beams candidates into the finished pool.
        just_finished = hits & top_num_beam_mask[None, :]
        fin_cand = (cand_scores / np.float32((cur_len + 1 - prompt_len) ** lp_pow)).astype(
            np.float32
        )
        pool_full = np.all(is_sent_finished, axis=-1, keepdims=True) & (early is True)
        fin_cand = fin_cand + _mask(pool_full)
        fin_cand = fin_cand + _mask(~heuristic_unsatisfied)
        fin_cand = fin_cand + _mask(~just_finished)
        merged_scores = np.concatenate([fin_scores, fin_cand], axis=1)
        pick = _topk(merged_scores, n_beams)[1]
        fin_scores = np.take_along_axis(merged_scores, pick, axis=1)
        fin_seq = np.take_along_axis(
            np.concatenate([fin_seq, cand_seq], axis=1), pick[:, :, None], axis=1
        )
        fin_tok_lp = np.take_along_axis(
            np.concatenate([fin_tok_lp, cand_tok_lp], axis=1), pick[:, :, None], axis=1
        )
        fin_len = np.take_along_axis(
            np.concatenate([fin_len, np.full(cand.shape, step + 1, dtype=np.int64)], axis=1),
            pick,
            axis=1,
        )
        is_sent_finished = np.take_along_axis(
            np.concatenate([is_sent_finished, just_finished], axis=1), pick, axis=1
        )

        # g. can any batch item still improve?  (HF `_check_early_stop_heuristic`)
        cur_len += 1
        if early == "never" and lp_pow > 0.0:
            best_len = max_length - prompt_len
        else:
            best_len = cur_len - prompt_len
        best_running = running_scores[:, :1] / np.float32(best_len**lp_pow)
        worst_finished = np.where(is_sent_finished, np.min(fin_scores, axis=1, keepdims=True), _NEG)
        heuristic_unsatisfied = heuristic_unsatisfied & np.any(
            best_running > worst_finished, axis=-1, keepdims=True
        )
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
        logits = _step(model, last, mask)

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
