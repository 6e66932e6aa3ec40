"""runtime.generation must reproduce Hugging Face ``generate`` (transformers 4.57.6) exactly.

Tiny random HF LMs (Llama, GPT-NeoX) are wrapped in a test-side ``StepModel`` that drives the
HF model with a ``DynamicCache``, so the only thing under test is the numpy search itself.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from runtime.generation import (  # noqa: E402
    GenerationConfig,
    GenerationResult,
    generate,
    process_scores,
)

REPO = Path(__file__).resolve().parents[2]
VOCAB = 97
PAD = 0


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The models are tiny: one intra-op thread is faster and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class HFStepModel:
    """StepModel over an HF causal LM: KV cache in a DynamicCache, positions from the mask."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache = None
        self.calls: list[tuple[int, ...]] = []
        self.fed: list[np.ndarray] = []

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.calls.append(tuple(input_ids.shape))
        self.fed.append(input_ids.copy())
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64))
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1] :]
        with torch.no_grad():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = out.past_key_values
        return out.logits[:, -1].float().numpy()

    def reorder_cache(self, index: np.ndarray) -> None:
        self.cache.reorder_cache(torch.from_numpy(np.asarray(index, dtype=np.int64)))


def _cfg(**kw: object) -> GenerationConfig:
    """A config for the HF comparisons: no eos and pad PAD unless given (HF's model defaults
    here, see _fresh_generation_config)."""
    kw.setdefault("eos_token_ids", ())
    kw.setdefault("pad_token_id", PAD)
    return GenerationConfig(**kw)  # type: ignore[arg-type]


def _fresh_generation_config(model: torch.nn.Module) -> None:
    """Drop config-derived defaults (bos/eos ids) so only what a test passes is in effect."""
    model.generation_config = transformers.GenerationConfig(pad_token_id=PAD)


def _llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.1,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    _fresh_generation_config(model)
    return model


def _neox(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        initializer_range=0.1,
    )
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    _fresh_generation_config(model)
    return model


BOOSTED_EOS = 2
# model name -> (builder, strength of the eos boost that makes beams finish early)
MODELS = {
    "llama0": (lambda: _llama(0), 2.0),
    "llama1": (lambda: _llama(1), 3.0),
    "neox": (lambda: _neox(2), 2.0),
}


def _boost_eos(model: torch.nn.Module, alpha: float, token: int = BOOSTED_EOS) -> None:
    """Point the output row of ``token`` along the mean final hidden state, so that token gets
    a few percent of the probability everywhere and beam search can finish every row early."""
    ids = torch.randint(3, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1]
        mean = hidden.reshape(-1, hidden.shape[-1]).mean(0)
        model.get_output_embeddings().weight[token] = alpha * mean / mean.norm() ** 2


def _prompt(seed: int, lengths: tuple[int, ...] = (5, 8, 3)) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded batch with different real lengths."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = rng.integers(3, VOCAB, n)
        mask[r, width - n :] = 1
    return ids, mask


def _hf(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, cfg: GenerationConfig):
    """HF generate; ``.n_forward`` records how many forward passes it made."""
    calls: list[int] = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            out = model.generate(
                torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                max_new_tokens=cfg.max_new_tokens,
                num_beams=cfg.num_beams,
                do_sample=False,
                length_penalty=cfg.length_penalty,
                early_stopping=cfg.early_stopping,
                no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                num_return_sequences=cfg.num_return_sequences,
                eos_token_id=list(cfg.eos_token_ids) or None,
                pad_token_id=cfg.pad_token_id,
                return_dict_in_generate=True,
                output_scores=True,
                output_logits=True,
            )
    finally:
        hook.remove()
    out.n_forward = len(calls)
    return out


def _trim(row: list[int], eos: tuple[int, ...]) -> list[int]:
    """HF pads finished rows; a generation ends at its first eos (eos never occurs earlier)."""
    for i, tok in enumerate(row):
        if tok in eos:
            return row[: i + 1]
    return row


def _ours(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, cfg: GenerationConfig):
    step_model = HFStepModel(model)
    streamed: list[tuple[int, int]] = []
    res = generate(step_model, ids, mask, cfg, on_token=lambda r, t: streamed.append((r, t)))
    return res, step_model, streamed


