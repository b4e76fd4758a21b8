"""Lowering for the CPU kernels: experts split into sub-experts compute the same layer."""

from __future__ import annotations

import numpy as np
import pytest

from compiler import quantization
from compiler.stages import lower
from onnx_models import EXPERTS, HIDDEN, INNER, PRECISIONS, TOP_K, moe_layer as _layer, moe_model, run_moe

@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("parts", [2, 4])
def test_split_experts_compute_the_same_layer(precision, renormalize, parts):
    rng = np.random.default_rng(3)
    x, router = rng.standard_normal((9, HIDDEN), dtype=np.float32), rng.standard_normal((9, EXPERTS), dtype=np.float32)
    expected = run_moe(_layer(precision, renormalize), x, router)

    model = _layer(precision, renormalize)
    nodes = [node for node in model.graph if node.op_type in ("MoE", "QMoE")]
    experts = [node.inputs[2].const_value.numpy().shape[0] for node in nodes]  # a mixed layer's QMoE holds a subset
    for node in nodes:
        assert lower._why_not(node, parts) is None
        lower._split(model.graph, node, parts)
    assert [node.inputs[2].const_value.numpy().shape[0] for node in nodes] == [parts * n for n in experts]
    assert np.abs(run_moe(model, x, router) - expected).max() <= 1e-5
    for row in range(len(x)):  # one token at a time, as in decoding
        assert np.abs(run_moe(model, x[row : row + 1], router[row : row + 1]) - expected[row]).max() <= 1e-5


def test_fp16_experts_stay_whole():
    """fp16 router logits tie far more easily than fp32 ones, and tied experts would each get some of their parts."""
    rng = np.random.default_rng(4)
    fc1 = rng.standard_normal((EXPERTS, 2 * INNER, HIDDEN)).astype(np.float16)
    fc2 = rng.standard_normal((EXPERTS, HIDDEN, INNER)).astype(np.float16)
    (node,) = [node for node in moe_model(fc1, fc2, TOP_K, True).graph if node.op_type == "MoE"]
    assert lower._why_not(node, 2) == "fp16 router logits can tie exactly, and tied experts would each get some of their parts"


def test_one_part_writes_no_model(tmp_path):
    result = lower.run(None, lower.LowerConfig(expert_parts=1), tmp_path, model_dir=tmp_path)
    assert result.split_nodes == [] and not (tmp_path / "model.onnx").exists()


def test_experts_whose_blocks_do_not_split_stay_whole():
    model = _layer("int4", True)  # INT4 blocks of 32 along an intermediate width of 128: four blocks
    (node,) = [node for node in model.graph if node.op_type == "QMoE"]
    assert lower._why_not(node, 8) == "fc2's blocks of 32 do not split into 8"
