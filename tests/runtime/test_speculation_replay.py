"""scripts/speculation_ceiling.py --replay steps through recorded greedy agreement as the decoding loop steps
through the models: the same steps, proposals and accepted tokens."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import runtime
from compiler import corpus
from runtime.speculative import FixedDraftLength, GenerationStats
from script_modules import load_script

speculation_ceiling = load_script("speculation_ceiling")

NEW_TOKENS = 48


@pytest.mark.parametrize("length", [1, 3, 6])
def test_replay_takes_the_decoding_loops_steps(shipped_artifact, length):
    generator = runtime.load(shipped_artifact)
    prompts = [generator.encode(prompt) for prompt in corpus.heldout_prompts(6, prompt_chars=200)]
    sequences, confidences = speculation_ceiling.greedy_agreement(generator, prompts, NEW_TOKENS)
    for agrees, sure in zip(sequences, confidences):  # the main model's probability of each of its greedy tokens
        assert sure.shape == agrees.shape and np.all((sure > 0) & (sure <= 1 + 1e-6))
    decoded = [GenerationStats() for _ in prompts]
    for prompt, stats in zip(prompts, decoded):
        list(generator.stream_ids(prompt, max_new_tokens=NEW_TOKENS, draft_length=length, stop_tokens=(), stats=stats))
    costs = speculation_ceiling.CallCosts({n: 1.0 for n in range(1, length + 2)}, [0.1] * length, noise=0.0, outliers=0.0)
    replayed = speculation_ceiling.replay(FixedDraftLength(length), sequences, costs, np.random.default_rng(0))
    assert replayed.tokens == sum(stats.new_tokens for stats in decoded) == len(prompts) * NEW_TOKENS
    assert replayed.verify_calls == sum(stats.verify_calls for stats in decoded)
    assert replayed.lengths == sum((Counter(stats.draft_lengths) for stats in decoded), Counter())
    assert replayed.seconds == pytest.approx(sum(1.0 + 0.1 * k for stats in decoded for k in stats.draft_lengths))


def test_slow_spells_reach_what_the_policy_measures_not_the_bill():
    """--drift: the policy sees every call of a slow spell `drift` times dearer; the replay's seconds, what the
    choices cost at the machine's usual speed, stay those of the same steps without spells."""
    sequences = [np.array([True, True, False] * 20)]

    class Seen(FixedDraftLength):
        def __init__(self):
            super().__init__(2)
            self.verify_seconds = []

        def update(self, length, kept, draft_seconds, verify_seconds, *rest):
            self.verify_seconds.append(verify_seconds)

    steady, spells = (speculation_ceiling.CallCosts({n: 1.0 for n in (1, 2, 3)}, [0.1, 0.1], 0.0, 0.0, drift, dwell) for drift, dwell in ((1.0, 0), (3.0, 4)))
    seen = {}
    for name, costs in (("steady", steady), ("spells", spells)):
        seen[name] = Seen()
        result = speculation_ceiling.replay(seen[name], sequences, costs, np.random.default_rng(0))
        assert result.seconds == pytest.approx(20 * 1.2)  # 20 steps of 2 proposals and a verify
    assert set(seen["steady"].verify_seconds) == {1.0}
    assert set(seen["spells"].verify_seconds) == {1.0, 3.0}


def test_confidence_bands_hold_every_token_once():
    """Each token falls in one band (a probability of exactly 1 in the last), and the bands' shares of the
    disagreements add up to all of them."""
    sequences = [np.array([True, False, True, False, True, True])]
    confidences = [np.array([0.0, 0.29, 0.3, 0.95, 1.0, 0.6])]
    table = speculation_ceiling.confidence_table(sequences, confidences)
    shares, agreement, misses = (list(column.cells) for column in table.columns[1:])
    assert sum(float(share) for share in shares) == pytest.approx(1.0)
    assert sum(float(share) for share in misses) == pytest.approx(1.0)
    assert shares == ["0.333", "0.167", "0.167", "0.000", "0.333"]
    assert agreement == ["0.500", "1.000", "1.000", "-", "0.500"]
    assert misses == ["0.500", "0.000", "0.000", "0.000", "0.500"]
