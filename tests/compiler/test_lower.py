"""Lowering for the CPU kernels: experts split into sub-experts compute the same layer."""

from __future__ import annotations

import numpy as np
import pytest

from compiler import quantization
from compiler.stages import lower, quantize
from compiler.weight_sites import moe_sites
from onnx_models import moe_model, run_moe

EXPERTS, INNER, HIDDEN, TOP_K = 6, 128, 64, 2
PRECISIONS = {"fp32": {}, "int4": {e: "int4" for e in range(EXPERTS)}, "int8": {e: "int8" for e in range(EXPERTS)}, "mixed": {0: "int8", 3: "int8"}}


def _layer(precision: str, renormalize: bool):
    rng = np.random.default_rng(2)
    fc1 = rng.standard_normal((EXPERTS, 2 * INNER, HIDDEN), dtype=np.float32) * 0.1
    fc2 = rng.standard_normal((EXPERTS, HIDDEN, INNER), dtype=np.float32) * 0.1
    model = moe_model(fc1, fc2, TOP_K, renormalize)
    if precision != "fp32":
        chosen = PRECISIONS[precision]
        choices = [quantize.ExpertChoice(layer=0, expert=e, precision=chosen.get(e, "int4"), routed_share=0.0, reason="test") for e in range(EXPERTS)]
        (site,) = moe_sites(model)
        quantize._lower_moe(model.graph, site, choices, quantize._Quantizer(quantize.QuantizeConfig(), {}), 32)
    return model


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
