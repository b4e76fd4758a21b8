"""KV caches: a batch's rows decode exactly as each would alone, after uneven growth and rollbacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import runtime
from runtime.decoder import BatchKvCache, check_inputs
from runtime.errors import ArtifactError

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


def _counting_calls(batch: BatchKvCache) -> list[int]:
    """Wrap the cache's model calls; the list receives each call's width."""
    widths, run = [], batch.buffers.run

    def counted(rows, cached, last):
        widths.append(max(len(tokens) for tokens in rows))
        return run(rows, cached, last)

    batch.buffers.run = counted
    return widths


def test_a_batch_feed_is_one_call_unless_the_cache_end_narrows_it(tiny_artifact):
    """Rows take different numbers of tokens (a verify block each, or none) in one right-padded call; every
    row needs room for the call's width, so near the cache's end the tokens go in narrower calls."""
    generator = runtime.load(tiny_artifact)
    prompts = [list(range(5, 17)), list(range(40, 43)), list(range(80, 100))]
    batch = BatchKvCache(generator.main, len(prompts), 30)
    batch.prefill(prompts)
    widths = _counting_calls(batch)
    histories = [list(prompt) for prompt in prompts]
    for feed, expected_widths in (({0: [7, 8, 9, 10, 11], 2: [1, 2, 3, 4]}, [5]), ({2: [5, 6, 7]}, [3]), ({0: [12, 13, 14, 15, 16]}, [3, 2])):
        widths.clear()
        logits = batch.feed(feed)
        assert widths == expected_widths  # rows 20+4+3 = 27 long: 3 positions of room left for the last feed
        for row, tokens in feed.items():
            histories[row] += tokens
            alone = generator.main.new_cache(64).feed(histories[row])[-len(tokens) :]
            assert logits[row].shape == alone.shape and np.abs(logits[row] - alone).max() <= TOLERANCE
        assert batch.ids == histories  # the idle rows kept their caches


def _graph_with_inputs(*names: str) -> onnx.ModelProto:
    return onnx.helper.make_model(onnx.helper.make_graph([], "g", [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT32, [1]) for name in names], []))


def test_a_decoder_exported_without_new_token_counts_or_logit_positions_is_refused():
    lengths = ("input_ids", "seqlens_k", "total_sequence_length")
    with pytest.raises(ArtifactError, match="older moecc .*logit_positions, query_seqlens.*rebuild it"):
        check_inputs(Path("old/main/model.onnx"), _graph_with_inputs(*lengths, "past_key_values.0.key"))
    with pytest.raises(ArtifactError, match=r"older moecc \(its inputs lack logit_positions\)"):
        check_inputs(Path("old/main/model.onnx"), _graph_with_inputs(*lengths, "query_seqlens"))
    check_inputs(Path("new/main/model.onnx"), _graph_with_inputs(*lengths, "query_seqlens", "logit_positions"))


def test_a_call_returns_logits_only_at_the_positions_asked(tiny_artifact):
    """The `last` last positions of a call, equal to those rows of every position's logits: for a decode-size
    call (bound buffers) and a prompt (ONNX Runtime's own arrays), whose model output holds only those rows."""
    decoder = runtime.load(tiny_artifact).main
    for tokens in (list(range(3, 9)), list(range(3, 43))):
        every = decoder.new_cache(64).feed(tokens)
        assert every.shape[0] == len(tokens)
        for last in (1, 3):
            cache = decoder.new_cache(64)
            kept = cache.feed(tokens, last=last)
            assert kept.shape == (last, every.shape[1]) and np.abs(kept - every[-last:]).max() <= TOLERANCE
            assert cache.ids == tokens
    outputs = []
    cache = decoder.new_cache(64)
    run = cache.buffers.run
    cache.buffers.run = lambda *args: outputs.append(run(*args)) or outputs[-1]
    cache.feed(list(range(3, 43)), last=1)
    assert outputs[0].shape == (1, 1, every.shape[1])  # not [1, 40, V]


def test_a_batch_feed_returns_each_rows_last_logits_across_narrowed_calls(tiny_artifact):
    """last per row: near the cache's end a row's tokens go in several narrower calls, and its asked logits
    may fall in more than one; a row asking fewer than the call's widest gets only its own. A draft's long
    catch-up goes in one call."""
    generator = runtime.load(tiny_artifact)
    prompts = [list(range(5, 9)), list(range(40, 60))]
    batch = BatchKvCache(generator.main, len(prompts), 32)
    batch.prefill(prompts)
    widths = _counting_calls(batch)
    feed, last = {0: list(range(100, 120)), 1: [7, 8, 9]}, {0: 10, 1: 1}
    logits = batch.feed(feed, last=last)
    assert widths == [12, 8]  # 12 positions of room after the 20-token row, then 8 after the first call (row 0: 16, row 1: 23)
    for row, tokens in feed.items():
        alone = generator.main.new_cache(64).feed(prompts[row] + tokens)[-last[row] :]
        assert logits[row].shape == alone.shape and np.abs(logits[row] - alone).max() <= TOLERANCE
    wide = BatchKvCache(generator.main, 1, 64)
    wide.prefill([[5, 6]])
    widths = _counting_calls(wide)
    assert wide.feed({0: list(range(100, 140))}, last={0: 1})[0].shape[0] == 1 and widths == [40]


def test_logits_asked_beyond_a_calls_new_tokens_are_refused_before_anything_changes(tiny_artifact):
    decoder = runtime.load(tiny_artifact).main
    with pytest.raises(ValueError, match="row 0: logits asked for its last 20 tokens, of 2 fed"):
        decoder.new_cache(16).feed([5, 6], last=20)
    batch = BatchKvCache(decoder, 2, 32)
    batch.prefill([[5, 6], [7, 8]])
    before = batch.feed({0: [9], 1: [10]}, last={0: 1, 1: 1})
    with pytest.raises(ValueError, match="row 1: logits asked for its last 3 tokens, of 2 fed"):
        batch.feed({0: [11], 1: [12, 13]}, last={0: 1, 1: 3})
    assert batch.ids == [[5, 6, 9], [7, 8, 10]]
    for row in (0, 1):
        batch.sync(row, batch.ids[row][:-1])
    again = batch.feed({0: [9], 1: [10]}, last={0: 1, 1: 1})  # the positions buffer was not half rewritten
    assert all(np.array_equal(before[row], again[row]) for row in (0, 1))


def test_a_batch_row_must_be_filled_before_it_can_sit_out_a_call(tiny_artifact):
    batch = BatchKvCache(runtime.load(tiny_artifact).main, 2, 32)
    with pytest.raises(ValueError, match="row 1 has neither cached nor new tokens"):
        batch.feed({0: [5, 6]})
