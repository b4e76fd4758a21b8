"""moecc.Attention (runtime/kernels/attention.c): the same results as ONNX Runtime's GroupQueryAttention node
by node, the shipped model's query and key norms folded into it, and a clear word where it cannot stand in.
Whole models with moecc's kernels: test_kernel_session.py."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kernel_sessions import MARCHES, kernel_session
from runtime.kernels.attention import swap, unsupported, why_not

CAPACITY = 96


def _attention_model(heads: int, kv_heads: int, dim: int, packed: bool, int8: bool, capacity: int = CAPACITY, **attributes) -> onnx.ModelProto:
    """One GroupQueryAttention node as the export writes it: rotary tables, query_seqlens, optional int8 cache."""
    cache_type = TensorProto.INT8 if int8 else TensorProto.FLOAT
    width = (heads + 2 * kv_heads) * dim if packed else heads * dim
    inputs = [helper.make_tensor_value_info("query", TensorProto.FLOAT, ["batch", "new", width])]
    if not packed:
        inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "new", kv_heads * dim]) for name in ("key", "value")]
    inputs += [helper.make_tensor_value_info(name, cache_type, ["batch", kv_heads, capacity, dim]) for name in ("past_key", "past_value")]
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("query_seqlens", TensorProto.INT32, ["batch"]),
    ]
    angles = np.arange(capacity)[:, None] / 10000 ** (np.arange(dim // 2) / (dim // 2))
    initializers = [
        helper.make_tensor("cos", TensorProto.FLOAT, angles.shape, np.cos(angles).astype(np.float32).ravel()),
        helper.make_tensor("sin", TensorProto.FLOAT, angles.shape, np.sin(angles).astype(np.float32).ravel()),
    ]
    scales = ["", "", "", "", ""]
    if int8:  # per channel, different for keys and values
        for name, scales in _cache_scales(kv_heads, dim).items():
            initializers.append(helper.make_tensor(name, TensorProto.FLOAT, [1, kv_heads, 1, dim], scales.ravel()))
        scales = ["", "", "", "k_scale", "v_scale"]
        attributes |= {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "" if packed else "key", "" if packed else "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
         "cos", "sin", *scales, "", "", "query_seqlens"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft", **({"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 1, "rotary_interleaved": 0} | attributes),
    )  # fmt: skip
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    outputs += [helper.make_tensor_value_info(name, cache_type, None) for name in ("present_key", "present_value")]
    graph = helper.make_graph([node], "attention", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _cache_scales(kv_heads: int, dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(kv_heads * dim)
    return {name: rng.uniform(0.02, 0.08, (kv_heads, dim)).astype(np.float32) for name in ("k_scale", "v_scale")}


def _quantized(caches: dict[str, np.ndarray], kv_heads: int, dim: int) -> dict[str, np.ndarray]:
    """Float caches as int8 levels at _cache_scales' scales (the model's own)."""
    scales = _cache_scales(kv_heads, dim)
    return {name: np.clip(np.round(caches[name] / scales[scale_name][None, :, None, :]), -127, 127).astype(np.int8) for name, scale_name in (("past_key", "k_scale"), ("past_value", "v_scale"))}


def _session(model: onnx.ModelProto, dim: int, fused: bool, march: str = "native") -> ort.InferenceSession:
    def swapped(model: onnx.ModelProto) -> int:
        assert why_not(model, dim) is None
        return swap(model, dim)

    return kernel_session(model, swapped if fused else None, march=march)


def _run(session, feeds: dict, caches: dict, bound: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The output and the present caches, with past and present in one buffer (as the runtime binds them) or not."""
    if not bound:
        return tuple(session.run(None, feeds | caches))
    binding = session.io_binding()
    arrays = {name: array.copy() for name, array in caches.items()}  # the OrtValues share their memory
    for name, array in arrays.items():
        value = ort.OrtValue.ortvalue_from_numpy(array)
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past", "present"), value)
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    binding.bind_output("output", "cpu")
    session.run_with_iobinding(binding)
    return binding.get_outputs()[-1].numpy(), arrays["past_key"], arrays["past_value"]


