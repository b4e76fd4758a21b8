"""Sampling distributions, and the speculative acceptance rule keeping the main model's distribution exactly."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.sampling import SamplingParams, distribution, draw, one_hot
from runtime.speculative import Proposal, accept, judge

LOGITS = np.array([2.0, 1.0, 0.5, -1.0, 0.0])


def test_greedy_is_one_hot_of_argmax():
    probs = distribution(LOGITS, SamplingParams())
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert draw(probs, np.random.default_rng(0)) == 0


def test_temperature_top_k_top_p():
    full = distribution(LOGITS, SamplingParams(temperature=1.0))
    assert np.isclose(full.sum(), 1.0) and np.allclose(full, np.exp(LOGITS) / np.exp(LOGITS).sum())
    top2 = distribution(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert np.count_nonzero(top2) == 2 and top2[0] > top2[1] > 0
    nucleus = distribution(LOGITS, SamplingParams(temperature=1.0, top_p=0.7))
    assert np.flatnonzero(nucleus).tolist() == [0, 1]  # 0.55 < 0.7 <= 0.55 + 0.20
    cold = distribution(LOGITS, SamplingParams(temperature=0.1))
    assert cold[0] > 0.99


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def _first_token_frequencies(rule, p, q, draws, rng):
    counts = np.zeros(p.size)
    for _ in range(draws):
        proposal = Proposal([draw(q, rng)], [q])
        kept, bonus = rule(proposal, [p, p], rng)
        counts[proposal.tokens[0] if kept else bonus] += 1
    return counts


def _chi_square(counts, p):
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


def _always_accept(proposal, target, rng):
    return len(proposal.tokens), draw(target[-1], rng)


def test_speculative_sampling_keeps_the_target_distribution():
    """Chi-square over 20,000 draws, 4 degrees of freedom: the 0.1% critical value is 18.47."""
    rng = np.random.default_rng(1234)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.1, 0.4, 0.1, 0.3, 0.1])  # a draft that disagrees a lot
    counts = _first_token_frequencies(accept, p, q, 20000, rng)
    assert _chi_square(counts, p) < 18.47
    broken = _first_token_frequencies(_always_accept, p, q, 20000, rng)
    assert _chi_square(broken, p) > 18.47  # accepting every draft token gives the draft's distribution


def test_greedy_judging_is_the_acceptance_rule_on_one_hot_distributions():
    """judge() skips the distributions when greedy; it must keep and replace exactly what accept() would."""
    rng = np.random.default_rng(7)
    greedy = SamplingParams()
    for _ in range(300):
        logits = rng.integers(0, 4, size=(4, 6)).astype(np.float32)  # small integers: ties are common
        proposed = [int(rng.integers(0, 6)) if rng.random() < 0.5 else int(np.argmax(row)) for row in logits[:3]]
        one_hot = Proposal(proposed, [distribution(np.eye(6)[token], greedy) for token in proposed])
        expected = accept(one_hot, [distribution(row, greedy) for row in logits], rng)
        assert judge(Proposal(proposed, []), logits, greedy, rng) == expected


def test_speculative_sampling_of_a_copied_token_keeps_the_target_distribution():
    """A prompt-lookup proposal is certain (one-hot q): kept with the main model's probability of it, else
    replaced from the main model's distribution without it. Chi-square as above."""
    rng = np.random.default_rng(99)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    certain = one_hot(3, p.size)
    assert _chi_square(_first_token_frequencies(accept, p, certain, 20000, rng), p) < 18.47
    assert _chi_square(_first_token_frequencies(_always_accept, p, certain, 20000, rng), p) > 18.47
