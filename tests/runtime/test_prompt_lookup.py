"""Prompt lookup: what it proposes, alone and before the draft model (lookup-then-draft), and that decoding with
its proposals stays the main model's own output."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from compiler import corpus
from runtime.prompt_lookup import PromptLookup
from runtime.sampling import SamplingParams
from runtime.speculative import FixedDraftLength, GenerationStats, LookupThenDraft, decode

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
    with pytest.raises(runtime.MoeccError, match="proposer must be one of draft, prompt-lookup, lookup-then-draft"):
        runtime.load(tiny_artifact).generate("def f():", proposer="ngram")


def test_lookup_then_draft_copies_a_repeated_three_token_tail_and_drafts_otherwise(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    proposer = LookupThenDraft(generator.draft.new_cache(), generator.main.entry.vocab_size, lookup_length=6)
    repeated, fresh = [5, 6, 7, 8, 9, 5, 6, 7], [5, 6, 7, 8, 9, 1, 6, 7]  # the second repeats only a 2-token tail (6, 7)
    for tokens in (repeated, fresh):
        proposer.prefill(tokens)
    copied = proposer.propose(repeated, 2, SamplingParams(), np.random.default_rng(0))
    assert copied.instead_of_draft and copied.tokens == [8, 9, 5, 6, 7, 8]  # the policy's 2 does not bound a copy: copies cost nothing
    assert copied.cut(3).tokens == [8, 9, 5] and copied.cut(3).instead_of_draft
    drafted = proposer.propose(fresh, 2, SamplingParams(), np.random.default_rng(0))
    assert not drafted.instead_of_draft and len(drafted.tokens) == 2


@pytest.mark.parametrize("draft_length", [4, "auto"])
def test_lookup_then_draft_decoding_is_lossless_alone_and_in_a_batch(tiny_artifact, draft_length):
    generator = runtime.load(tiny_artifact)
    prompts = [generator.encode(text) for text in PROMPTS[:3]]
    alone = [_tokens(generator.stream_ids(ids, max_new_tokens=NEW_TOKENS, speculative=False, stop_tokens=set())) for ids in prompts]
    for ids, reference in zip(prompts, alone):
        steps = generator.stream_ids(ids, max_new_tokens=NEW_TOKENS, proposer="lookup-then-draft", draft_length=draft_length, stop_tokens=set())
        assert _tokens(steps) == reference
    rows, stats = generator.generate_batch_ids(prompts, max_new_tokens=NEW_TOKENS, stop_tokens=set(), proposer="lookup-then-draft", draft_length=draft_length)
    assert rows == alone and stats.proposed > 0


class _Recording(FixedDraftLength):
    """A fixed length that records the lengths of the steps reported to it."""

    def __init__(self, length: int):
        super().__init__(length)
        self.reported: list[int] = []

    def update(self, length: int, *args, **kwargs) -> None:
        self.reported.append(length)


def test_copied_steps_tell_the_draft_length_policy_nothing(tiny_artifact):
    """A copy costs no draft call and may run past the policy's length: its step must not reach the policy's
    measures of the draft model. The prompt repeats itself, so copies come early and often."""
    generator = runtime.load(tiny_artifact)
    ids = generator.encode("x = 1\ny = 2\n" * 6)
    policy, stats = _Recording(2), GenerationStats()
    proposer = LookupThenDraft(generator.draft.new_cache(), generator.main.entry.vocab_size, lookup_length=6)
    list(decode(generator.main.new_cache(), proposer, ids, NEW_TOKENS, policy, SamplingParams(), set(), stats))
    assert len(policy.reported) < stats.verify_calls and set(policy.reported) <= {0, 1, 2}


def test_lookup_then_draft_needs_a_draft_model(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    generator.draft = None
    with pytest.raises(runtime.MoeccError, match="proposer 'lookup-then-draft' needs a draft model"):
        generator.generate("def f():", proposer="lookup-then-draft")
