"""Which test items, in which order, with which demonstrations: OpenFlamingo's draws for a seed.

`open_flamingo/eval/evaluate.py` (2.0.1), per shot count and trial seed:

1. `np.random.seed(seed)`; the test items are `np.random.choice(len(test), num_samples,
   replace=False)` (`utils.prepare_eval_samples`); without RICES the query set is then
   `np.random.choice(len(train), query_set_size, replace=False)` (`utils.get_query_set`);
2. the items are visited in the order of a `DistributedSampler` (shuffle on, its own seed 0,
   one replica): `torch.randperm(len(items))` of a generator seeded 0;
3. `random.seed(seed)`, then per visited item `random.sample(query_set, effective_shots)`
   (`utils.sample_batch_demos_from_query_set`: one call per item, so the batch size does not
   matter).

Reproduced without torch: `np.random.RandomState(seed)` is numpy's global generator after
`np.random.seed(seed)`; `random.Random(seed)` is Python's after `random.seed(seed)`; torch's
CPU `randperm` for n < 2**32 / 20 swaps position i with i + (mt19937() % (n - i)) from an
mt19937 seeded like numpy's legacy `RandomState(0)`, whose raw 32-bit outputs
`randint(0, 2**32, dtype=uint32)` returns (tests check all three against the real calls).
"""

from __future__ import annotations

import random

import numpy as np

from .tasks import EvaluationError

__all__ = ["MAX_SEED", "distributed_sampler_order", "sample_demonstrations", "select_items"]

MAX_SEED = 2**32 - 1  # np.random.RandomState's largest seed


def distributed_sampler_order(n: int, seed: int = 0) -> list[int]:
    """`list(DistributedSampler(range(n), num_replicas=1, rank=0, seed=seed))` (shuffled)."""
    if n >= 2**32 // 20:
        raise EvaluationError(f"{n} test items: more than torch's small-n randperm replica covers")
    draws = np.random.RandomState(seed).randint(0, 2**32, size=max(n - 1, 0), dtype=np.uint32)
    order = list(range(n))
    for i in range(n - 1):
        j = i + int(draws[i]) % (n - i)
        order[i], order[j] = order[j], order[i]
    return order


def select_items(
    n_test: int, n_train: int, num_samples: int, query_set_size: int | None, seed: int
) -> tuple[list[int], list[int] | None]:
    """(test indices in the order they are evaluated, query-set train indices or None).

    `num_samples <= 0` takes every test item (evaluate.py's `-1`); `query_set_size=None` draws
    no query set (RICES).
    """
    count = n_test if num_samples <= 0 else num_samples
    if count > n_test:
        raise EvaluationError(
            f"--num-samples {num_samples} exceeds the {n_test} test records (-1: all of them)"
        )
    state = np.random.RandomState(seed)
    chosen = state.choice(n_test, count, replace=False)
    query_set = None
    if query_set_size is not None:
        if query_set_size > n_train:
            raise EvaluationError(
                f"--query-set-size {query_set_size} exceeds the {n_train} train records the "
                "demonstrations are drawn from"
            )
        query_set = [int(i) for i in state.choice(n_train, query_set_size, replace=False)]
    return [int(chosen[i]) for i in distributed_sampler_order(count)], query_set


def sample_demonstrations(
    query_set_size: int, shots: int, items: int, seed: int
) -> list[list[int]]:
    """Per visited item, the positions in the query set of its demonstrations, in prompt
    order (`random.sample(query_set, shots)` after `random.seed(seed)`)."""
    if shots > query_set_size:
        raise EvaluationError(
            f"{shots} demonstrations cannot be drawn from a query set of {query_set_size}"
        )
    rng = random.Random(seed)
    return [rng.sample(range(query_set_size), shots) for _ in range(items)]
