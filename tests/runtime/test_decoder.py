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

    def counted(input_ids, cached, new):
        widths.append(input_ids.shape[1])
        return run(input_ids, cached, new)

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


def test_a_decoder_exported_without_new_token_counts_is_refused():
    with pytest.raises(ArtifactError, match="older moecc .*query_seqlens.*rebuild it"):
        check_inputs(Path("old/main/model.onnx"), _graph_with_inputs("input_ids", "seqlens_k", "total_sequence_length", "past_key_values.0.key"))
    check_inputs(Path("new/main/model.onnx"), _graph_with_inputs("input_ids", "seqlens_k", "total_sequence_length", "query_seqlens"))


def test_a_batch_row_must_be_filled_before_it_can_sit_out_a_call(tiny_artifact):
    batch = BatchKvCache(runtime.load(tiny_artifact).main, 2, 32)
    with pytest.raises(ValueError, match="row 1 has neither cached nor new tokens"):
        batch.feed({0: [5, 6]})
