"""Prompt lookup: what it proposes, and that decoding with its proposals stays the main model's own output."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from compiler import corpus
from runtime.prompt_lookup import PromptLookup

PROMPTS = corpus.heldout_prompts(6, prompt_chars=200)
NEW_TOKENS = 48


def _brute_force(tokens: list[int], length: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The definition, by scanning: the longest n-gram ending the sequence that occurred earlier; the tokens
    after its latest earlier occurrence, in the sequence as it would go on if it repeated from there."""
    for size in range(max_ngram, min_ngram - 1, -1):
        tail = tokens[len(tokens) - size :]
        for start in range(len(tokens) - size - 1, -1, -1):
            if len(tokens) > size and tokens[start : start + size] == tail:
                after, period = start + size, len(tokens) - (start + size)
                repeated = list(tokens)
                while len(repeated) < after + length:
                    repeated.append(repeated[-period])
                return repeated[after : after + length]
    return []


def test_proposes_what_followed_the_latest_longest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    assert lookup.propose([1, 2, 3, 9, 9, 1, 2, 3], 4) == [9, 9, 1, 2]  # the trigram 1 2 3 came before
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    assert lookup.propose([5, 2, 3, 7, 6, 2, 3, 8, 1, 2, 3], 2) == [8, 1]  # the latest of two earlier 2 3, not the first
    assert PromptLookup().propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert PromptLookup(max_ngram=1, min_ngram=1).propose([4, 1, 4], 5) == [1, 4, 1, 4, 1]  # past the end: the run repeats
    assert PromptLookup(max_ngram=2, min_ngram=2).propose([7, 7, 7], 3) == [7, 7, 7]


def test_a_growing_sequence_gets_what_a_fresh_lookup_would_propose():
    """The index is extended as the sequence grows; it must agree with the definition at every length."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        tokens = [int(t) for t in rng.integers(0, 4, size=60)]  # a small vocabulary: matches of every size
        lookup = PromptLookup(max_ngram=3, min_ngram=1)
        end = 1
        while end < len(tokens):
            assert lookup.propose(tokens[:end], 3) == _brute_force(tokens[:end], 3, 3, 1)
            end += int(rng.integers(1, 4))  # steps commit one to several tokens


def test_bad_ngram_sizes_are_refused():
    with pytest.raises(ValueError, match="n-gram sizes"):
        PromptLookup(max_ngram=2, min_ngram=3)


def _tokens(steps) -> list[int]:
    return [token for step in steps for token in step]


@pytest.mark.parametrize("draft_length", [1, 4, "auto"])
def test_prompt_lookup_decoding_is_lossless_and_proposes(shipped_artifact, draft_length):
    generator = runtime.load(shipped_artifact)
    tokens = calls = 0
    for prompt in PROMPTS:
        ids = generator.encode(prompt)
        reference = _tokens(generator.stream_ids(ids, max_new_tokens=NEW_TOKENS, speculative=False, stop_tokens=set()))
        stats = runtime.GenerationStats()
        steps = generator.stream_ids(ids, max_new_tokens=NEW_TOKENS, proposer="prompt-lookup", draft_length=draft_length, stats=stats, stop_tokens=set())
        assert _tokens(steps) == reference, f"prompt {prompt[:40]!r} diverged"
        tokens, calls = tokens + stats.new_tokens, calls + stats.verify_calls
    assert tokens / calls >= 1.25  # code repeats itself: copied tokens save main-model calls (1.37 to 1.91 measured)


def test_prompt_lookup_in_a_batch_matches_each_row_alone(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    prompts = [generator.encode(text) for text in PROMPTS[:3]]
    alone = [_tokens(generator.stream_ids(ids, max_new_tokens=NEW_TOKENS, speculative=False, stop_tokens=set())) for ids in prompts]
    rows, stats = generator.generate_batch_ids(prompts, max_new_tokens=NEW_TOKENS, stop_tokens=set(), proposer="prompt-lookup", draft_length=3)
    assert rows == alone
    assert stats.proposed > 0


def test_an_unknown_proposer_is_refused(tiny_artifact):
    with pytest.raises(runtime.MoeccError, match="proposer must be one of draft, prompt-lookup"):
        runtime.load(tiny_artifact).generate("def f():", proposer="ngram")