@pytest.fixture(scope="module", params=sorted(MODELS))
def lm(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, int]:
    """A tiny model plus an eos id it actually likes to produce under beam search."""
    build, alpha = MODELS[request.param]
    model = build()
    _boost_eos(model, alpha)
    ids, mask = _prompt(7)
    cfg = _cfg(max_new_tokens=16, num_beams=4)
    out = _hf(model, ids, mask, cfg)
    counts = Counter(out.sequences[:, ids.shape[1] + 2 :].flatten().tolist())
    counts.pop(PAD, None)
    counts.pop(BOOSTED_EOS, None)
    return model, counts.most_common(1)[0][0]


def test_greedy_matches_hf(lm: tuple[torch.nn.Module, int]) -> None:
    model, eos = lm
    ids, mask = _prompt(7)
    hit = 0
    for cfg in (
        _cfg(max_new_tokens=14),
        _cfg(max_new_tokens=14, eos_token_ids=(eos,)),
        _cfg(max_new_tokens=16, eos_token_ids=(BOOSTED_EOS,), pad_token_id=5),
        _cfg(max_new_tokens=14, eos_token_ids=(eos, 2), no_repeat_ngram_size=2),
    ):
        out = _hf(model, ids, mask, cfg)
        res, step_model, streamed = _ours(model, ids, mask, cfg)
        gen = out.sequences[:, ids.shape[1] :].tolist()
        assert res.sequences == [_trim(g, cfg.eos_token_ids) for g in gen]
        assert res.scores is None
        hit += sum(s[-1] in cfg.eos_token_ids for s in res.sequences)
        # streamed tokens are exactly the result, row by row in order
        assert [[t for r2, t in streamed if r2 == r] for r in range(3)] == res.sequences
        # prefill gets the whole prompt, then one token per step; HF stops at the same step
        assert len(step_model.calls) == out.n_forward
        assert step_model.calls[0] == ids.shape
        assert all(c == (3, 1) for c in step_model.calls[1:])
        for r, seq in enumerate(res.sequences):  # finished rows are fed pad, like HF
            fed = [int(f[r, 0]) for f in step_model.fed[1:]]
            assert fed[: len(seq)] == seq[: len(fed)]
            assert all(t == cfg.pad_token_id for t in fed[len(seq) :])
        # logprobs = log_softmax of the raw logits at each step
        for r, seq in enumerate(res.sequences):
            ref = [
                torch.log_softmax(out.logits[t][r].float(), -1)[tok].item()
                for t, tok in enumerate(seq)
            ]
            np.testing.assert_allclose(res.logprobs[r], ref, atol=1e-5)
    assert hit > 0, "eos never hit: the test would not cover early finishing"


BEAM_CASES = [
    dict(num_beams=3, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, length_penalty=1.0, early_stopping=True),
    dict(num_beams=3, length_penalty=0.6, early_stopping=True, num_return_sequences=2),
    dict(num_beams=4, length_penalty=2.0, early_stopping=False, num_return_sequences=2),
    dict(num_beams=4, length_penalty=0.6, early_stopping="never"),
    dict(num_beams=3, length_penalty=2.0, early_stopping=True, no_repeat_ngram_size=2),
    dict(num_beams=4, length_penalty=1.0, early_stopping=False, no_repeat_ngram_size=2),
]


