"""Lossless speculation: speculative greedy output equals main-only greedy output, token for token."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import runtime
from compiler import corpus
from compiler.pipeline import build
from compiler.recipe import load_recipe
from runtime.generator import Stream
from runtime.sampling import SamplingParams
from runtime.decoder import BatchKvCache, TokenLedger
from runtime.speculative import (
    MAIN_ONLY_STEPS, AdaptiveDraftLength, BatchLookupDraft, BatchModelDraft, FixedDraftLength, GenerationStats, LookupDraft, ModelDraft, decode, decode_batch,
)  # fmt: skip

PROMPTS = corpus.heldout_prompts(20, prompt_chars=120)
NEW_TOKENS = 32


def _greedy(generator, prompt_ids, **options):
    stats = GenerationStats()
    tokens = [t for step in generator.stream_ids(prompt_ids, max_new_tokens=NEW_TOKENS, stats=stats, **options) for t in step]
    return tokens, stats


def _check_lossless(generator):
    acceptance = {}
    for k in (1, 2, 4, 8, "auto"):
        proposed = accepted = 0
        for prompt in PROMPTS:
            ids = generator.encode(prompt)
            reference, _ = _greedy(generator, ids, speculative=False)
            speculative, stats = _greedy(generator, ids, draft_length=k)
            assert speculative == reference, f"draft length {k}: prompt {prompt[:40]!r} diverged"
            proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
        acceptance[k] = accepted / proposed if proposed else 0.0
    return acceptance


def test_tiny_pair_lossless_for_all_draft_lengths(tiny_artifact):
    _check_lossless(runtime.load(tiny_artifact))


def test_shipped_pairs_lossless_and_useful(shipped_pair):
    acceptance = _check_lossless(runtime.load(shipped_pair[1]))
    assert acceptance[1] >= 0.6, acceptance  # the draft guesses the main model's next token most of the time


def test_shipped_pairs_stay_useful_deep_into_their_context(shipped_pair):
    """Both models read the recipe's whole max_sequence_length: trained on short rows only, the drafts'
    acceptance after 1,800 prompt tokens was 0.2 (small-coder; speculation ran slower than the main model
    alone) and 0.41 (tiny-coder)."""
    generator = runtime.load(shipped_pair[1])
    text = generator.encode("\n".join(corpus.read_text(path) for path in corpus.stdlib_files("heldout")[:50]))
    proposed = accepted = 0
    for start in (0, 30_000, 60_000):
        ids = text[start : start + 1800]
        reference, _ = _greedy(generator, ids, speculative=False)
        speculative, stats = _greedy(generator, ids, draft_length=1)
        assert speculative == reference
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    assert accepted / proposed >= 0.6, accepted / proposed


class _ContraryDraft:
    """A real model's cache whose logits are negated: its greedy pick is the main model's least likely token."""

    def __init__(self, cache):
        self.cache = cache

    def __getattr__(self, name):  # everything but feed is the real cache's
        return getattr(self.cache, name)

    def __len__(self):  # special methods bypass __getattr__
        return len(self.cache)

    def feed(self, tokens, last=None):
        return -self.cache.feed(tokens, last)

    greedy_chain = TokenLedger.greedy_chain  # greedy proposals through the negated feed, one call each


def test_a_verify_scores_every_position_exactly_as_its_decode_step(shipped_pair):
    """The main model's logits at a verify's 9 positions, and at two rows' verified in one batched call, bit for
    bit the decode steps' logits of each row alone: lossless even at a near-tie. Where a verify's attention
    walked the cache its own way and its MoE cut the experts by how many its tokens chose, small-coder's
    differed from its decode steps' by up to 1.4e-5. After 100 and 600 held-out tokens: the attention's cache
    in one part and in three."""
    generator = runtime.load(shipped_pair[1])
    text = generator.encode("\n".join(corpus.read_text(path) for path in corpus.stdlib_files("heldout")[:20]))
    contexts, decoded = (100, 600), []
    for context in contexts:
        cache = generator.main.new_cache(1024)
        cache.feed(text[:context])
        verified = cache.feed(text[context : context + 9], last=9)
        cache.keep(context)
        decoded.append(np.stack([cache.feed([token], last=1)[0] for token in text[context : context + 9]]))
        assert np.array_equal(verified, decoded[-1]), f"after {context} tokens"
    batch = BatchKvCache(generator.main, 2, 1024)
    batch.feed({row: text[:context] for row, context in enumerate(contexts)}, last={0: 1, 1: 1})
    verified = batch.feed({row: text[context : context + 9] for row, context in enumerate(contexts)})
    assert all(np.array_equal(verified[row], decoded[row]) for row in (0, 1)), "a row verified beside another"


@pytest.mark.parametrize("draft_length", [-1, 33, True, "8"])
def test_a_draft_length_out_of_range_is_refused(tiny_artifact, draft_length):
    with pytest.raises(runtime.MoeccError, match="draft_length must be an integer from 1 to 32 or 'auto'"):
        runtime.load(tiny_artifact).generate("def f(x):", max_new_tokens=4, draft_length=draft_length)


def test_always_disagreeing_draft_is_still_lossless(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    for prompt in PROMPTS[:5]:
        ids = generator.encode(prompt)
        reference, _ = _greedy(generator, ids, speculative=False)
        stats = GenerationStats()
        contrary = _ContraryDraft(generator.main.new_cache())
        steps = decode(generator.main.new_cache(), ModelDraft(contrary), ids, NEW_TOKENS, FixedDraftLength(4), SamplingParams(), set(), stats)
        assert [t for step in steps for t in step][: len(reference)] == reference
        assert stats.accepted == 0 and stats.proposed > 0
        assert stats.mean_accepted_length == 1.0


class _ScriptedLength(FixedDraftLength):
    """Draft lengths in a fixed cycle, idle steps (0) included."""

    def __init__(self, lengths):
        super().__init__(max(lengths))
        self.lengths, self.step = lengths, 0

    def choose(self):
        self.step += 1
        return self.lengths[(self.step - 1) % len(self.lengths)]


def _assert_prefix(cached, sequence):
    assert len(cached) < len(sequence) and cached == sequence[: len(cached)]


def test_caches_stay_a_prefix_of_the_sequence_after_every_step(tiny_artifact):
    """What lets a step read each cache's unread tail without comparing sequences: after every step each cache
    holds a prefix of the committed tokens, at least one token short, through rejections (a contrary draft),
    idle draft steps, and a stop token inside a block of accepted proposals (the main model as its own draft)."""
    generator = runtime.load(tiny_artifact)
    ids = generator.encode(PROMPTS[0])
    reference, _ = _greedy(generator, ids, speculative=False, stop_tokens=set())
    stop = {reference[9]}
    for make_draft, stop_tokens in ((generator.draft.new_cache, set()), (lambda: _ContraryDraft(generator.draft.new_cache()), set()), (generator.main.new_cache, stop)):
        main, draft = generator.main.new_cache(), make_draft()
        tokens = list(ids)
        for step in decode(main, ModelDraft(draft), ids, NEW_TOKENS, _ScriptedLength([3, 0, 0, 2, 4]), SamplingParams(), stop_tokens, GenerationStats()):
            tokens += step
            _assert_prefix(main.ids, tokens)
            _assert_prefix(draft.ids, tokens)
        assert tokens[len(ids) :] == (reference[: reference.index(reference[9]) + 1] if stop_tokens else reference)


def _one_step_a_call(generator, prompt_ids, count):
    """The main model's greedy tokens from decode steps of one token each: the reference for main-only decoding."""
    cache = generator.main.new_cache()
    cache.feed(prompt_ids[:-1], last=1)
    tokens = [prompt_ids[-1]]
    for _ in range(count):
        tokens.append(int(cache.feed(tokens[-1:])[-1].argmax()))
    return tokens[1:]


