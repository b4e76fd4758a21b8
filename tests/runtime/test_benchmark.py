"""What `moecc bench` measures against: the weight and KV cache bytes a decode step reads, and the machine's read bandwidth."""

from __future__ import annotations

import threading
import time

import numpy as np

from compiler.architectures import expected_tensors
from compiler.checkpoint import Checkpoint
from runtime.artifact import ModelEntry
from runtime.benchmark import active_weight_bytes, kv_bytes_per_token, read_bandwidth, wait_until_idle


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