def test_beam_search_matches_hf(lm: tuple[torch.nn.Module, int]) -> None:
    model, eos = lm
    ids, mask = _prompt(7)
    ended_eos = ended_len = stopped_early = 0
    for i, case in enumerate(BEAM_CASES):
        max_new = 12 + 2 * (i % 4)
        for eos_ids in ((), (eos,), (BOOSTED_EOS, eos)):
            cfg = _cfg(max_new_tokens=max_new, eos_token_ids=eos_ids, **case)
            out = _hf(model, ids, mask, cfg)
            res, step_model, streamed = _ours(model, ids, mask, cfg)
            gen = [_trim(g, eos_ids) for g in out.sequences[:, ids.shape[1] :].tolist()]
            assert res.sequences == gen, cfg
            np.testing.assert_allclose(res.scores, out.sequences_scores.numpy(), atol=1e-4)
            n_ret = cfg.num_return_sequences
            assert len(res.sequences) == 3 * n_ret
            assert len(step_model.calls) == out.n_forward, cfg  # same done criteria
            assert step_model.calls[0] == ids.shape
            assert all(c == (3 * cfg.num_beams, 1) for c in step_model.calls[1:])
            assert [t for _, t in streamed] == [t for s in res.sequences for t in s]
            stopped_early += len(step_model.calls) < max_new
            for seq, lps, score in zip(res.sequences, res.logprobs, res.scores):
                assert len(lps) == len(seq)
                if seq[-1] in eos_ids:
                    ended_eos += 1
                else:
                    assert len(seq) == max_new
                    ended_len += 1
                if not cfg.no_repeat_ngram_size:  # unprocessed: score = sum(lp) / len**lp
                    expect = sum(lps) / len(seq) ** cfg.length_penalty
                    assert score == pytest.approx(expect, abs=1e-4)
    # both ways of ending a hypothesis, and whole searches cut short by the done criteria
    assert ended_eos > 0 and ended_len > 0 and stopped_early > 0


def test_beam_search_eos_heavy() -> None:
    """With eos dominating, more than num_beams of the top 2*num_beams candidates finish, so the
    extra candidates HF keeps per eos id (``max(2, 1 + n_eos) * num_beams``) must match."""
    model = _llama(0)
    for token, alpha in ((BOOSTED_EOS, 6.0), (7, 5.5), (11, 5.0)):  # distinct: no exact ties
        _boost_eos(model, alpha, token)
    ids, mask = _prompt(11)
    for case in BEAM_CASES[:5]:
        for eos_ids in ((BOOSTED_EOS,), (BOOSTED_EOS, 7, 11)):
            cfg = _cfg(max_new_tokens=12, eos_token_ids=eos_ids, **case)
            out = _hf(model, ids, mask, cfg)
            res, step_model, _ = _ours(model, ids, mask, cfg)
            gen = [_trim(g, eos_ids) for g in out.sequences[:, ids.shape[1] :].tolist()]
            assert res.sequences == gen, cfg
            np.testing.assert_allclose(res.scores, out.sequences_scores.numpy(), atol=1e-4)
            assert len(step_model.calls) == out.n_forward, cfg


def _hf_processors(cfg: GenerationConfig, min_keep: int):
    lp = transformers.generation.logits_process
    procs = []
    if cfg.no_repeat_ngram_size:
        procs.append(lp.NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.temperature != 1.0:
        procs.append(lp.TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        procs.append(lp.TopKLogitsWarper(cfg.top_k, min_tokens_to_keep=min_keep))
    if cfg.top_p < 1.0:
        procs.append(lp.TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=min_keep))
    return transformers.LogitsProcessorList(procs)


@pytest.mark.parametrize(
    ("kwargs", "min_keep"),
    [
        (dict(no_repeat_ngram_size=2), 1),
        (dict(no_repeat_ngram_size=3), 1),
        (dict(no_repeat_ngram_size=1), 1),
        (dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.9), 1),
        (dict(do_sample=True, top_k=0, top_p=0.5, no_repeat_ngram_size=2), 2),
        (dict(do_sample=True, top_k=1, top_p=0.3), 3),
        (dict(do_sample=True, temperature=1.3, top_k=40, top_p=1.0), 1),
    ],
)
def test_processors_match_hf(kwargs: dict, min_keep: int) -> None:
    cfg = GenerationConfig(**kwargs)
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, 6, (8, 12))  # small alphabet: plenty of repeated n-grams
    scores = (rng.standard_normal((8, 20)) * 3).astype(np.float32)
    ours = process_scores(seqs, scores, cfg, min_keep)
    ref = _hf_processors(cfg, min_keep)(torch.from_numpy(seqs), torch.from_numpy(scores.copy()))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()))
    finite = np.isfinite(ours)
    np.testing.assert_allclose(ours[finite], ref.numpy()[finite], rtol=1e-6)


