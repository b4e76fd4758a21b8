"""What `moecc bench` measures against: the weight and KV cache bytes a decode step reads, the machine's read
bandwidth, and what speculation's steps cost against main-only ones."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from compiler.architectures import expected_tensors
from compiler.checkpoint import Checkpoint
from compiler.cli import speculation_line
from runtime.artifact import ModelEntry
from runtime.benchmark import Case, CaseResult, Mode, Spread, _summary, active_weight_bytes, as_json, kv_bytes_per_token, read_bandwidth, speculation_costs, wait_until_idle
from runtime.speculative import GenerationStats


def test_active_weight_bytes_count_top_k_experts_and_no_tables(tiny_pair, tiny_artifact):
    checkpoint = Checkpoint(tiny_pair / "main")
    dims = checkpoint.dims
    expected = 0.0
    for name, shape in expected_tensors(checkpoint.arch, dims).items():
        size = 4 * int(np.prod(shape))
        if ".experts." in name:
            size *= dims.experts_per_token / dims.num_experts
        if name == "model.embed_tokens.weight" and not dims.tie_word_embeddings:
            continue  # only looked up; a tied head reads it through its transposed copy
        expected += size
    assert abs(active_weight_bytes(tiny_artifact / "main" / "model.onnx") - expected) <= 1024  # shape constants


def test_read_bandwidth_is_plausible():
    assert 1e8 < read_bandwidth(1, megabytes=64, repeats=2) < 1e12


def test_kv_bytes_follow_the_cache_precision():
    entry = ModelEntry(path="main/model.onnx", architecture="qwen3_moe", precision="fp32", activations="fp32", num_layers=4,
                       num_kv_heads=2, head_dim=64, vocab_size=1024, max_sequence_length=2048, parameters=1)
    full = kv_bytes_per_token(entry, 128, 65)
    assert full == 4 * 2 * 2 * 64 * 4 * (128 + 32)  # layers, keys and values, KV heads, head size, fp32 bytes, mean context
    assert kv_bytes_per_token(entry.model_copy(update={"kv_cache": "int8"}), 128, 65) * 4 == full


def _case(mode: str, tokens_per_second: float, verify_ms: float, draft_ms: float = 0.0, tokens_per_verify: float = 1.0, mean_k: float = 0.0,
          batch: int = 1, prompt: int = 128) -> CaseResult:
    speed = Spread(tokens_per_second, tokens_per_second, tokens_per_second)
    return CaseResult(mode=mode, prompt_tokens=prompt, new_tokens=64, batch_size=batch, runs=1, prefill_tokens_per_second=speed,
                      decode_tokens_per_second=speed, milliseconds_per_token=Spread(1, 1, 1), acceptance_rate=0.8,
                      mean_accepted_length=tokens_per_verify, mean_draft_length=mean_k, verify_milliseconds=verify_ms, draft_milliseconds=draft_ms)


def test_speculation_costs_are_in_main_only_steps_with_the_free_draft_bound():
    cases = [
        _case("main only", 1000, verify_ms=0.8), _case("speculative k=4", 1250, verify_ms=2.0, draft_ms=0.2, tokens_per_verify=4.0, mean_k=4),
        _case("prompt lookup", 1100, verify_ms=1.0, tokens_per_verify=2.0, mean_k=1.5), _case("speculative auto", 1000, verify_ms=0.8),  # settled on the main model alone
        _case("speculative k=4, batch 3", 2000, verify_ms=3.0, draft_ms=0.3, tokens_per_verify=4.0, mean_k=4, batch=3),  # no batch-1 pair
        _case("speculative k=4", 900, verify_ms=2.0, draft_ms=0.2, tokens_per_verify=4.0, mean_k=4, prompt=512),  # no main-only at 512
    ]
    costs = speculation_costs(cases)
    assert [(cost.mode, cost.prompt_tokens) for cost in costs] == [("speculative k=4", 128), ("prompt lookup", 128)]
    draft, lookup = costs
    assert draft.speed_up == pytest.approx(1.25) and draft.verify_cost == pytest.approx(2.5) and draft.draft_cost == pytest.approx(0.25)
    assert draft.tokens_per_verify == 4.0 and draft.free_draft_bound == pytest.approx(1.6)  # 4 tokens for 2.5 steps
    assert lookup.draft_cost == 0 and lookup.free_draft_bound == pytest.approx(1.6)
    # Main-only greedy calls take several steps each (MAIN_ONLY_STEPS): a step is a call's share per token.
    chained = speculation_costs([_case("main only", 1000, verify_ms=6.4, tokens_per_verify=8.0), cases[1]])[0]
    assert chained.verify_cost == pytest.approx(2.5) and chained.draft_cost == pytest.approx(0.25)


def test_each_timed_run_decodes_its_own_batch_in_turn():
    case = Case(Mode("main only", False), (((1, 2),), ((3, 4),)))
    assert case.prompts == ((1, 2),)
    assert [case.batch_of_run(run) for run in range(5)] == [((1, 2),), ((1, 2),), ((3, 4),), ((1, 2),), ((3, 4),)]  # 0: the warm-up round


def test_case_summary_times_each_main_call_and_each_proposal():
    runs = [
        GenerationStats(new_tokens=12, seconds=0.02, verify_seconds=0.010, verify_calls=4, draft_seconds=0.004, proposed=10, accepted=8, draft_lengths=[4, 4, 2, 0]),
        GenerationStats(new_tokens=12, seconds=0.02, verify_seconds=0.014, verify_calls=6, draft_seconds=0.002, proposed=6, accepted=4, draft_lengths=[2, 2, 2, 0, 0, 0]),
    ]
    result = _summary(Case(Mode("speculative auto", True, "auto"), (((1, 2, 3),),)), runs, new_tokens=12, runs=2)
    assert result.verify_milliseconds == pytest.approx(2.4)  # 24 ms over 10 calls
    assert result.draft_milliseconds == pytest.approx(0.375)  # 6 ms over 16 proposals
    assert result.mean_accepted_length == pytest.approx(2.4) and result.acceptance_rate == pytest.approx(0.75)
    alone = _summary(Case(Mode("main only", False), (((1, 2, 3),),)), [GenerationStats(new_tokens=5, seconds=0.01, verify_seconds=0.004, verify_calls=5)], 5, 1)
    assert alone.verify_milliseconds == pytest.approx(0.8) and alone.draft_milliseconds == 0


def test_speed_up_by_round_pairs_each_round_with_main_only_on_the_same_text():
    """The machine's state moves both cases of a round alike: the per-round ratios (here 2x, 1.5x and 1.25x) show
    the spread that the ratio of the medians does not."""
    main, ours = _case("main only", 1000, verify_ms=0.8), _case("speculative k=4", 1500, verify_ms=2.0, draft_ms=0.2, tokens_per_verify=4.0, mean_k=4)
    main.decode_by_run, ours.decode_by_run = [500, 1000, 1200], [1000, 1500, 1500]
    main.decode_tokens_per_second, ours.decode_tokens_per_second = Spread.of(main.decode_by_run), Spread.of(ours.decode_by_run)
    cost = speculation_costs([main, ours])[0]
    assert cost.speed_up == pytest.approx(1.5) and cost.speed_up_by_round == Spread(pytest.approx(1.5), pytest.approx(1.25), pytest.approx(2.0))
    assert "1.50x main-only (by round, on the same text: median 1.50x, 1.25-2.00x);" in speculation_line(as_json(cost))
    ours.decode_by_run = [1000]  # rounds that do not pair up: no spread claimed
    assert speculation_costs([main, ours])[0].speed_up_by_round is None


def test_speculation_line_says_what_the_costs_mean():
    cost = speculation_costs([_case("main only", 1000, verify_ms=0.8), _case("speculative k=4", 1250, verify_ms=2.0, draft_ms=0.2, tokens_per_verify=4.0, mean_k=4)])[0]
    assert speculation_line(as_json(cost)) == (
        "speculative k=4, prompt 128: 1.25x main-only; a verify call took 2.50 main-only steps, and proposing 0.25 per proposal (catching up "
        "included); at 4.00 tokens per verify, proposals that cost nothing would reach 1.60x"
    )


def _spinning_thread(seconds: float) -> tuple[threading.Thread, float]:
    """A started thread that keeps a core busy for `seconds`, as a thread pool spinning after its last call; and when it stops."""
    stop = time.perf_counter() + seconds

    def spin() -> None:
        while time.perf_counter() < stop:
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    return thread, stop


def test_wait_until_idle_outlasts_a_spinning_thread():
    """A peer runtime's thread pool spinning after its last call must not overlap the next side's timing."""
    spinner, stop = _spinning_thread(0.2)
    assert wait_until_idle()
    assert time.perf_counter() >= stop
    spinner.join()
    started = time.perf_counter()
    assert wait_until_idle()
    assert time.perf_counter() - started < 0.15  # nothing running: one window of 20 ms


def test_wait_until_idle_says_when_threads_keep_running():
    spinner, _ = _spinning_thread(1.0)
    assert not wait_until_idle(timeout=0.3)
    spinner.join()