def _tolerance(expected: np.ndarray, unrounded: np.ndarray | None, new: np.ndarray) -> float:
    """How far the kernel's output may lie from ONNX Runtime's (expected) at each row's new positions: float
    rounding, and with an int8 cache a hundredth of what rounding the cache to 8 bits moves ONNX Runtime's output
    (unrounded: its output on the float cache). The kernel scores an int8 cache with each query rounded to 16
    bits, for exact integer sums (attention.c): an error of the same kind as the cache's own, 2^-16 of the
    query's largest magnitude against 2^-8 of a channel's range: here at most 1/200 of it. (Padding positions
    hold whatever ONNX Runtime left there.)"""
    if unrounded is None:
        return 2e-5
    moved = max(float(np.abs(unrounded[row, :count] - expected[row, :count]).max(initial=0.0)) for row, count in enumerate(new))
    return max(2e-5, moved / 100)


@pytest.mark.parametrize("int8", [False, True], ids=["float-cache", "int8-cache"])
@pytest.mark.parametrize(
    "heads, kv_heads, dim, packed, scale",
    [(8, 2, 64, False, 0.0), (8, 2, 64, True, 0.0), (6, 2, 32, False, 0.0), (8, 8, 16, True, 0.0), (16, 2, 128, False, 0.0),
     (4, 2, 48, False, 0.3), (16, 1, 32, True, 0.0), (8, 2, 64, False, 3.0), (4, 2, 80, False, 0.0)],
    ids=["group4", "group4-packed", "group3", "group1-packed", "group8-dim128", "group2-dim48-scaled", "group16-packed", "group4-peaked", "group2-dim80"],
)  # fmt: skip
@pytest.mark.parametrize("width", [1, 5, 40], ids=["decode", "verify", "prefill"])
@pytest.mark.parametrize("bound", [True, False], ids=["in-place", "copied"])
@pytest.mark.parametrize("march", MARCHES)  # each vector width's loops this machine can run
def test_kernel_matches_group_query_attention(heads, kv_heads, dim, packed, scale, int8, width, bound, march):
    """Two rows with different cached lengths, the second right-padded (two new tokens fewer, or none new). The
    peaked case's scores spread over hundreds, so that some weights in most rows fall below the kernel's
    exponential's floor (without the floor, their exponent wraps around)."""
    rng = np.random.default_rng(heads * dim + width)
    attributes = {"scale": scale} if scale else {}
    model = _attention_model(heads, kv_heads, dim, packed, int8, **attributes)
    cached, new = np.array([5, 37]), np.array([width, max(width - 2, 0)])
    feeds = {"query": rng.standard_normal((2, width, (heads + 2 * kv_heads) * dim if packed else heads * dim), dtype=np.float32)}
    if not packed:
        feeds |= {name: rng.standard_normal((2, width, kv_heads * dim), dtype=np.float32) for name in ("key", "value")}
    feeds |= {
        "seqlens_k": (cached + new - 1).astype(np.int32),
        "total_sequence_length": np.array((cached + new).max(), np.int32),
        "query_seqlens": new.astype(np.int32),
    }
    caches = {name: rng.standard_normal((2, kv_heads, CAPACITY, dim), dtype=np.float32) for name in ("past_key", "past_value")}
    unrounded = _run(_session(_attention_model(heads, kv_heads, dim, packed, False, **attributes), dim, fused=False), feeds, caches, bound)[0] if int8 else None
    if int8:
        caches = _quantized(caches, kv_heads, dim)
    expected = _run(_session(model, dim, fused=False), feeds, caches, bound)
    actual = _run(_session(model, dim, fused=True, march=march), feeds, caches, bound)
    tolerance = _tolerance(expected[0], unrounded, new)
    for row in range(2):
        count = new[row]
        np.testing.assert_allclose(actual[0][row, :count], expected[0][row, :count], atol=tolerance, rtol=0)
        assert not actual[0][row, count:].any(), "padding positions are zeros"
        for present, reference in zip(actual[1:], expected[1:]):  # the cache up to the row's new length
            length = cached[row] + count
            difference = np.abs(present[row, :, :length].astype(np.float32) - reference[row, :, :length].astype(np.float32))
            assert difference.max() <= (1 if int8 else 1e-5), "an int8 cache may round a tie the other way, by one step"