def test_sampling_reproducible_and_top_k1_is_greedy(lm: tuple[torch.nn.Module, int]) -> None:
    model, eos = lm
    ids, mask = _prompt(3)
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, seed=123, eos_token_ids=(eos,))
    a = generate(HFStepModel(model), ids, mask, cfg)
    b = generate(HFStepModel(model), ids, mask, cfg)
    assert a == b
    others = [
        generate(HFStepModel(model), ids, mask, GenerationConfig(**{**vars(cfg), "seed": s}))
        for s in (1, 2)
    ]
    assert any(o.sequences != a.sequences for o in others)
    greedy = generate(HFStepModel(model), ids, mask, GenerationConfig(max_new_tokens=12))
    top1 = GenerationConfig(max_new_tokens=12, do_sample=True, top_k=1, seed=5, temperature=0.8)
    assert generate(HFStepModel(model), ids, mask, top1).sequences == greedy.sequences


def test_beam_sampling_reproducible(lm: tuple[torch.nn.Module, int]) -> None:
    model, eos = lm
    ids, mask = _prompt(3)
    cfg = GenerationConfig(
        max_new_tokens=10, num_beams=3, do_sample=True, seed=9, eos_token_ids=(eos,)
    )
    a = generate(HFStepModel(model), ids, mask, cfg)
    assert a == generate(HFStepModel(model), ids, mask, cfg)
    assert a.scores is not None and len(a.sequences) == 3


def test_beam_sampling_keeps_a_non_eos_token() -> None:
    """HF raises min_tokens_to_keep to n_eos + 1 (at least 2) for beam sampling, so top_k=1 still
    leaves two tokens: the two returned beams are the two most likely tokens."""
    logits = np.array([0.0, 3.0, 1.0, 2.5, -1.0])
    cfg = GenerationConfig(
        max_new_tokens=1,
        num_beams=2,
        num_return_sequences=2,
        do_sample=True,
        top_k=1,
        eos_token_ids=(4,),
        seed=0,
    )
    ids = np.ones((1, 2), dtype=np.int64)
    res = generate(FixedLogits(logits), ids, np.ones_like(ids), cfg)
    assert sorted(res.sequences) == [[1], [3]]


class FixedLogits:
    """StepModel that always returns the same logits row (for distribution tests)."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits.astype(np.float32)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.logits, (input_ids.shape[0], self.logits.size)).copy()

    def reorder_cache(self, index: np.ndarray) -> None:
        pass


def _filtered_softmax(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
    """Independent reference: temperature, keep top-k, then the smallest top set with mass
    >= top_p (HF removes tokens whose ascending cumulative mass is <= 1 - top_p)."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x)
    keep = np.zeros(x.size, dtype=bool)
    keep[order[:top_k]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    asc = np.argsort(p)
    removed = np.cumsum(p[asc]) <= 1.0 - top_p
    p[asc[removed]] = 0.0
    return p / p.sum()


def test_sampling_distribution() -> None:
    logits = np.array([2.0, 1.5, 1.4, 0.3, -0.2, 0.9, -1.0, 1.1, 0.0, -3.0])
    cfg = GenerationConfig(
        max_new_tokens=1, do_sample=True, temperature=0.7, top_k=7, top_p=0.85, seed=42
    )
    n = 40_000
    ids = np.ones((n, 2), dtype=np.int64)
    res = generate(FixedLogits(logits), ids, np.ones_like(ids), cfg, seeds=range(n))
    freq = np.bincount([s[0] for s in res.sequences], minlength=logits.size) / n
    expect = _filtered_softmax(logits, 0.7, 7, 0.85)
    assert np.all(freq[expect == 0] == 0)
    assert (expect == 0).sum() >= 4  # both filters actually removed something
    sigma = np.sqrt(expect * (1 - expect) / n)
    assert np.all(np.abs(freq - expect) <= 5 * sigma + 1e-12)


def test_validation_and_empty() -> None:
    ids = np.ones((2, 3), dtype=np.int64)
    model = FixedLogits(np.zeros(5))
    with pytest.raises(ValueError):
        generate(model, ids, ids, GenerationConfig(num_return_sequences=2))
    with pytest.raises(ValueError):
        generate(model, ids, ids, GenerationConfig(num_beams=2, early_stopping="sometimes"))
    res = generate(model, ids, ids, GenerationConfig(max_new_tokens=0))
    assert res == GenerationResult([[], []], [[], []], None)


def test_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import runtime.generation as g\n"
        "assert 'torch' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n"
        "print(g.generate.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "generate"
