"""What `moecc bench` measures against: the weight bytes a decode step reads, and the machine's read bandwidth."""

from __future__ import annotations

import numpy as np

from compiler.architectures import expected_tensors
from compiler.checkpoint import Checkpoint
from runtime.benchmark import active_weight_bytes, read_bandwidth


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
