"""KV caches: a batch's rows decode exactly as each would alone, after uneven growth and rollbacks."""

from __future__ import annotations

import numpy as np

import runtime
from runtime.decoder import BatchKvCache

TOLERANCE = 1e-4  # a batched call sums in a different order than a single one


def _alone(generator, history: list[int]) -> np.ndarray:
    return generator.main.new_cache(64).feed(history)[-1]


def test_batch_rows_match_their_own_caches_after_uneven_rollbacks(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    prompts = [list(range(5, 17)), list(range(40, 43)), list(range(80, 100))]
    batch = BatchKvCache(generator.main, len(prompts), 64)
    first = batch.prefill(prompts)
    for row, prompt in enumerate(prompts):
        assert np.abs(first[row] - _alone(generator, prompt)).max() <= TOLERANCE

    rounds = [
        [prompts[0] + [7, 8, 9], prompts[1] + [3], prompts[2] + [11, 12]],  # rows grow by 3, 1 and 2 tokens
        [prompts[0] + [7, 21], prompts[1] + [3, 4, 5], prompts[2][:-3] + [30]],  # then roll back by 2, 0 and 5
    ]
    for histories in rounds:
        pending = {row: batch.sync(row, history) for row, history in enumerate(histories)}
        logits = batch.feed(pending)
        assert [batch.ids[row] for row in range(len(prompts))] == histories
        for row, history in enumerate(histories):
            assert np.abs(logits[row][-1] - _alone(generator, history)).max() <= TOLERANCE