@pytest.mark.parametrize("int8", [False, True], ids=["float-cache", "int8-cache"])
@pytest.mark.parametrize(
    "heads, kv_heads, width",
    [(6, 2, 5), (6, 2, 9), (2, 1, 1), (6, 2, 1), (6, 2, 40)],
    ids=["verify-5", "verify-9", "decode-one-kv-head", "decode-two-kv-heads", "prefill-40"],
)  # fmt: skip
@pytest.mark.parametrize("march", MARCHES)
def test_a_call_after_a_long_cache_matches_group_query_attention(heads, kv_heads, width, int8, march):
    """Hundreds of cached rows, small-coder's heads (main and draft). A decode step's or a verify's tokens, with
    these few key/value heads, split the cache into parts at multiples of 256 rows per key/value head (4 and 2
    parts after 900 with one head, 2 and 1 with two), whose sums are merged. The AVX2 kernel walks a prompt's in
    blocks of 60 with a running softmax, and the keys grow along the cache, so that nearly every block's scores
    rise above the maxima so far and the sums are rescaled; the last block is ragged."""
    dim, capacity = 64, 1024
    rng = np.random.default_rng(width + kv_heads)
    model = _attention_model(heads, kv_heads, dim, False, int8, capacity)
    cached, new = np.array([900, 301]), np.array([width, max(width - 2, 0)])
    feeds = {"query": rng.standard_normal((2, width, heads * dim), dtype=np.float32)}
    feeds |= {name: rng.standard_normal((2, width, kv_heads * dim), dtype=np.float32) for name in ("key", "value")}
    feeds |= {"seqlens_k": (cached + new - 1).astype(np.int32), "total_sequence_length": np.array((cached + new).max(), np.int32), "query_seqlens": new.astype(np.int32)}
    growth = np.linspace(0.5, 2.0, capacity, dtype=np.float32)[None, None, :, None]
    caches = {name: rng.standard_normal((2, kv_heads, capacity, dim), dtype=np.float32) for name in ("past_key", "past_value")}
    caches["past_key"] *= growth
    unrounded = _run(_session(_attention_model(heads, kv_heads, dim, False, False, capacity), dim, fused=False), feeds, caches, True)[0] if int8 else None
    if int8:
        caches = _quantized(caches, kv_heads, dim)
    expected = _run(_session(model, dim, fused=False), feeds, caches, True)
    actual = _run(_session(model, dim, fused=True, march=march), feeds, caches, True)
    tolerance = _tolerance(expected[0], unrounded, new)
    for row in range(2):
        np.testing.assert_allclose(actual[0][row, : new[row]], expected[0][row, : new[row]], atol=tolerance, rtol=0)
        assert not actual[0][row, new[row] :].any(), "padding positions are zeros"