@pytest.mark.parametrize("kernels", ["auto", "onnxruntime"])
def test_main_only_greedy_takes_several_steps_a_call_and_the_tokens_of_one_step_a_call(shipped_pair, kernels):
    """Main-only greedy decoding runs MAIN_ONLY_STEPS steps per main call after its first (in one call where the
    model chains them, moecc.FusedDecoder; a call per step elsewhere): the same tokens as decode steps one call
    each, its first token alone, a stop token inside a call ending the output there and rolling the cache back,
    and no more than the cache holds."""
    generator = runtime.load(shipped_pair[1], kernels=kernels)
    assert generator.main.chains_greedily == (kernels == "auto")
    for prompt in PROMPTS[:4]:
        ids = generator.encode(prompt)
        reference = _one_step_a_call(generator, ids, NEW_TOKENS)
        stats = GenerationStats()
        steps = list(generator.stream_ids(ids, max_new_tokens=NEW_TOKENS, speculative=False, stop_tokens=set(), stats=stats))
        assert [token for step in steps for token in step] == reference
        assert [len(step) for step in steps] == [1] + [MAIN_ONLY_STEPS] * ((NEW_TOKENS - 1) // MAIN_ONLY_STEPS) + [(NEW_TOKENS - 1) % MAIN_ONLY_STEPS]
        assert stats.verify_calls == len(steps) and stats.proposed == stats.accepted == 0
    # A token first seen strictly inside a call (after the one-token first call, not a call's last): the cache read
    # the call's tokens past it, which must go.
    inside = next(i for i, token in enumerate(reference) if i > 1 and (i - 1) % MAIN_ONLY_STEPS != MAIN_ONLY_STEPS - 1 and token not in reference[:i])
    main, tokens = generator.main.new_cache(), list(ids)
    for step in decode(main, None, ids, NEW_TOKENS, FixedDraftLength(1), SamplingParams(), {reference[inside]}, GenerationStats()):
        tokens += step
        _assert_prefix(main.ids, tokens)
    assert tokens[len(ids) :] == reference[: inside + 1]
    capacity = generator.manifest.models["main"].max_sequence_length
    near_the_end = (ids * capacity)[: capacity - 5]  # room for 5 more in the cache, and one token past it
    tokens, _ = _greedy(generator, near_the_end, speculative=False, stop_tokens=set())
    assert tokens == _one_step_a_call(generator, near_the_end, 6)


def test_batched_caches_stay_a_prefix_of_every_row(tiny_artifact):
    """The same in a batch, with a one-token prompt whose row the draft sits out and which stops at its first token
    while another row drafts on."""
    generator = runtime.load(tiny_artifact)
    prompts = [[7], generator.encode(PROMPTS[1])]
    alone = [_greedy(generator, prompt, speculative=False, stop_tokens=set())[0] for prompt in prompts]
    stop = {alone[0][0]} - set(alone[1])
    main, draft = BatchKvCache(generator.main, 2, 128), BatchKvCache(generator.draft, 2, 128)
    rngs = [np.random.default_rng(0) for _ in prompts]
    outputs = decode_batch(main, BatchModelDraft(draft), prompts, NEW_TOKENS, _ScriptedLength([0, 3, 0, 2]), SamplingParams(), rngs, stop, GenerationStats())
    for row, prompt in enumerate(prompts):
        expected = alone[row][: alone[row].index(alone[0][0]) + 1] if row == 0 and stop else alone[row]
        assert outputs[row] == expected
        for cache in (main, draft):
            assert cache.ids[row] == (prompt + outputs[row])[: len(cache.ids[row])]
        _assert_prefix(main.ids[row], prompt + outputs[row])


def test_main_model_as_its_own_draft_accepts_everything(tiny_pair, tmp_path):
    recipe = tiny_pair / "self.yaml"
    recipe.write_text((tiny_pair / "tiny.yaml").read_text().replace("checkpoint: draft", "checkpoint: main").replace("name: tiny", "name: self"))
    generator = runtime.load(build(load_recipe(recipe), tmp_path).artifact)
    for prompt in PROMPTS[:5]:
        ids = generator.encode(prompt)
        reference, _ = _greedy(generator, ids, speculative=False)
        speculative, stats = _greedy(generator, ids, draft_length=4)
        assert speculative == reference
        assert stats.acceptance_rate == 1.0
        assert stats.mean_accepted_length > 4.0  # k accepted plus the bonus token, except where max_new_tokens cut


def test_stream_matches_generate_and_reports_stats(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    whole = generator.generate("def parse(text):", max_new_tokens=20)
    stream = generator.stream("def parse(text):", max_new_tokens=20)
    assert "".join(stream) == whole.text
    assert stream.token_ids == whole.token_ids
    assert whole.stats.new_tokens == len(whole.token_ids) <= 20
    assert whole.stats.tokens_per_second > 0 and whole.stats.verify_calls >= 1


def _metaspace_tokenizer() -> Tokenizer:
    """A SentencePiece-style tokenizer (Llama's and Mixtral's kind): spaces as "▁", and a text's first one dropped
    in decoding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(["def parse(text): return text.split()  # naïve café"] * 20, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    return tokenizer


STREAMED_TEXT = "naïve café — 日本語 🙂 def f(x):\n    return x ** 2  # ✓\n"


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_stream_pieces_add_up_to_the_text_however_steps_cut_it(tiny_artifact, kind):
    """Steps of 1 to 5 tokens that cut multi-byte characters (a byte-level tokenizer splits them into byte tokens)
    and words: the pieces join into the whole output's text, and none holds half a character."""
    tokenizer = runtime.load(tiny_artifact).tokenizer if kind == "byte-level" else _metaspace_tokenizer()
    ids = tokenizer.encode(STREAMED_TEXT * 3).ids
    whole = tokenizer.decode(ids)
    rng = np.random.default_rng(0)
    for _ in range(50):
        cuts = np.cumsum(rng.integers(1, 6, size=len(ids)))
        steps = [ids[start:end] for start, end in zip([0, *cuts], cuts) if start < len(ids)]
        pieces = list(Stream(tokenizer, iter(steps), GenerationStats()))
        assert "".join(pieces) == whole
        assert not any("\ufffd" in piece for piece in pieces)


def test_a_stream_decodes_a_window_per_step_not_the_whole_output(tiny_artifact):
    """2,000 tokens in steps of 4: each step decodes its own tokens and the previous piece's, however long the
    output (decoding the whole output at every step made each step cost more as the output grew)."""
    tokenizer = runtime.load(tiny_artifact).tokenizer
    decoded: list[int] = []

    class Counting:
        def decode(self, ids: list[int]) -> str:
            decoded.append(len(ids))
            return tokenizer.decode(ids)

    ids = (tokenizer.encode(STREAMED_TEXT).ids * 200)[:2000]
    text = "".join(Stream(Counting(), iter(ids[i : i + 4] for i in range(0, len(ids), 4)), GenerationStats()))
    assert text == tokenizer.decode(ids)
    assert max(decoded) <= 32, max(decoded)  # a few steps' tokens: more only while steps keep ending inside a character


def test_sampling_is_reproducible_with_a_seed(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=7)
    for proposer in runtime.PROPOSERS:
        first = generator.generate("import os\n", max_new_tokens=24, sampling=params, proposer=proposer)
        second = generator.generate("import os\n", max_new_tokens=24, sampling=params, proposer=proposer)
        assert first.token_ids == second.token_ids


def test_stop_token_ends_generation(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    ids = generator.encode("def f(x):")
    reference, _ = _greedy(generator, ids, speculative=False)
    stop = reference[5]
    generator.stop_tokens = {stop}
    tokens, _ = _greedy(generator, ids, draft_length=4)
    assert tokens == reference[: reference.index(stop) + 1]


def test_stop_tokens_may_be_any_iterable_of_ids(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    ids = generator.encode("def f(x):")
    reference, _ = _greedy(generator, ids, speculative=False, stop_tokens=set())
    stop = reference[5]
    expected = reference[: reference.index(stop) + 1]
    tokens, _ = _greedy(generator, ids, draft_length=4, stop_tokens=[stop])
    rows, _ = generator.generate_batch_ids([ids, ids[:3]], max_new_tokens=NEW_TOKENS, stop_tokens=(stop,), draft_length=4)
    assert tokens == expected and rows[0] == expected


def test_max_sequence_length_is_respected(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    capacity = generator.manifest.models["main"].max_sequence_length
    ids = list(np.random.default_rng(0).integers(1, 300, size=capacity - 5))
    tokens, _ = _greedy(generator, [int(t) for t in ids], draft_length=8)
    assert len(ids) + len(tokens) <= capacity + 1
    with pytest.raises(runtime.MoeccError, match="exceeds the maximum sequence length"):
        generator.stream_ids([1] * (capacity + 1))


def test_one_generator_serves_several_threads(tiny_artifact):
    from concurrent.futures import ThreadPoolExecutor

    generator = runtime.load(tiny_artifact)
    prompts = PROMPTS[:6]
    alone = [generator.generate(p, max_new_tokens=24, draft_length=3).token_ids for p in prompts]
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(lambda p: generator.generate(p, max_new_tokens=24, draft_length=3).token_ids, prompts))
    assert together == alone


def _force_acceptance(policy: AdaptiveDraftLength, acceptance: float) -> None:
    """Counts as of many steps in which every proposal was accepted at this rate, whatever came before."""
    policy.accepted, policy.rejected = 1000 * acceptance, 1000 * (1 - acceptance)
    policy.reached = [1000.0] * len(policy.reached)
    policy.kept_at = [1000.0 * acceptance] * len(policy.kept_at)


def _policy(acceptance: float, draft_cost: float, verify_cost) -> AdaptiveDraftLength:
    """A policy that has already measured: `acceptance` per token, `draft_cost` per call, verify_cost(positions)."""
    policy = AdaptiveDraftLength(max_length=8)
    for _ in range(200):
        for length in range(9):
            kept = sum(1 for _ in range(length))  # every proposal accepted ...
            policy.update(length, kept, draft_cost * length, verify_cost(length + 1))
    _force_acceptance(policy, acceptance)  # ... then the rate we want
    return policy


def test_adaptive_draft_length_follows_acceptance_and_costs():
    assert _policy(0.9, 0.1, lambda n: 1.0).choose() == 8  # cheap draft, flat verify cost: propose the most
    assert _policy(0.1, 0.5, lambda n: n).choose() == 0  # poor draft, verify cost grows: main model alone
    middle = _policy(0.8, 0.2, lambda n: 1.0 + 0.5 * n).choose()
    assert 1 <= middle < 8
    rates = _policy(0.8, 0.2, lambda n: 1.0 + 0.5 * n).rates()
    within = [k for k in range(1, 9) if rates[k] >= (1 - AdaptiveDraftLength.LONGER_WITHIN) * max(rates)]
    assert middle == max(within) > rates.index(max(rates))  # the longest length near the best rate: 3, where 2 is best
    acceptance, draft, verify = 0.8, 0.2, lambda n: 1.0 + 0.5 * n
    assert rates == pytest.approx([(1 - acceptance ** (k + 1)) / (1 - acceptance) / (k * draft + verify(k + 1)) for k in range(9)], rel=1e-2)


def test_adaptive_draft_length_expects_the_tokens_each_length_committed():
    """Steps whose proposals are all rejected or all accepted (hard and easy stretches of text) commit 1 + k/2
    tokens at length k; the policy, from each position's rate (the first shrunk toward the rate over all
    proposals), expects that within a tenth, where the single rate over all proposals (16 of 18 accepted)
    would expect 5.9 at length 8."""
    policy = AdaptiveDraftLength(max_length=8)
    for step in range(400):
        policy.update(8, 8 if step % 4 >= 2 else 0, 0.0, 1.0)
    single = policy.acceptance
    assert policy.rates()[8] == pytest.approx(5.0, rel=0.1) and (1 - single**9) / (1 - single) > 5.8


def _probe(policy: AdaptiveDraftLength, length: int, kept: int) -> None:
    """A probe's PROBE_STEPS steps at `length`, each keeping `kept` proposals."""
    for _ in range(AdaptiveDraftLength.PROBE_STEPS):
        assert policy.choose() == length
        policy.update(length, kept, 0.5 * length, 2.0)


def test_adaptive_draft_length_probes_while_the_draft_sits_idle_and_backs_off():
    policy = _policy(0.1, 0.5, lambda n: n)
    every = AdaptiveDraftLength.PROBE_EVERY
    assert [policy.choose() for _ in range(every - 1)] == [0] * (every - 1)
    _probe(policy, 1, 0)  # the probe's steps were rejected: wait twice as long for the next
    assert [policy.choose() for _ in range(2 * every - 1)] == [0] * (2 * every - 1)
    _probe(policy, 1, 1)  # accepted, but one token does not make speculation pay here: longer still
    assert policy.probe_interval == 4 * every


def test_a_policys_first_steps_speculate_whatever_they_find():
    """A fresh policy's first PROBE_STEPS steps are a probe: one unlucky first step must not leave the main model
    alone until the next probe, which would be judged on its own outcome and the prior."""
    policy = AdaptiveDraftLength(max_length=4)
    lengths = []
    for _ in range(AdaptiveDraftLength.PROBE_STEPS):
        lengths.append(policy.choose())
        policy.update(lengths[-1], 0, 0.4 * lengths[-1], 2.0 + lengths[-1])  # rejected, and dear
    assert lengths[0] == 4 and 0 not in lengths
    assert policy.choose() == 0 and policy.probe_interval == 2 * AdaptiveDraftLength.PROBE_EVERY  # judged: the main model alone


def test_a_probe_runs_the_length_speculation_would_run_at():
    """Verifying costs a large step over the main model alone and little more per position: one proposal
    pays least of all lengths, so a probe of one token would judge speculation by its worst case."""
    policy = _policy(0.9, 0.1, lambda n: 1.0 if n == 1 else 6.0)
    rates = policy.rates()
    assert rates.index(max(rates)) == 0 and rates.index(max(rates[1:])) == 8 and rates[1] < rates[8] / 2
    probe = [policy.choose() for _ in range(AdaptiveDraftLength.PROBE_EVERY)][-1]
    assert probe == 8


def test_a_probe_cut_to_nothing_judges_no_later_step():
    """A probe on a generation's last token proposes nothing; the next speculative step is no probe, so it must
    leave the probe interval as it is."""
    policy = _policy(0.1, 0.5, lambda n: n)
    every = AdaptiveDraftLength.PROBE_EVERY
    assert [policy.choose() for _ in range(every)][-1] == 1
    policy.update(0, 0, 0.0, 1.0)  # the loop cut the probe to nothing
    policy.update(1, 0, 0.5, 2.0)  # a later fixed-length step, rejected
    assert policy.probe_interval == every


def test_prompt_lookup_with_auto_proposes_the_longest_length_every_step(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    longest = generator.manifest.generation.max_draft_length
    for sampling in (SamplingParams(), SamplingParams(temperature=0.8, seed=3)):
        policy = generator._draft_policy("auto", sampling, "prompt-lookup")
        assert isinstance(policy, FixedDraftLength) and policy.length == longest
    generator.generate("def f(x):", max_new_tokens=8, proposer="prompt-lookup", draft_length="auto")
    assert generator.adaptive_draft_length.verify_cost == {}  # the draft model's policy learned nothing from it


def test_a_probe_that_makes_speculation_pay_ends_the_idle_spell():
    policy = AdaptiveDraftLength(max_length=4)
    policy.update(0, 0, 0.0, 1.0)
    policy.update(1, 0, 0.3, 1.0)
    policy.update(1, 0, 0.3, 1.0)  # two rejections: at these costs the main model alone is better
    policy.probe_interval = 64
    assert [policy.choose() for _ in range(63)] == [0] * 63
    assert policy.choose() == 1  # the probe starts at the one length measured
    policy.update(1, 1, 0.3, 1.0)
    for _ in range(AdaptiveDraftLength.PROBE_STEPS - 1):  # its steps are accepted and tip the balance
        length = policy.choose()
        assert length >= 1
        policy.update(length, length, 0.3 * length, 1.0)
    assert policy.probe_interval == AdaptiveDraftLength.PROBE_EVERY and policy.choose() >= 1


def test_while_speculation_pays_the_draft_sits_out_now_and_then_until_the_main_model_alone_is_timed():
    policy = _policy(0.9, 0.1, lambda n: 1.0)
    every, most, settle = AdaptiveDraftLength.REFRESH_EVERY, AdaptiveDraftLength.MAX_REFRESH_STEPS, AdaptiveDraftLength.SETTLE_STEPS
    speculating = [7 if step % AdaptiveDraftLength.EXPLORE_EVERY == 0 else 8 for step in range(1, every)]  # 8 is the longest: explored below
    choices = [policy.choose() for _ in range(2 * (every - 1 + most))]  # no step timed: each refresh runs its course
    assert choices == (speculating + [0] * most) * 2
    choices = [policy.choose() for _ in range(every)]
    assert choices == speculating + [0]
    for alone_before in range(settle + 1):  # the refresh's steps, timed: it ends at the first settled one
        policy.update(0, 0, 0.0, 1.0, alone_before=alone_before)
        assert policy.choose() == (8 if alone_before == settle else 0)


def test_refreshes_back_off_while_speculation_leads_clearly_and_return_after_a_close_call():
    """Each refresh keeps the main model alone for a few steps; while speculation leads by REFRESH_MARGIN or
    more, the wait for the next one doubles, up to MAX_REFRESH_INTERVAL."""
    policy = _policy(0.9, 0.1, lambda n: 1.0)  # speculation runs at about 3x the main model alone
    settle = AdaptiveDraftLength.SETTLE_STEPS

    def steps_to_next_refresh() -> int:
        steps = 1
        while policy.choose():
            steps += 1
        for alone_before in range(settle + 1):  # timed main-alone steps until one counts
            if alone_before:
                assert policy.choose() == 0
            policy.update(0, 0, 0.0, 1.0, alone_before=alone_before)
        return steps

    every, most = AdaptiveDraftLength.REFRESH_EVERY, AdaptiveDraftLength.MAX_REFRESH_INTERVAL
    assert [steps_to_next_refresh() for _ in range(6)] == [every, 2 * every, 4 * every, 8 * every, most, most]
    _force_acceptance(policy, 0.3)  # now one proposal gains 1.18x, under the margin
    rates = policy.rates()
    assert rates[0] < max(rates) < AdaptiveDraftLength.REFRESH_MARGIN * rates[0]  # speculation still the choice
    assert [steps_to_next_refresh() for _ in range(3)] == [most, every, every]


def test_the_main_model_alone_is_timed_only_once_the_draft_has_been_out_for_a_few_steps():
    """Right after draft calls the main model runs slower than it does without a draft: those times must not
    make the main model alone look slower than it is."""
    policy = _policy(0.5, 0.1, lambda n: 1.0)
    settle = AdaptiveDraftLength.SETTLE_STEPS
    for alone_before in range(settle):  # the first main-alone steps after a speculative one
        policy.update(0, 0, 0.0, 1.8, alone_before=alone_before)
    assert policy.verify_cost[1] == 1.0
    policy.update(0, 0, 0.0, 1.8, alone_before=settle)
    kept = AdaptiveDraftLength.DECAY**AdaptiveDraftLength.STALE_STEPS  # its last timed sample is more than that many steps old
    assert policy.verify_cost[1] == pytest.approx(kept * 1.0 + (1 - kept) * 1.8)


class _Recording(_ScriptedLength):
    """Scripted lengths that record what each step reports: (length, main-alone steps before it)."""

    def __init__(self, lengths):
        super().__init__(lengths)
        self.reported = []

    def update(self, length, kept, draft_seconds, verify_seconds, draft_backlog=1, step=0, alone_before=0):
        self.reported.append((length, alone_before))


def _alone_counts(lengths):
    """Main-alone steps in a row before each step of `lengths`."""
    counts, alone = [], 0
    for length in lengths:
        counts.append(alone)
        alone = alone + 1 if length == 0 else 0
    return counts


def test_decoding_loops_report_the_main_alone_steps_before_each_step(tiny_artifact):
    """Whatever the draft's backlog after a step (1, or 2 after a block accepted whole), a main-alone step is
    judged by how many main-alone steps of its own sequence came right before it."""
    generator = runtime.load(tiny_artifact)
    ids = generator.encode(PROMPTS[0])
    policy = _Recording([3, 0, 0, 0, 2, 0])
    for main, draft in ((generator.main, generator.draft), (generator.main, generator.main)):  # the main model as draft accepts whole blocks
        policy.reported.clear()
        list(decode(main.new_cache(), ModelDraft(draft.new_cache()), ids, NEW_TOKENS, policy, SamplingParams(), set(), GenerationStats()))
        lengths = [length for length, _ in policy.reported]
        assert [alone for _, alone in policy.reported] == _alone_counts(lengths) and lengths.count(0) >= 3
    policy = _Recording([0, 2, 0, 0])
    prompts = [generator.encode(PROMPTS[1]), generator.encode(PROMPTS[2])]
    # The main model as draft: both rows commit alike and finish together, so each step reports row 0, then row 1.
    main, draft = BatchKvCache(generator.main, 2, 128), BatchKvCache(generator.main, 2, 128)
    outputs = decode_batch(main, BatchModelDraft(draft), prompts, 10, policy, SamplingParams(), [np.random.default_rng(0)] * 2, set(), GenerationStats())
    assert len(policy.reported) % 2 == 0 and [len(row) for row in outputs] == [10, 10]
    for row in range(2):
        reported = policy.reported[row::2]
        assert [alone for _, alone in reported] == _alone_counts([length for length, _ in reported])


def test_a_generations_first_steps_update_acceptance_but_not_costs():
    """Right after a prompt the calls run slow; those times must not steer later generations."""
    policy = _policy(0.5, 0.1, lambda n: 1.0)
    costs, draft_cost = dict(policy.verify_cost), dict(policy.draft_cost)
    for step in range(AdaptiveDraftLength.WARMUP_STEPS):
        policy.update(0, 0, 0.0, 50.0, step=step)
        policy.update(2, 2, 10.0, 50.0, step=step)
    assert policy.verify_cost == costs and policy.draft_cost == draft_cost and policy.acceptance > 0.5  # every proposal kept
    policy.update(2, 2, 10.0, 50.0, step=AdaptiveDraftLength.WARMUP_STEPS)
    assert policy.verify_cost[3] > costs[3] and policy.draft_cost[2] > draft_cost[2]
    fresh = AdaptiveDraftLength(max_length=4)
    fresh.update(3, 1, 0.3, 2.0, step=0)  # nothing measured yet: a warm-up time beats none ...
    assert fresh.verify_cost == {4: 2.0} and fresh.draft_cost == {3: pytest.approx(0.3)}
    fresh.update(3, 1, 0.6, 1.0, step=AdaptiveDraftLength.WARMUP_STEPS)  # ... until the first timed one replaces it
    assert fresh.verify_cost == {4: 1.0} and fresh.draft_cost == {3: pytest.approx(0.6)}
    fresh.update(3, 1, 0.3, 2.0, step=AdaptiveDraftLength.WARMUP_STEPS)  # from then on, timed steps average
    assert fresh.verify_cost[4] == pytest.approx(1.1) and fresh.draft_cost[3] == pytest.approx(0.57)


def test_adaptive_draft_length_tries_an_unmeasured_length_then_judges_it():
    policy = AdaptiveDraftLength(max_length=4)
    assert policy.choose() == 4  # nothing measured: measure the longest first
    policy.update(4, 4, 0.4, 1.0)
    policy.update(0, 0, 0.0, 1.0)
    assert policy._verify_costs()[2] == 1.0  # unmeasured 3 positions: as cheap as the nearest below
    for _ in range(20):  # the long verify keeps turning out costly (each sample bounded at twice its figure)
        policy.update(4, 4, 0.4, 50.0)
    assert policy.choose() < 4


def test_adaptive_draft_length_explores_next_to_its_choice_so_a_stale_figure_cannot_lock_it_in():
    """Every length above 2 timed once in a slow moment, at three times its cost: the policy settles on k = 2 at
    first, and the steps next to its choice re-time the longer lengths until it reaches the best one (k = 6) or
    one as good within a percent."""
    acceptance, draft = 0.85, 0.05
    true_cost = lambda positions: 1.0 + 0.1 * positions  # noqa: E731

    def rate(k: int) -> float:
        return (1 - acceptance ** (k + 1)) / (1 - acceptance) / (k * draft + true_cost(k + 1))

    policy = _policy(acceptance, draft, lambda positions: true_cost(positions) * (3 if positions > 3 else 1))
    assert policy._best() == 2
    for _ in range(400):
        length = policy.choose()
        policy.update(length, length, draft * length, true_cost(length + 1), alone_before=AdaptiveDraftLength.SETTLE_STEPS)
        _force_acceptance(policy, acceptance)
    assert rate(policy._best()) >= 0.99 * max(rate(k) for k in range(9))  # the best, or next to it where the rates are flat


def test_adaptive_draft_length_keeps_speculating_through_calls_slowed_by_the_machine():
    """One step in ten slowed down by something else on the machine (its draft calls 30 times, its verify 4
    times their cost, as a shared 2-core machine measured): the policy's best length stays where speculation
    pays, instead of an outlier raising its length and every longer one until the main model alone wins."""
    acceptance, draft = 0.85, 0.05
    true_cost = lambda positions: 1.0 + 0.1 * positions  # noqa: E731
    policy = _policy(acceptance, draft, true_cost)
    for step in range(400):
        length = policy.choose()
        slowed = step % 10 == 9
        policy.update(length, length, draft * length * (30 if slowed else 1), true_cost(length + 1) * (4 if slowed else 1), alone_before=AdaptiveDraftLength.SETTLE_STEPS)
        _force_acceptance(policy, acceptance)
        assert policy._best() >= 3, f"step {step}"


def test_adaptive_draft_length_keeps_verify_costs_ordered_by_the_latest_measure():
    """A length timed once in a slow moment is not judged by that figure for good: a verify measured since over
    more positions, cheaper, lowers it. A dearer one over fewer positions leaves a longer length's figure as it
    is: that length, looking cheap, gets chosen and so timed again."""
    policy = AdaptiveDraftLength(max_length=4)
    policy.update(0, 0, 0.0, 1.0)  # the main model alone: the refresh's figure, left as measured
    policy.update(2, 2, 0.2, 9.0)  # 3 positions, timed while something else held the cores
    policy.update(4, 4, 0.4, 0.5)  # 5 positions in a quiet moment
    assert policy.verify_cost == {1: 1.0, 3: 0.5, 5: 0.5}
    policy.update(1, 1, 0.1, 2.0)  # 2 positions, now
    assert policy.verify_cost == {1: 1.0, 2: 2.0, 3: 0.5, 5: 0.5}
    policy.update(3, 3, 0.3, 9.0, step=0)  # 4 positions in a generation's warm-up: its own stand-in only
    assert policy.verify_cost == {1: 1.0, 2: 2.0, 3: 0.5, 4: 9.0, 5: 0.5}


def test_adaptive_draft_length_prices_proposals_by_their_number_as_measured():
    """A draft whose first proposal of a step costs more than the others (one that chains them) is priced as
    measured, between measured numbers on the line joining them, and beyond them at the nearest's rate; a
    dearer figure for fewer proposals is lowered by a cheaper one for more."""
    policy = AdaptiveDraftLength(max_length=8)
    policy.update(2, 2, 0.30, 1.0)  # 0.26 for the first proposal, 0.04 for the second
    policy.update(6, 6, 0.46, 1.0)
    assert policy._draft_costs() == pytest.approx([0.0, 0.15, 0.30, 0.34, 0.38, 0.42, 0.46, 0.46 * 7 / 6, 0.46 * 8 / 6])
    policy.update(1, 1, 0.5, 1.0)  # one proposal, timed in a slow moment
    policy.update(4, 4, 0.2, 1.0)  # four, in a quiet one
    assert policy.draft_cost == {1: 0.2, 2: 0.2, 4: 0.2, 6: 0.46}


def test_adaptive_draft_length_ignores_the_drafts_catch_up_in_its_cost():
    policy = AdaptiveDraftLength(max_length=4)
    policy.update(2, 2, 0.2, 1.0)  # 0.2 s for two proposals
    policy.update(2, 2, 5.0, 1.0, draft_backlog=40)  # first read 40 tokens it had skipped while idle
    assert policy.draft_cost == {2: pytest.approx(0.2)}


@pytest.mark.parametrize("options", [{"speculative": False}, {"draft_length": 3}, {"draft_length": "auto"}], ids=["main only", "k=3", "auto"])
def test_batch_of_prompts_of_different_lengths_gives_each_its_own_output(tiny_artifact, options):
    generator = runtime.load(tiny_artifact)
    prompts = [p[:length] for p, length in zip(PROMPTS, (120, 15, 60, 3, 90))]
    batch = generator.generate_batch(prompts, max_new_tokens=20, stop_tokens=set(), **options)
    for prompt, result in zip(prompts, batch):
        assert result.token_ids == _greedy(generator, generator.encode(prompt), speculative=False, stop_tokens=set())[0][:20]
    # Each row stops on its own: the first token a row produces, used as a stop token, ends that row only.
    first = {result.token_ids[0] for result in batch}
    stopped = generator.generate_batch(prompts, max_new_tokens=20, stop_tokens={batch[0].token_ids[0]}, **options)
    assert stopped[0].token_ids == batch[0].token_ids[:1]
    assert any(len(result.token_ids) > 1 for result in stopped) or len(first) == 1
    if "draft_length" in options and options["draft_length"] != "auto":  # auto may rightly keep to the main model
        assert batch[0].stats.accepted > 0  # the rows went through the draft


@pytest.mark.parametrize("draft_length", [4, "auto"])
def test_seeded_speculative_batch_repeats_itself(tiny_artifact, draft_length):
    generator = runtime.load(tiny_artifact)
    prompts = [p[:length] for p, length in zip(PROMPTS, (80, 20, 50))]
    sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    first = generator.generate_batch(prompts, max_new_tokens=24, sampling=sampling, draft_length=draft_length)
    again = generator.generate_batch(prompts, max_new_tokens=24, sampling=sampling, draft_length=draft_length)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert len({tuple(r.token_ids) for r in first}) == len(prompts)


def test_speculative_batch_of_one_token_each(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    prompts = [[7], generator.encode(PROMPTS[0])]  # a one-token prompt has nothing to prefill
    rows, stats = generator.generate_batch_ids(prompts, max_new_tokens=1, stop_tokens=set(), draft_length=3)
    assert rows == [_greedy(generator, prompt, speculative=False, stop_tokens=set())[0][:1] for prompt in prompts]
    assert stats.proposed == 0  # no room for proposals before the only token


class _CountingLookup(LookupDraft):
    """A LookupDraft that records how many tokens each of its lookups found."""

    def __init__(self, vocab_size):
        super().__init__(vocab_size)
        self.found = []

    def propose(self, *args):
        proposal = super().propose(*args)
        self.found.append(len(proposal.tokens))
        return proposal


def test_lookups_report_the_tokens_they_found_and_a_miss_as_a_main_alone_step(tiny_artifact):
    """A lookup finds at most the chosen length, often fewer or none: the policy must see what was proposed,
    and a step with nothing proposed is the main model running alone."""
    generator = runtime.load(tiny_artifact)
    vocab = generator.main.entry.vocab_size
    unique, repeating = list(range(10, 40)), [5, 6, 7, 8] * 6  # the first lookup misses / hits
    for prompt, first in ((unique, 0), (repeating, 4)):
        policy, draft = _Recording([4]), _CountingLookup(vocab)
        list(decode(generator.main.new_cache(), draft, prompt, 12, policy, SamplingParams(), set(), GenerationStats()))
        lengths = [length for length, _ in policy.reported]
        # A last step with one token left proposes nothing, so it looks nothing up.
        assert lengths[: len(draft.found)] == draft.found and set(lengths[len(draft.found) :]) <= {0} and draft.found[0] == first
        assert [alone for _, alone in policy.reported] == _alone_counts(lengths)
    policy = _Recording([4])
    main = BatchKvCache(generator.main, 2, 128)
    decode_batch(main, BatchLookupDraft(vocab, 2), [unique, repeating], 12, policy, SamplingParams(), [np.random.default_rng(0)] * 2, set(), GenerationStats())
    assert policy.reported[:2] == [(0, 0), (4, 0)]  # step 1: row 0 missed, row 1 copied 4
    assert [alone for _, alone in policy.reported[2:4]] == [1, 0]  # step 2: row 0 ran alone once, row 1 proposed
