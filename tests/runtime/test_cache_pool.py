"""KV caches kept between generations: each generation runs on caches the ones before it gave back, and what
they left behind never reaches its output."""

from __future__ import annotations

import runtime
from compiler import corpus
from runtime.speculative import GenerationStats

PROMPTS = corpus.heldout_prompts(4, prompt_chars=200)


def _counting_allocations(generator) -> dict[str, int]:
    """Counts each model's new_cache() calls from now on."""
    counts = {"main": 0, "draft": 0}
    for role in counts:
        decoder = getattr(generator, role)
        allocate = decoder.new_cache

        def counted(*args, role=role, allocate=allocate, **options):
            counts[role] += 1
            return allocate(*args, **options)

        decoder.new_cache = counted
    return counts


def _tokens(generator, prompt: str, **options) -> list[int]:
    steps = generator.stream_ids(generator.encode(prompt), max_new_tokens=24, stats=GenerationStats(), stop_tokens=set(), **options)
    return [token for step in steps for token in step]


def test_generations_in_turn_reuse_one_cache_per_model_and_match_fresh_caches(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    counts = _counting_allocations(generator)
    # Long prompts first, so that every later generation's cache holds stale keys beyond its own.
    runs = [(prompt, options) for prompt in sorted(PROMPTS, key=len, reverse=True) for options in ({"draft_length": 4}, {"speculative": False})]
    outputs = [_tokens(generator, prompt, **options) for prompt, options in runs]
    assert counts == {"main": 1, "draft": 1}
    assert outputs == [_tokens(runtime.load(tiny_artifact), prompt, **options) for prompt, options in runs]  # each on fresh caches


def test_streams_running_at_once_take_caches_of_their_own_and_an_abandoned_one_gives_its_back(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    counts = _counting_allocations(generator)
    first, second = (generator.stream_ids(generator.encode(prompt), max_new_tokens=24, stop_tokens=set(), draft_length=4) for prompt in PROMPTS[:2])
    interleaved = {0: [], 1: []}
    for _ in range(3):
        interleaved[0] += next(first)
        interleaved[1] += next(second)
    assert counts == {"main": 2, "draft": 2}
    first.close()  # abandoned halfway: its caches go back
    interleaved[1] += [token for step in second for token in step]
    assert interleaved[1] == _tokens(runtime.load(tiny_artifact), PROMPTS[1], draft_length=4)
    third, fourth = (generator.stream_ids(generator.encode(prompt), max_new_tokens=24, stop_tokens=set(), draft_length=4) for prompt in PROMPTS[2:])
    next(third), next(fourth)  # at once again: the closed stream's caches and the finished one's
    assert counts == {"main": 2, "draft": 2}


def test_a_stream_never_started_takes_no_cache(tiny_artifact):
    generator = runtime.load(tiny_artifact)
    counts = _counting_allocations(generator)
    generator.stream_ids(generator.encode(PROMPTS[0]), max_new_tokens=8)
    assert counts == {"main": 0, "draft": 0}