@pytest.mark.parametrize("int8", [False, True], ids=["float-cache", "int8-cache"])
@pytest.mark.parametrize(
    "heads, kv_heads, dim", [(6, 2, 64), (2, 1, 64), (8, 2, 64), (16, 1, 64), (8, 8, 64), (6, 2, 80), (8, 2, 128)],
    ids=["group3", "group2", "group4", "group16", "group1", "group3-dim80", "group4-dim128"],  # 80: a head wider than whole passes of the weighted sums
)  # fmt: skip
@pytest.mark.parametrize("march", MARCHES)
def test_a_token_gets_the_same_bits_in_a_step_as_in_its_own_decode_step(heads, kv_heads, dim, int8, march):
    """A verify's tokens (up to 33, the most a step takes), each bit for bit what its own decode step of the row
    alone gives: greedy speculation is lossless only if the main model's verify scores a position exactly as
    its decode step would. Three rows, the last padded, after 250, 370 and 500 cached rows. The first's and the
    last's tokens cross the cache's parts within the call (multiples of 256 rows per key/value head: 256 with
    one, 512 with two). The second's keys straddle the length from which an int8 cache's scores are tile
    multiplies where the machine has AMX (attention.c, AMX_MIN_KEYS: 384 keys of a part, a head size a multiple
    of 64), which parts of two key/value heads or more reach (group3, group4, group1, group4-dim128): the decode
    steps of its first tokens score in vectors, its verify's walk in tiles."""
    capacity, width = 600, 33
    rng = np.random.default_rng(heads + kv_heads)
    model = _attention_model(heads, kv_heads, dim, True, int8, capacity)
    session = _session(model, dim, fused=True, march=march)
    cached, new = np.array([250, 370, 500]), np.array([width, width, width - 4])
    query = rng.standard_normal((3, width, (heads + 2 * kv_heads) * dim), dtype=np.float32)
    caches = {name: rng.standard_normal((3, kv_heads, capacity, dim), dtype=np.float32) for name in ("past_key", "past_value")}
    if int8:
        caches = _quantized(caches, kv_heads, dim)
    lengths = {"seqlens_k": (cached + new - 1).astype(np.int32), "total_sequence_length": np.array((cached + new).max(), np.int32), "query_seqlens": new.astype(np.int32)}
    step = _run(session, {"query": query} | lengths, caches, True)[0]
    for row in range(3):
        cache = {name: array[row : row + 1] for name, array in caches.items()}
        for token in range(new[row]):
            length = cached[row] + token + 1
            feeds = {"query": query[row : row + 1, token : token + 1], "seqlens_k": np.array([length - 1], np.int32),
                     "total_sequence_length": np.array(length, np.int32), "query_seqlens": np.array([1], np.int32)}  # fmt: skip
            alone, *present = _run(session, feeds, cache, False)
            cache = dict(zip(("past_key", "past_value"), present))
            assert np.array_equal(step[row, token], alone[0, 0]), f"row {row}, token {token}"


@pytest.mark.parametrize("march", MARCHES)
def test_an_int8_cache_keeps_the_weight_of_a_long_tail_behind_an_attention_sink(march):
    """One cached key scores 11.2 above the 4,095 others, whose weights (e^-11.2 = 1.4e-5 each) still make 5 % of
    the softmax's total: a long context's tail behind an attention sink. The kernel weighs an int8 cache's values
    in integers, each weight rounded to 16 bits of the largest in its block of 128 keys (attention.c, weigh_int8),
    so the sink's block loses at most half a level of each of its 127 other keys (0.2 % of the total): 0.0017 here,
    where weighing in floats is off by 0.0002. Rounded to 16 bits of the row's largest instead, every tail weight
    rounded to nothing and the output moved by 0.055. Eight
    key/value heads, so that the cache is not cut into parts, each with its own largest weight; the sink is head
    0's, the others read a flat cache. Against the softmax over the dequantized cache in float64."""
    heads = kv_heads = 8
    dim, cached = 64, 4096
    capacity = cached + 8
    model = _attention_model(heads, kv_heads, dim, False, True, capacity)
    query = np.random.default_rng(5).standard_normal((1, 1, heads * dim), dtype=np.float32)
    half = dim // 2  # the new token's rotation at its position: the export's non-interleaved rotary
    angles = cached / 10000 ** (np.arange(half) / half)
    rotated = query.reshape(heads, dim).astype(np.float64)
    rotated = np.concatenate([rotated[:, :half] * np.cos(angles) - rotated[:, half:] * np.sin(angles),
                              rotated[:, half:] * np.cos(angles) + rotated[:, :half] * np.sin(angles)], axis=1)  # fmt: skip
    keys = np.zeros((1, kv_heads, capacity, dim), np.float32)
    keys[0, 0, 0] = rotated[0] * 11.2 * np.sqrt(dim) / (rotated[0] @ rotated[0])
    values = np.ones((1, kv_heads, capacity, dim), np.float32)
    values[0, :, 0] = -1.0
    caches = _quantized({"past_key": keys, "past_value": values}, kv_heads, dim)
    feeds = {"query": query, "key": np.zeros((1, 1, kv_heads * dim), np.float32), "value": np.ones((1, 1, kv_heads * dim), np.float32),
             "seqlens_k": np.array([cached], np.int32), "total_sequence_length": np.array(cached + 1, np.int32), "query_seqlens": np.array([1], np.int32)}  # fmt: skip
    actual = _run(_session(model, dim, fused=True, march=march), feeds, caches, True)[0].reshape(heads, dim)
    scales = _cache_scales(kv_heads, dim)
    for head in range(heads):
        stored_keys = caches["past_key"][0, head, :cached] * scales["k_scale"][head]
        stored_values = np.vstack([caches["past_value"][0, head, :cached] * scales["v_scale"][head], np.ones(dim)])  # the new token's own
        scores = np.append(stored_keys @ rotated[head], 0.0) / np.sqrt(dim)  # its own key is zeros
        weights = np.exp(scores - scores.max())
        np.testing.assert_allclose(actual[head], weights @ stored_values / weights.sum(), atol=3e-3, rtol=0, err_msg=f"head {head}")
    assert 0.04 < 4095 * np.exp(-11.2) / (1 + 4096 * np.exp(-11.2)), "the tail holds a twentieth of the weight"


