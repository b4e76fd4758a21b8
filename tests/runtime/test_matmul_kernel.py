"""moecc.MatMul (runtime/kernels/matmul.c): the same products as ONNX Runtime's MatMul for a decode step's one row,
a verify's few and a prompt's many, its weight panels folded when the session loads, and the MatMuls it cannot
run left to ONNX Runtime with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernel_sessions import MARCHES, kernel_session
from runtime.kernels import DOMAIN, matmul
from runtime.kernels.matmul import swap, why_not


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    """The kernel's arithmetic on small weights too: the swap's size floor is tested on its own."""
    monkeypatch.setattr(matmul, "MIN_WEIGHTS", 0)


def _model(inner: int, columns: int, rank: int = 3, weight_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x [B, S, K] (or [S, K]) times constant weights [K, N], and a second MatMul by a computed matrix."""
    rng = np.random.default_rng(inner * columns)
    weights = (rng.standard_normal((inner, columns)) / np.sqrt(inner)).astype(helper.tensor_dtype_to_np_dtype(weight_type))
    shape = ["batch", "sequence", inner][3 - rank :]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weights"], ["y"], name="dense")], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weights, "weights")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _swap(model: onnx.ModelProto) -> int:
    assert why_not(model) is None
    return swap(model)


def _session(model: onnx.ModelProto, ours: bool, optimized: str | None = None, march: str = "native") -> ort.InferenceSession:
    return kernel_session(model, _swap if ours else None, optimized, march)


# decode, verify (whole-panel and half-panel passes), several passes per panel, chunks, prefill
@pytest.mark.parametrize("rows", [1, 2, 5, 7, 12, 13, 24, 25, 49, 400], ids=lambda rows: f"{rows}-rows")
# K in blocks of the panel's rows and not (100: three and a part), K below one block (24)
@pytest.mark.parametrize("inner, columns", [(384, 3072), (1536, 384), (100, 64), (24, 32)], ids=["wide", "deep", "ragged", "one-panel"])
@pytest.mark.parametrize("march", MARCHES)  # each vector width's passes this machine can run
def test_kernel_matches_onnx_runtime_matmul(inner, columns, rows, march):
    model = _model(inner, columns)
    x = np.random.default_rng(rows).standard_normal((1, rows, inner), dtype=np.float32)
    expected = _session(model, ours=False).run(None, {"x": x})[0]
    actual = _session(model, ours=True, march=march).run(None, {"x": x})[0]
    assert actual.shape == expected.shape == (1, rows, columns)
    assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))


def test_batched_and_two_dimensional_inputs():
    for rank, shape in ((3, (3, 7, 64)), (2, (7, 64))):
        model = _model(64, 96, rank=rank)
        x = np.random.default_rng(rank).standard_normal(shape, dtype=np.float32)
        np.testing.assert_allclose(_session(model, ours=True).run(None, {"x": x})[0], x @ _weights(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("inner, columns", [(384, 3072), (1536, 384)], ids=["wide", "deep"])
def test_a_row_gets_the_same_bits_in_a_call_of_any_width(inner, columns):
    """Each row of a verify block or a prompt, bit for bit what it gets alone: greedy speculation is lossless only
    if the main model's verify scores a position exactly as its own decode step would (a near-tie would flip)."""
    session = _session(_model(inner, columns), ours=True)
    x = np.random.default_rng(inner).standard_normal((1, 49, inner), dtype=np.float32)
    alone = np.concatenate([session.run(None, {"x": x[:, [row]]})[0] for row in range(49)], axis=1)
    for rows in (2, 5, 9, 13, 24, 25, 49):  # one pass, passes of 3 by blocks, half-panel passes by blocks, a prompt's whole-panel passes
        assert np.array_equal(session.run(None, {"x": x[:, :rows]})[0], alone[:, :rows]), f"{rows} rows"


def _weights(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(model.graph.initializer[0])


def test_the_panels_are_folded_when_the_session_loads(tmp_path):
    """The swap feeds the weights through a Reshape and a Transpose; ONNX Runtime makes them one constant."""
    _session(_model(64, 96), ours=True, optimized=str(tmp_path / "optimized.onnx"))
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert [(node.op_type, node.domain) for node in optimized.graph.node] == [("MatMul", DOMAIN)]
    assert [list(tensor.dims) for tensor in optimized.graph.initializer] == [[3, 64, 32]]


def test_weights_a_core_keeps_in_cache_stay_with_onnx_runtime(monkeypatch):
    monkeypatch.setattr(matmul, "MIN_WEIGHTS", 1 << 18)
    assert why_not(_model(384, 640)) == "no MatMul has float32 constant weights of a multiple of 32 columns and at least 262144 of them"
    assert why_not(_model(384, 1024)) is None


def test_matmuls_it_cannot_run_stay_with_onnx_runtime_and_say_why():
    """A router's 8 columns, integer weights and computed weights are not the kernel's; a model with some of
    each swaps only the MatMul it can run, sharing one panelled copy between the nodes that read its weights."""
    assert why_not(_model(64, 8)) == "no MatMul has float32 constant weights of a multiple of 32 columns and at least 0 of them"
    assert why_not(_model(64, 64, weight_type=TensorProto.INT32)) is not None
    model = _model(64, 64)
    router = numpy_helper.from_array(np.ones((64, 8), np.float32), "router")
    model.graph.initializer.append(router)
    model.graph.node.extend([
        helper.make_node("MatMul", ["x", "router"], ["logits"], name="router"),
        helper.make_node("MatMul", ["x", "weights"], ["again"], name="again"),
        helper.make_node("MatMul", ["y", "y_t"], ["computed"], name="computed"),
    ])  # fmt: skip
    assert swap(model) == 2
    kinds = {node.name: (node.op_type, node.domain) for node in model.graph.node}
    assert kinds["dense"] == kinds["again"] == ("MatMul", DOMAIN) and kinds["router"] == kinds["computed"] == ("MatMul", "")
    assert [node.op_type for node in model.graph.node].count("Transpose") == 1
