"""moecc.MoE and moecc.QMoE (runtime/kernels/moe.c): the same results as ONNX Runtime's MoE and QMoE node by node,
their unpacked and transposed weights folded when the session loads, and a clear word where they cannot stand in."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.quantization import pack, round_to_nearest
from kernel_sessions import MARCHES, kernel_session
from runtime.kernels import DOMAIN
from runtime.kernels.moe import swap, swap_quantized, unsupported, unsupported_quantized, why_not, why_not_quantized


def _moe_model(experts: int, hidden: int, inter: int, rank: int = 2, weight_type: int = TensorProto.FLOAT, **attributes) -> onnx.ModelProto:
    """One MoE node as the export writes it: float SwiGLU experts, interleaved gate and linear rows, no biases."""
    rng = np.random.default_rng(experts * hidden + inter)
    dtype = helper.tensor_dtype_to_np_dtype(weight_type)
    fc1 = (rng.standard_normal((experts, 2 * inter, hidden)) / np.sqrt(hidden)).astype(dtype)
    fc2 = (rng.standard_normal((experts, hidden, inter)) / np.sqrt(inter)).astype(dtype)
    tokens = ["tokens", hidden] if rank == 2 else ["batch", "sequence", hidden]
    node = helper.make_node(
        "MoE", ["input", "router", "fc1", "", "fc2"], ["output"], name="moe", domain="com.microsoft",
        **({"k": 2, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1} | attributes),
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "moe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, tokens), helper.make_tensor_value_info("router", TensorProto.FLOAT, ["tokens", experts])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _qmoe_model(experts: int, hidden: int, inter: int, bits: int, block: int = 32, **attributes) -> onnx.ModelProto:
    """One QMoE node as the quantize stage writes it: levels in blocks of `block` along each row (INT4), or with one
    scale per row where `block` is 0 (INT8), packed with their offset; fc1's rows are the interleaved gate and
    linear rows."""
    rng = np.random.default_rng(experts * hidden + inter + bits)
    initializers = []
    for name, shape in (("fc1", (experts, 2 * inter, hidden)), ("fc2", (experts, hidden, inter))):
        weight = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        levels, scales = round_to_nearest(weight, block or shape[-1], bits)
        initializers += [numpy_helper.from_array(pack(levels, bits), name), numpy_helper.from_array(scales if block else scales[..., 0], f"{name}.scales")]
    node = helper.make_node(
        "QMoE", ["input", "router", "fc1", "fc1.scales", "", "fc2", "fc2.scales"], ["output"], name="qmoe", domain="com.microsoft",
        **({"k": 2, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1, "expert_weight_bits": bits}
           | ({"block_size": block} if block else {}) | attributes),
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "qmoe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["tokens", hidden]), helper.make_tensor_value_info("router", TensorProto.FLOAT, ["tokens", experts])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _swap(model: onnx.ModelProto) -> int:
    if any(node.op_type == "QMoE" for node in model.graph.node):
        assert why_not_quantized(model) is None
        return swap_quantized(model)
    assert why_not(model) is None
    return swap(model)


def _session(model: onnx.ModelProto, ours: bool, optimized: str | None = None, march: str = "native") -> ort.InferenceSession:
    return kernel_session(model, _swap if ours else None, optimized, march)


def _feeds(model: onnx.ModelProto, tokens: int, shape: tuple[int, ...] | None = None, router: np.ndarray | None = None) -> dict[str, np.ndarray]:
    experts, hidden = next(tensor.dims[0] for tensor in model.graph.initializer if tensor.name == "fc1"), model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, hidden), dtype=np.float32)
    logits = rng.standard_normal((tokens, experts), dtype=np.float32) if router is None else router
    return {"input": x.reshape(shape or x.shape), "router": logits}


def _agree(model: onnx.ModelProto, feeds: dict[str, np.ndarray], march: str = "native") -> None:
    expected = _session(model, ours=False).run(None, feeds)[0]
    actual = _session(model, ours=True, march=march).run(None, feeds)[0]
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("tokens", [1, 3, 5, 17, 600], ids=lambda t: f"{t}-tokens")  # one to a prompt in two chunks
@pytest.mark.parametrize(
    "experts, k, hidden, inter", [(8, 2, 256, 128), (64, 8, 128, 64), (4, 4, 64, 16), (6, 2, 384, 48)], ids=["8x2", "64x8", "all-4", "uneven"]
)
@pytest.mark.parametrize("march", MARCHES)  # each vector width's loops this machine can run
def test_kernel_matches_onnx_runtime_moe(experts, k, hidden, inter, tokens, march):
    """Decode, verify and prefill widths; a few experts each chosen by many tokens, many chosen by few, k = E, and
    sizes that do not split evenly (3 units blocks per expert, a partial block of outputs per token)."""
    _agree(_moe_model(experts, hidden, inter, k=k), _feeds(_moe_model(experts, hidden, inter, k=k), tokens), march)


@pytest.mark.parametrize("bits, block", [(None, 0), (8, 0), (4, 32)], ids=["float", "int8-per-row", "int4"])
@pytest.mark.parametrize("shared", [True, False], ids=["same-two-experts", "spread-over-experts"])
def test_a_token_gets_the_same_bits_however_many_share_its_experts(shared, bits, block):
    """A verify block's tokens, bit for bit what each gets alone: every token on the same two experts (groups of
    up to four routes per pass, and from 3 routes, 8 for quantized experts, an expert's units a step at a time), or spread over
    all eight (so that a call's experts number from two to eight, and each expert's units are cut into the same
    pieces however many there are): greedy speculation is lossless only if the main model's verify scores a
    position exactly as its own decode step would."""
    model = _moe_model(8, 384, 192) if bits is None else _qmoe_model(8, 384, 192, bits, block)
    session = _session(model, ours=True)
    rng = np.random.default_rng(3)
    x, router = rng.standard_normal((13, 384), dtype=np.float32), rng.standard_normal((13, 8), dtype=np.float32)
    if shared:
        router[:, 3] += 5.0
        router[:, 5] += 4.0
    alone = np.concatenate([session.run(None, {"input": x[[token]], "router": router[[token]]})[0] for token in range(13)])
    for tokens in (2, 4, 5, 8, 9, 10, 13):  # groups of up to 4 or 6 tokens per step, and every remainder
        assert np.array_equal(session.run(None, {"input": x[:tokens], "router": router[:tokens]})[0], alone[:tokens]), f"{tokens} tokens"


@pytest.mark.parametrize(
    "attributes", [{"normalize_routing_weights": 0}, {"activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 7.0}],
    ids=["unnormalized", "alpha-beta-limit"],
)  # fmt: skip
def test_routing_and_activation_attributes(attributes):
    model = _moe_model(8, 64, 32, **attributes)
    feeds = _feeds(model, 9)
    feeds["input"] *= 4  # past the limit
    _agree(model, feeds)


def test_batched_input_ties_and_unselected_experts():
    """[B, S, H] input; the export's expert parts (each expert's logit repeated, so parts tie) and an expert-parallel
    partition's mask (-1e4 logits, unnormalized, more of k than selected experts: zero weights are skipped). k = 6
    of four-way ties takes two of a tie, so the tie rule (the higher experts, as ONNX Runtime's) shows."""
    rng = np.random.default_rng(1)
    tied = np.tile(rng.standard_normal((6, 4), dtype=np.float32), (1, 4))
    model = _moe_model(16, 64, 32, rank=3, k=6)
    _agree(model, _feeds(model, 6, shape=(2, 3, 64), router=tied))
    masked = np.full((6, 16), -1e4, np.float32)
    masked[:, [2, 9]] = rng.standard_normal((6, 2), dtype=np.float32)
    model = _moe_model(16, 64, 32, rank=3, k=8, normalize_routing_weights=0)
    _agree(model, _feeds(model, 6, shape=(2, 3, 64), router=masked))


def test_the_transposed_weights_are_folded_when_the_session_loads(tmp_path):
    """The swap feeds fc2 through a Transpose; ONNX Runtime makes it a constant, so no call transposes weights."""
    model = _moe_model(8, 64, 32)
    _session(model, ours=True, optimized=str(tmp_path / "optimized.onnx"))
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert [node.op_type for node in optimized.graph.node] == ["MoE"] and optimized.graph.node[0].domain == DOMAIN
    assert {tuple(tensor.dims) for tensor in optimized.graph.initializer} == {(8, 64, 64), (8, 32, 64)}, "fc1 and fc2 transposed"


def test_unsupported_nodes_stay_with_onnx_runtime_and_say_why():
    constants = {tensor.name: tensor for tensor in _moe_model(8, 64, 32).graph.initializer}

    def reason(model: onnx.ModelProto, known: dict | None = None) -> str | None:
        return unsupported(model.graph.node[0], {tensor.name: tensor for tensor in model.graph.initializer} if known is None else known)

    assert reason(_moe_model(8, 64, 32, activation_type="gelu")) == "sets activation_type=b'gelu'"
    assert reason(_moe_model(8, 64, 32, swiglu_fusion=2)) == "sets swiglu_fusion=2"
    assert reason(_moe_model(8, 64, 32, use_sparse_mixer=1)) == "sets use_sparse_mixer=1"
    assert reason(_moe_model(8, 64, 24)).startswith("hidden size 64 and expert size 24")
    assert reason(_moe_model(8, 64, 32, normalize_routing_weights=2)) == "sets normalize_routing_weights=2"
    assert reason(_moe_model(8, 64, 32, weight_type=TensorProto.FLOAT16)) == "its expert weights are not float32"
    assert reason(_moe_model(8, 64, 32), known={}) == "its expert weights are not constants"
    with_bias = _moe_model(8, 64, 32)
    with_bias.graph.node[0].input[3] = "fc1"
    assert reason(with_bias, constants) == "uses fc1_experts_bias"
    model = _moe_model(8, 64, 32, activation_type="gelu")
    assert why_not(model) == "moe: sets activation_type=b'gelu'"
    assert reason(_moe_model(8, 64, 32, k=9)) == "k is larger than its 8 experts"
    no_fusion = _moe_model(8, 64, 32)
    no_fusion.graph.node[0].attribute.remove(next(a for a in no_fusion.graph.node[0].attribute if a.name == "swiglu_fusion"))
    assert reason(no_fusion) == "no swiglu_fusion (the kernel takes interleaved SwiGLU)"


def test_bad_shapes_are_refused_before_anything_is_read():
    model = _moe_model(8, 64, 32)
    session = _session(model, ours=True)
    feeds = _feeds(model, 3)
    with pytest.raises(Exception, match="router logits must be"):
        session.run(None, feeds | {"router": feeds["router"][:2]})


@pytest.mark.parametrize("tokens", [1, 5, 17, 600], ids=lambda t: f"{t}-tokens")  # decode, verify, a short prompt, a prompt in two chunks
@pytest.mark.parametrize(
    "experts, k, hidden, inter, bits, block",
    [(8, 2, 256, 128, 4, 32), (16, 4, 64, 32, 4, 16), (6, 2, 384, 48, 4, 16), (8, 2, 256, 128, 4, 0), (8, 2, 256, 128, 8, 0), (4, 4, 64, 16, 8, 0)],
    ids=["int4", "int4-16x4", "int4-uneven", "int4-per-row", "int8-per-row", "int8-all-4"],
)  # fmt: skip
@pytest.mark.parametrize("march", MARCHES)
def test_quantized_kernel_matches_onnx_runtime_qmoe(experts, k, hidden, inter, bits, block, tokens, march):
    """Float products on the levels times their scales, as ONNX Runtime's QMoE computes them (to float rounding),
    for INT4 blocks of 32 and 16 (3 blocks per fc2 row), INT4 and INT8 rows, k = E, and sizes that do not split evenly."""
    model = _qmoe_model(experts, hidden, inter, bits, block, k=k)
    _agree(model, _feeds(model, tokens), march)


def test_quantized_weights_are_unpacked_and_transposed_when_the_session_loads(tmp_path):
    """The swap's unpacking and transposes become constants: one level per byte, fc2 and its scales transposed,
    and nothing of the packed weights left in the session."""
    model = _qmoe_model(8, 64, 32, 4, 16)
    _session(model, ours=True, optimized=str(tmp_path / "optimized.onnx"))
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert [node.op_type for node in optimized.graph.node] == ["QMoE"] and optimized.graph.node[0].domain == DOMAIN
    shapes = {tensor.name: (tuple(tensor.dims), tensor.data_type) for tensor in optimized.graph.initializer}
    assert sorted(shapes.values()) == sorted([((8, 64, 64), TensorProto.UINT8), ((8, 64, 4), TensorProto.FLOAT), ((8, 32, 64), TensorProto.UINT8), ((8, 2, 64), TensorProto.FLOAT)])
    per_row = _qmoe_model(8, 64, 32, 8, 0)
    _session(per_row, ours=True, optimized=str(tmp_path / "per_row.onnx"))
    shapes = sorted((tuple(tensor.dims), tensor.data_type) for tensor in onnx.load(tmp_path / "per_row.onnx").graph.initializer)
    assert shapes == sorted([((8, 64, 64), TensorProto.UINT8), ((8, 64, 1), TensorProto.FLOAT), ((8, 32, 64), TensorProto.UINT8), ((8, 1, 64), TensorProto.FLOAT)])


def test_unsupported_quantized_nodes_stay_with_onnx_runtime_and_say_why():
    def reason(model: onnx.ModelProto, known: dict | None = None) -> str | None:
        return unsupported_quantized(model.graph.node[0], {tensor.name: tensor for tensor in model.graph.initializer} if known is None else known)

    assert reason(_qmoe_model(8, 64, 32, 4)) is None
    mixing = _qmoe_model(8, 64, 32, 4)
    mixing.graph.node[0].input.extend([""] * 7 + ["router"])
    assert reason(mixing) == "normalize_routing_weights=1 with router weights"
    assert reason(_qmoe_model(8, 64, 32, 4, normalize_routing_weights=0)) == "normalize_routing_weights=0 without router weights"  # ONNX Runtime renormalizes
    other_block = _qmoe_model(8, 64, 32, 4, 16)
    next(a for a in other_block.graph.node[0].attribute if a.name == "block_size").i = 32
    assert reason(other_block).startswith("scales [8, 64, 4] for [8, 64, 64] weights in blocks of 32")
    old_opset = _qmoe_model(8, 64, 32, 4)
    old_opset.opset_import[0].version = 17
    assert why_not_quantized(old_opset) == "qmoe: opset 17 (unpacking INT4 levels takes BitwiseAnd, opset 18)"
    old_opset = _qmoe_model(8, 64, 32, 8, 0)
    old_opset.opset_import[0].version = 12
    assert why_not_quantized(old_opset) == "qmoe: opset 12 (the swap's Unsqueeze takes its axes as an input, opset 13)"
    later = _qmoe_model(8, 64, 32, 4)
    later.graph.node[0].input.extend([""] * 8 + ["fc1.scales"])
    assert reason(later) == "uses inputs past router_weights"
    fc3 = _qmoe_model(8, 64, 32, 4)
    fc3.graph.node[0].input.extend(["", "fc1"])
    assert reason(fc3) == "uses fc3_experts_weights"
    assert reason(_qmoe_model(8, 64, 32, 4, 8)).startswith("scales [8, 64, 8] for [8, 64, 64] weights")
    assert reason(_qmoe_model(8, 64, 32, 4, activation_type="gelu")) == "sets activation_type=b'gelu'"
    assert reason(_qmoe_model(8, 64, 32, 4), known={}) == "its expert weights or scales are not constants"
    assert reason(_qmoe_model(8, 64, 32, 8, 32)) == "block-wise INT8 scales (the kernel takes one per row)"  # ONNX Runtime rounds their activations
    assert reason(_qmoe_model(8, 64, 32, 8, 0, expert_weight_bits=2)) == "sets expert_weight_bits=2"
    mismatched = _qmoe_model(8, 64, 32, 4)
    mismatched.graph.node[0].attribute.remove(next(a for a in mismatched.graph.node[0].attribute if a.name == "expert_weight_bits"))
    mismatched.graph.node[0].attribute.append(helper.make_attribute("expert_weight_bits", 8))
    assert reason(mismatched).startswith("fc1 [8, 64, 32] and fc2")  # INT4's packed bytes read as INT8 levels
    model = _qmoe_model(8, 64, 32, 4, k=9)
    assert why_not_quantized(model) == "qmoe: k is larger than its 8 experts"


def test_quantized_kernel_mixes_by_router_weights():
    """A layer split over several QMoE nodes (experts of two precisions, or partitions) passes each node the full top
    k's mixing weights, unnormalized: each node picks its top k by its own logits and weighs them by those (zero for
    experts the layer did not choose, which it skips), as ONNX Runtime's QMoE does."""
    model = _qmoe_model(8, 64, 32, 4, normalize_routing_weights=0)
    model.graph.node[0].input.extend([""] * 7 + ["mixing"])
    model.graph.input.append(helper.make_tensor_value_info("mixing", TensorProto.FLOAT, ["tokens", 8]))
    for tokens in (1, 5, 17, 600):  # 600: a second chunk reads its own rows of the mixing weights
        feeds = _feeds(model, tokens)
        rng = np.random.default_rng(tokens)
        feeds["mixing"] = (rng.random((tokens, 8)) * (rng.random((tokens, 8)) < 0.6)).astype(np.float32)
        _agree(model, feeds)