def test_unsupported_nodes_stay_with_onnx_runtime_and_say_why():
    model = _attention_model(8, 2, 64, packed=False, int8=False, softcap=30.0)
    node = model.graph.node[0]
    assert unsupported(node, 64, TensorProto.FLOAT, {}) == "sets softcap=30.0"
    assert why_not(model, 64) == f"{node.name}: sets softcap=30.0"
    assert unsupported(_attention_model(8, 2, 64, packed=False, int8=False, rotary_interleaved=1).graph.node[0], 64, TensorProto.FLOAT, {}) == "sets rotary_interleaved=1"
    assert unsupported(_attention_model(8, 2, 64, packed=False, int8=False, do_rotary=0).graph.node[0], 64, TensorProto.FLOAT, {}) == "sets do_rotary=0"
    assert unsupported(_attention_model(8, 2, 20, packed=False, int8=False).graph.node[0], 20, TensorProto.FLOAT, {}).startswith("head size 20")
    assert unsupported(node, 64, TensorProto.FLOAT16, {}).startswith("a float16 cache")
    assert unsupported(_attention_model(8, 2, 64, packed=False, int8=False).graph.node[0], 64, TensorProto.FLOAT, {"cos": [96, 16]}) == "a partial rotary embedding"


def test_the_query_and_key_norms_fold_into_the_kernel(shipped_artifact):
    """Qwen3's per-head norms: the Split of q, k and v and each norm's Reshape, norm, Reshape go; the rest stays."""
    model = onnx.load(shipped_artifact / "main" / "model.onnx", load_external_data=False)
    before = Counter(node.op_type for node in model.graph.node)
    assert why_not(model, 64) is None and swap(model, 64) == 4
    after = Counter(node.op_type for node in model.graph.node)
    layers = before["GroupQueryAttention"]
    assert after["Attention"] == layers and not after["GroupQueryAttention"]
    assert before - after == Counter({"GroupQueryAttention": layers, "Split": layers, "Reshape": 4 * layers, "SimplifiedLayerNormalization": 2 * layers})
    attention = next(node for node in model.graph.node if node.op_type == "Attention")
    assert next(node for node in model.graph.node if attention.input[0] in node.output).op_type == "MatMul", "the qkv projection"
    assert [attention.input[index] for index in (1, 2)] == ["", ""], "q, k and v reach the kernel packed"
    assert {"epsilon"} <= {attribute.name for attribute in attention.attribute}
    read = {name for node in model.graph.node for name in node.input}
    assert all(tensor.name in read for tensor in model.graph.initializer), "the folded nodes' constants go with them"


@pytest.mark.parametrize("seqlens_k, query_seqlens", [(CAPACITY, 1), (10, 2)], ids=["past-the-cache", "more-than-the-call"])
def test_lengths_that_do_not_fit_are_refused_before_anything_is_read(seqlens_k, query_seqlens):
    model = _attention_model(8, 2, 64, packed=False, int8=False)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((1, 1, width), dtype=np.float32) for name, width in (("query", 512), ("key", 128), ("value", 128))}
    feeds |= {"seqlens_k": np.array([seqlens_k], np.int32), "total_sequence_length": np.array(seqlens_k + 1, np.int32), "query_seqlens": np.array([query_seqlens], np.int32)}
    caches = {name: np.zeros((1, 2, CAPACITY, 64), np.float32) for name in ("past_key", "past_value")}
    with pytest.raises(Exception, match="lengths do not fit"):
        _run(_session(model, 64, fused=True), feeds, caches, bound=False)
