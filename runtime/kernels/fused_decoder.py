"""moecc.FusedDecoder (fused_decoder.c) in place of a whole decoder's graph, as moecc's export writes it: a dense
Qwen3 or Llama draft (float32 weights, or 8-bit ones as the quantize stage writes them: MatMulNBits, blocks of
32) or a float32 Qwen3-MoE, Qwen2-MoE or Mixtral main model, with a float32 cache or an int8 one with per-channel
scales, as moecc.Attention takes them (session.py decides when to swap).

Why a whole graph in one node: a draft's call is small (small-coder's 2-layer draft reads 2 MiB of weights),
and the decoding loop makes it right after the main model's verify has filled the caches with other data.
ONNX Runtime then spends more on walking 24 nodes, each with its own code and buffers to fetch again, than on
the arithmetic: 230 µs for the first call after 96 MiB of other reads and 100 µs for the second, 42 µs in a
tight loop (scripts/bench_kernels.py --kernel moecc.FusedDecoder has today's figures). An MoE main model's
graph has 23 nodes a layer, most of them small (the router's and the shared expert's gate's products of 8
and 1 columns, a bias, reshapes, activations), each costing ONNX Runtime a few microseconds and its threads a
wake-up: in one node, small-coder's main model decodes 1.10-1.12x as fast and verifies 5 tokens 1.09-1.12x
(scripts/bench_kernels.py --kernel moecc.FusedDecoder: 2 threads, a 2-core Xeon, alternating rounds in one
process).

The match is exact: the graph, with moecc.Attention already in place of its attention, must be this and
nothing else, walked back from the logits:

    Gather(embedding, input_ids) -> SimplifiedLayerNormalization
    per layer: MatMul(qkv) [-> Add(bias)] -> moecc.Attention -> MatMul(o) -> SkipSimplifiedLayerNormalization
               -> an MLP -> SkipSimplifiedLayerNormalization (the next layer's input norm, or the final norm)
    GatherND(h, logit_positions) -> MatMul(head) -> logits

where every layer's MLP is the same kind: a SiLU-gated one,

    MatMul(gate_up) -> Split -> Mul(gate, Sigmoid(gate)) -> Mul(., up) -> MatMul(down)

or an MoE block (com.microsoft MoE, float32 SwiGLU experts that moecc.MoE runs, perhaps cut into parts by the
lowering, which repeats the router's logits for each part), with a shared expert in a Qwen2-MoE:

    Reshape(MoE(Reshape(h, [-1, H]), Concat(MatMul(., router) x parts), fc1, fc2), Shape(h))
    [-> Add(., Mul(the SiLU-gated MLP of h, Sigmoid(MatMul(h, shared gate))))]

Every MatMul is by a float32 constant, or (in a dense decoder) every one a MatMulNBits by 8- or 4-bit blocks
of 32 without zero points at accuracy_level 4 (the draft of a recipe that quantizes its weights to int8 or
int4: a quarter of the bytes to fetch again after each verify; 4-bit blocks are widened to 8 bits when the
session loads). Those run as that level lets ONNX Runtime run them: each row of activations rounded
to 8 bits per block of 32 and multiplied in integers (runtime/kernels/matmul.c): ONNX Runtime's own kernel's
numbers for the node up to float rounding, which now and then tips an activation to the next level (small-coder's
draft: logits within 4e-6 of ONNX Runtime's graph for most prompts, 0.06 for one of three).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.kernels import DOMAIN, attention, attribute_value, moe
from runtime.kernels.matmul import PANEL, panelled, relaid

_SKIP_NORM = "SkipSimplifiedLayerNormalization"
# The swapped graph's own input and output (not the artifact's): how many greedy proposals to chain after a
# call, and the proposals, up to MAX_CHAIN (the longest draft a recipe may ask for) per call.
GREEDY_STEPS, GREEDY_TOKENS, MAX_CHAIN = "greedy_steps", "greedy_tokens", 32
# The op types of the exported graph (before moecc.Attention stands in for its attention and query/key norms).
_OP_TYPES = {"Gather", "SimplifiedLayerNormalization", _SKIP_NORM, "MatMul", "MatMulNBits", "GroupQueryAttention", "Reshape", "Split", "Sigmoid", "Mul", "GatherND"}
_OP_TYPES |= {"Add", "MoE", "Concat", "Shape"}  # q, k and v's bias; an MoE block's
QUANT_BLOCK = 32  # matmul.c's rows of a column per scale of 8-bit weights
INTEGER_PRODUCTS = 4  # MatMulNBits's accuracy_level with 8-bit activations, which matmul.c's 8-bit products compute


class _NoMatch(Exception):
    """The graph is not a decoder the kernel runs; the message says where it differs."""


@dataclass(frozen=True)
class _Weights:
    """A product's constant weights [inner, columns]: float32, or 8- or 4-bit blocks of 32 rows of a column
    [columns, inner / 32, 32 * bits / 8] with a scale each (MatMulNBits's B and scales)."""

    name: str
    inner: int
    columns: int
    scales: str | None = None
    bits: int = 32

    def fit(self, inner: int | None, columns: int | None) -> None:
        if any(want not in (None, got) for want, got in ((inner, self.inner), (columns, self.columns))):
            raise _NoMatch(f"{self.name} holds [{self.inner}, {self.columns}] weights, not [{inner}, {columns}]")


@dataclass
class _Experts:
    """An MoE layer's routed experts: the router's weights [H, E] and the MoE node's, which the lowering may have
    cut into `parts` parts each (its router logits then repeated as many times)."""

    router: _Weights
    node: onnx.NodeProto
    parts: int
    size: int  # each part's units (I / parts)
    shared_gate: _Weights | None  # [H, 1]: the sigmoid gate of a shared expert (Qwen2-MoE's), if the layer has one


@dataclass
class _Layer:
    past: list[str]  # past key, past value
    cache_scales: list[str]  # an int8 cache's key and value scales [1, KVH, 1, D], or none
    present: list[str]  # present key, present value
    input_norm: str
    qkv: _Weights
    qkv_bias: str | None
    qk_norms: list[str]  # query and key norm weights, or none
    out: _Weights
    post_norm: str
    gate_up: _Weights | None  # a dense MLP's or an MoE layer's shared expert's, else none
    down: _Weights | None
    experts: _Experts | None


@dataclass
class _Decoder:
    embedding: str
    final_norm: str
    head: _Weights
    cos: str
    sin: str
    attributes: dict
    layers: list[_Layer]


class _Walk:
    """The graph read backwards: each value's producer, and the nodes the match has accounted for."""

    def __init__(self, model: onnx.ModelProto):
        self.producer = {name: node for node in model.graph.node for name in node.output}
        self.constants = {tensor.name: tensor for tensor in model.graph.initializer}
        self.input_types = {value.name: value.type.tensor_type.elem_type for value in model.graph.input}
        self.seen: set[int] = set()
        self.epsilons: set[float] = set()

    def node(self, value: str, op_type: str, domain: str = "") -> onnx.NodeProto:
        """The node of this type that makes `value` as its first output (a norm's normed rows, not its sum)."""
        node = self.producer.get(value)
        if node is None or node.op_type != op_type or (node.domain or "") not in ({domain, "ai.onnx"} if not domain else {domain}):
            found = f"{node.domain + '.' if node is not None and node.domain else ''}{node.op_type}" if node is not None else "a graph input or constant"
            raise _NoMatch(f"{value} comes from {found}, not {op_type}")
        if node.output[0] != value:
            raise _NoMatch(f"{value} is not the first output of {node.name}")
        self.seen.add(id(node))
        return node

    def product(self, value: str) -> tuple[onnx.NodeProto, _Weights]:
        """The MatMul by float32 constant weights, or the MatMulNBits by 8- or 4-bit blocks of 32 of them, that makes `value`."""
        node = self.producer.get(value)
        if node is None or node.op_type != "MatMulNBits":
            node = self.node(value, "MatMul")
            inner, columns = self.weights(node.input[1], [None, None])
            return node, _Weights(node.input[1], inner, columns)
        node = self.node(value, "MatMulNBits", "com.microsoft")
        bits, block, inner, columns = (attribute_value(node, name) for name in ("bits", "block_size", "K", "N"))
        blocks, scales = (self.constants.get(name) for name in node.input[1:3])
        if bits not in (8, 4) or block != QUANT_BLOCK or any(node.input[3:]) or blocks is None or scales is None or inner % QUANT_BLOCK:
            raise _NoMatch(f"{node.name}: not 8- or 4-bit blocks of {QUANT_BLOCK} of constant weights without zero points, a group index or a bias")
        if blocks.data_type != onnx.TensorProto.UINT8 or list(blocks.dims) != [columns, inner // QUANT_BLOCK, QUANT_BLOCK * bits // 8]:
            raise _NoMatch(f"{node.name}: its blocks are not uint8 [{columns}, {inner // QUANT_BLOCK}, {QUANT_BLOCK * bits // 8}]")
        if scales.data_type != onnx.TensorProto.FLOAT or math.prod(scales.dims) != columns * inner // QUANT_BLOCK:
            raise _NoMatch(f"{node.name}: not one float32 scale per block")
        if attribute_value(node, "accuracy_level") != INTEGER_PRODUCTS:
            raise _NoMatch(f"{node.name}: accuracy_level is not {INTEGER_PRODUCTS} (the kernel rounds the activations to 8 bits, as that level lets ONNX Runtime do)")
        return node, _Weights(node.input[1], inner, columns, node.input[2], bits)

    def weights(self, name: str, shape: list[int | None]) -> list[int]:
        """The dims of the float32 constant `name`, which must match `shape` (None: any size)."""
        tensor = self.constants.get(name)
        dims = list(tensor.dims) if tensor is not None else []
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(dims) != len(shape) or any(want not in (None, got) for want, got in zip(shape, dims)):
            raise _NoMatch(f"{name} is not a float32 constant of shape {shape}")
        return dims

    def norm(self, node: onnx.NodeProto, inputs: int, size: int | None) -> str:
        if len(node.input) != inputs or attribute_value(node, "axis", -1) != -1:
            raise _NoMatch(f"{node.name}: a norm with a bias or not over the last axis")
        self.weights(node.input[inputs - 1], [size])
        self.epsilons.add(attribute_value(node, "epsilon", 1e-5))
        return node.input[inputs - 1]


def _gated_mlp(walk: _Walk, value: str, hidden: int) -> tuple[str, _Weights, _Weights]:
    """The SiLU-gated MLP that makes `value`: its input, and its gate and up weights (one product) and down weights."""
    down, down_weights = walk.product(value)
    product = walk.node(down.input[0], "Mul")
    silu = walk.node(product.input[0], "Mul")
    sigmoid = walk.node(silu.input[1], "Sigmoid")
    split = walk.node(silu.input[0], "Split")
    if sigmoid.input[0] != silu.input[0] or list(split.output) != [silu.input[0], product.input[1]] or attribute_value(split, "axis", 0) not in (-1, 2):
        raise _NoMatch(f"{split.name}: not a SiLU-gated MLP")
    gate_up, gate_up_weights = walk.product(split.input[0])
    gate_up_weights.fit(hidden, None)
    down_weights.fit(gate_up_weights.columns // 2, hidden)
    if gate_up_weights.columns % 2:
        raise _NoMatch(f"{gate_up.name}: gate and up of unequal widths")
    return gate_up.input[0], gate_up_weights, down_weights


def _same_input(values: dict[str, str]) -> str:
    """The one value all of `values` (each node's input, by node name) are."""
    if len(set(values.values())) != 1:
        raise _NoMatch(f"{', '.join(values)} do not read the same normed rows")
    return next(iter(values.values()))


def _experts(walk: _Walk, value: str, hidden: int) -> tuple[str, _Experts, _Weights | None, _Weights | None]:
    """The MoE block that makes `value` (moecc's export, lowered): its input, its routed experts, and its shared
    expert's gate and up and down weights, if it has one.

        Reshape(MoE(Reshape(h, [-1, H]), Concat(MatMul(., router) x parts), fc1, fc2), Shape(h))
        [+ Mul(SiLU-gated MLP(h), Sigmoid(MatMul(h, shared gate)))]
    """
    node, readers = walk.producer.get(value), {}  # the nodes that must read the same normed rows h
    shared_gate_weights = gate_up = down = None
    if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        walk.node(value, "Add")
        value, scaled = node.input
        scale = walk.node(scaled, "Mul")
        gate = walk.node(scale.input[1], "Sigmoid")
        shared_gate, shared_gate_weights = walk.product(gate.input[0])
        shared_gate_weights.fit(hidden, 1)
        mlp_input, gate_up, down = _gated_mlp(walk, scale.input[0], hidden)
        readers = {"the shared expert's gate": shared_gate.input[0], "the shared expert": mlp_input}
    reshape = walk.node(value, "Reshape")
    moe_node = walk.node(reshape.input[0], "MoE", "com.microsoft")
    if reason := moe.unsupported(moe_node, walk.constants):
        raise _NoMatch(f"{moe_node.name}: {reason}")
    shape = walk.node(reshape.input[1], "Shape")
    if shape.attribute:
        raise _NoMatch(f"{shape.name}: not the whole shape of the normed rows")
    fc1 = walk.constants[moe_node.input[2]]  # moe.unsupported(): a float32 constant [E P, 2I, H], fc2 alike
    if fc1.dims[2] != hidden:
        raise _NoMatch(f"{moe_node.name}: experts of hidden size {fc1.dims[2]}, not {hidden}")
    tokens = walk.node(moe_node.input[0], "Reshape")
    rows = walk.constants.get(tokens.input[1])
    if rows is None or numpy_helper.to_array(rows).tolist() != [-1, hidden]:
        raise _NoMatch(f"{tokens.name}: not the tokens' rows [-1, {hidden}]")
    logits, parts = moe_node.input[1], 1
    concat = walk.producer.get(logits)
    if concat is not None and concat.op_type == "Concat":
        walk.node(logits, "Concat")
        if len(set(concat.input)) != 1 or attribute_value(concat, "axis") not in (-1, 1):
            raise _NoMatch(f"{concat.name}: not the router's logits repeated for each part of the experts")
        logits, parts = concat.input[0], len(concat.input)
    router, router_weights = walk.product(logits)
    router_weights.fit(hidden, None)
    if router.input[0] != tokens.output[0] or fc1.dims[0] != router_weights.columns * parts:
        raise _NoMatch(f"{router.name}: not the router of {moe_node.name}'s experts")
    if router_weights.scales or (shared_gate_weights and shared_gate_weights.scales):
        raise _NoMatch(f"{moe_node.name}: a quantized router or shared expert's gate (the kernel takes float ones)")
    readers |= {tokens.name: tokens.input[0], shape.name: shape.input[0]}
    experts = _Experts(router=router_weights, node=moe_node, parts=parts, size=fc1.dims[1] // 2, shared_gate=shared_gate_weights)
    return _same_input(readers), experts, gate_up, down


def _layer(walk: _Walk, closing: onnx.NodeProto, hidden: int, head_dim: int) -> tuple[_Layer, onnx.NodeProto, dict]:
    """The layer that `closing` (the norm after its MLP) ends, the norm node in front of it, and the sizes and
    inputs every layer must share."""
    producer = walk.producer.get(closing.input[0])
    experts = None
    if producer is not None and producer.op_type in ("Add", "Reshape"):  # an MoE block
        mlp_input, experts, gate_up_weights, down_weights = _experts(walk, closing.input[0], hidden)
    else:
        mlp_input, gate_up_weights, down_weights = _gated_mlp(walk, closing.input[0], hidden)
    post = walk.node(mlp_input, _SKIP_NORM, "com.microsoft")
    if len(post.output) < 4 or closing.input[1] != post.output[3]:
        raise _NoMatch(f"{closing.name}: its residual is not the attention block's")
    out, out_weights = walk.product(post.input[0])
    attend = walk.node(out.input[0], "Attention", DOMAIN)
    names = dict(zip(attention._OURS, attend.input))
    if any(names.get(name) for name in ("key", "value")) or attend.output[0] != out.input[0]:
        raise _NoMatch(f"{attend.name}: q, k and v not packed")
    norms = [names.get("q_norm_weight", ""), names.get("k_norm_weight", "")]
    if any(norms) and not all(norms):
        raise _NoMatch(f"{attend.name}: a query norm without a key norm")
    if all(norms):
        walk.epsilons.add(attribute_value(attend, "epsilon", 1e-6))
    packed, bias = attend.input[0], None
    add = walk.producer.get(packed)
    if add is not None and add.op_type == "Add":  # q, k and v's bias (Qwen2-MoE's)
        walk.node(packed, "Add")
        packed, bias = add.input
    qkv, qkv_weights = walk.product(packed)
    attributes = {name: attribute_value(attend, name) for name in ("num_heads", "kv_num_heads", "scale") if attribute_value(attend, name) is not None}
    heads, kv_heads = attributes["num_heads"], attributes["kv_num_heads"]
    qkv_weights.fit(hidden, (heads + 2 * kv_heads) * head_dim)
    if walk.input_types.get(names["past_key"]) != walk.input_types.get(names["past_value"]):
        raise _NoMatch(f"{attend.name}: its past keys and values differ in type")
    int8_cache = walk.input_types.get(names["past_key"]) == onnx.TensorProto.INT8
    cache_scales = [names["k_scale"], names["v_scale"]] if int8_cache else []  # moecc.Attention takes an int8 cache only with both
    for scales in cache_scales:
        walk.weights(scales, [1, kv_heads, 1, head_dim])
    if bias is not None:
        walk.weights(bias, [qkv_weights.columns])
    out_weights.fit(heads * head_dim, hidden)
    attributes["ffn"] = gate_up_weights.columns // 2 if gate_up_weights else 0
    attributes["qk_norm"] = int(all(norms))
    attributes["qkv_bias"] = int(bias is not None)
    attributes["int8_cache"] = int(int8_cache)  # for the layers to agree on; the op's registration takes it, not an attribute
    if experts:
        attributes |= {"experts": experts.router.columns, "expert_parts": experts.parts, "shared_expert": int(experts.shared_gate is not None)}
        attributes["expert_size"] = experts.size  # shared by every layer, like the rest
        attributes |= {name: attribute_value(experts.node, name) for name in moe.PASSED_ATTRIBUTES if attribute_value(experts.node, name) is not None}
    before = walk.producer.get(qkv.input[0])
    if before is None or before.op_type not in (_SKIP_NORM, "SimplifiedLayerNormalization") or before.output[0] != qkv.input[0]:
        raise _NoMatch(f"{qkv.name}: its input is not a norm")
    walk.seen.add(id(before))
    residual = before.output[3] if before.op_type == _SKIP_NORM and len(before.output) >= 4 else before.input[0]
    if post.input[1] != residual:
        raise _NoMatch(f"{post.name}: its residual is not the layer's input")
    layer = _Layer(
        past=[names["past_key"], names["past_value"]], cache_scales=cache_scales, present=list(attend.output[1:3]), input_norm="", qkv=qkv_weights, qkv_bias=bias,
        qk_norms=norms if all(norms) else [], out=out_weights, post_norm=walk.norm(post, 3, hidden), gate_up=gate_up_weights, down=down_weights,
        experts=experts,
    )  # fmt: skip
    return layer, before, attributes | {"rotary": (names["cos_cache"], names["sin_cache"]), "lengths": (names["seqlens_k"], names["query_seqlens"])}


def _match(model: onnx.ModelProto, head_dim: int) -> _Decoder:
    """The decoder `model` (moecc.Attention in place) is, or _NoMatch saying where it is not one."""
    walk = _Walk(model)
    outputs = [value.name for value in model.graph.output]
    if not outputs or outputs[0] != "logits":
        raise _NoMatch("the first output is not the logits")
    head, head_weights = walk.product("logits")
    hidden, vocab = head_weights.inner, head_weights.columns
    gather = walk.node(head.input[0], "GatherND")
    if gather.input[1] != "logit_positions" or attribute_value(gather, "batch_dims", 0) != 1:
        raise _NoMatch(f"{gather.name}: not the logits' positions")
    closing = walk.node(gather.input[0], _SKIP_NORM, "com.microsoft")
    final_norm = walk.norm(closing, 3, hidden)
    layers, shared = [], set()
    while True:
        layer, before, found = _layer(walk, closing, hidden, head_dim)
        shared.add(tuple(sorted(found.items())))
        layers.insert(0, layer)
        if before.op_type == "SimplifiedLayerNormalization":
            layer.input_norm = walk.norm(before, 2, hidden)
            break
        layer.input_norm = walk.norm(before, 3, hidden)
        closing = before
    if len(shared) != 1:
        raise _NoMatch("the layers differ in heads, scale, MLP width, query and key norms, biases, experts, caches, rotary tables or lengths")
    found = dict(shared.pop())
    embed = walk.node(before.input[0], "Gather")
    walk.weights(embed.input[0], [vocab, hidden])
    if embed.input[1] != "input_ids" or attribute_value(embed, "axis", 0) != 0:
        raise _NoMatch(f"{embed.name}: not the token embedding")
    if len(walk.epsilons) != 1:
        raise _NoMatch("the norms differ in epsilon")
    if len(walk.seen) != len(model.graph.node):
        raise _NoMatch(f"{len(model.graph.node) - len(walk.seen)} nodes beyond a decoder's")
    if outputs[1:] != [name for layer in layers for name in layer.present]:
        raise _NoMatch("the outputs are not the logits and each layer's present key and value")
    widths = {"vocabulary": vocab, "hidden size": hidden, "MLP": 2 * found["ffn"], "q, k and v": (found["num_heads"] + 2 * found["kv_num_heads"]) * head_dim}
    if odd := [f"{name} {width}" for name, width in widths.items() if width % PANEL]:
        raise _NoMatch(f"widths not a multiple of {PANEL}: {', '.join(odd)}")
    (seqlens_k, query_seqlens), (cos, sin) = found["lengths"], found["rotary"]
    if (seqlens_k, query_seqlens) != ("seqlens_k", "query_seqlens"):
        raise _NoMatch("the attention does not read the graph's lengths")
    attributes = {name: value for name, value in found.items() if name not in ("ffn", "expert_size", "int8_cache", "rotary", "lengths")}
    attributes["epsilon"] = walk.epsilons.pop()
    products = [head_weights, *(weights for layer in layers for weights in (layer.qkv, layer.out, layer.gate_up, layer.down) if weights)]
    quantized = {weights.scales is not None for weights in products}
    if len(quantized) != 1:
        raise _NoMatch("some products' weights are 8-bit and some float")
    attributes["quantized"] = int(quantized.pop())
    if attributes["quantized"] and "experts" in found:
        raise _NoMatch("an MoE with 8-bit products (the kernel takes float ones)")
    return _Decoder(embedding=embed.input[0], final_norm=final_norm, head=head_weights, cos=cos, sin=sin, attributes=attributes, layers=layers)


def _attention_in_place(model: onnx.ModelProto, head_dim: int) -> onnx.ModelProto:
    if reason := attention.why_not(model, head_dim):
        raise _NoMatch(reason)
    attention.swap(model, head_dim)
    return model


def why_not(model: onnx.ModelProto, head_dim: int) -> str | None:
    """Why moecc.FusedDecoder cannot stand in for `model`'s graph, or None when it can."""
    if extra := sorted({node.op_type for node in model.graph.node} - _OP_TYPES):  # a quantized MoE: said without copying the graph
        return f"not a decoder moecc.FusedDecoder runs: it has {', '.join(extra)} nodes"
    try:
        _match(_attention_in_place(copy.deepcopy(model), head_dim), head_dim)
    except _NoMatch as reason:
        return f"not a decoder moecc.FusedDecoder runs: {reason}"
    return None


def _widened(model: onnx.ModelProto, nodes: list[onnx.NodeProto], name: str, columns: int, inner: int) -> str:
    """The name of 4-bit blocks `name` [columns, inner / 32, 16] (two levels a byte, low nibble first, zero point
    8) as 8-bit ones [columns, inner / 32, 32] of the same values (zero point 128): nodes appended to `nodes`,
    which ONNX Runtime folds into a constant when the session loads, so that the kernel's one 8-bit loop takes
    both. A draft's weights are small: twice their 4-bit bytes is a fraction of a verify's reads."""
    constants = {
        f"{name}.low_mask": np.array(0x0F, np.uint8), f"{name}.high_shift": np.array(4, np.uint8), f"{name}.pair_axis": np.array([-1], np.int64),
        f"{name}.widened_shape": np.array([columns, inner // QUANT_BLOCK, QUANT_BLOCK], np.int64), f"{name}.offset": np.array(128 - 8, np.int32),
    }  # fmt: skip
    model.graph.initializer.extend(numpy_helper.from_array(value, key) for key, value in constants.items())
    nodes += [
        helper.make_node("BitwiseAnd", [name, f"{name}.low_mask"], [f"{name}.low"], name=f"{name}.low"),
        helper.make_node("BitShift", [name, f"{name}.high_shift"], [f"{name}.high"], name=f"{name}.high", direction="RIGHT"),
        helper.make_node("Unsqueeze", [f"{name}.low", f"{name}.pair_axis"], [f"{name}.low_pairs"], name=f"{name}.low_pairs"),
        helper.make_node("Unsqueeze", [f"{name}.high", f"{name}.pair_axis"], [f"{name}.high_pairs"], name=f"{name}.high_pairs"),
        helper.make_node("Concat", [f"{name}.low_pairs", f"{name}.high_pairs"], [f"{name}.pairs"], name=f"{name}.pairs", axis=-1),
        helper.make_node("Reshape", [f"{name}.pairs", f"{name}.widened_shape"], [f"{name}.levels4"], name=f"{name}.levels4"),
        helper.make_node("Cast", [f"{name}.levels4"], [f"{name}.levels32"], name=f"{name}.levels32", to=onnx.TensorProto.INT32),
        helper.make_node("Add", [f"{name}.levels32", f"{name}.offset"], [f"{name}.offset32"], name=f"{name}.offset32"),
        helper.make_node("Cast", [f"{name}.offset32"], [f"{name}.widened"], name=f"{name}.widened", to=onnx.TensorProto.UINT8),
    ]
    return f"{name}.widened"


def _panels(model: onnx.ModelProto, nodes: list[onnx.NodeProto], weights: _Weights) -> list[str]:
    """The kernel's inputs for a product's weights: float panels [N / 32, K, 32]; or 8-bit ones in quads [N / 32,
    K / 4, 32, 4] (4 rows of a column side by side, as matmul.c's integer products read them) and their scales
    [N / 32, K / 32, 32], relaid from MatMulNBits's blocks [N, K / 32, 32] and scales [N * K / 32]."""
    if weights.scales is None:
        return [panelled(model, nodes, weights.name)]
    panels, blocks = weights.columns // PANEL, weights.inner // QUANT_BLOCK
    levels = weights.name if weights.bits == 8 else _widened(model, nodes, weights.name, weights.columns, weights.inner)
    return [
        relaid(model, nodes, levels, [panels, PANEL, weights.inner // 4, 4], [0, 2, 1, 3]),
        relaid(model, nodes, weights.scales, [panels, PANEL, blocks], [0, 2, 1]),
    ]


def _mixer(model: onnx.ModelProto, nodes: list[onnx.NodeProto], layer: _Layer) -> str:
    """An MoE layer's one product after its post-attention norm, in panels: its shared expert's gate and up, then
    the router's E columns, the shared expert's gate and zeros up to a panel (a Concat that ONNX Runtime folds
    into a constant when the session loads): the router and the gate would each be a product of a few columns."""
    experts = layer.experts
    joined = [weights for weights in (layer.gate_up, experts.router, experts.shared_gate) if weights]
    parts, columns = [weights.name for weights in joined], sum(weights.columns for weights in joined)
    padding = -columns % PANEL
    if padding:
        model.graph.initializer.append(numpy_helper.from_array(np.zeros((experts.router.inner, padding), np.float32), f"{experts.router.name}.padding"))
        parts.append(f"{experts.router.name}.padding")
    name = f"{experts.router.name}.mixer"
    nodes.append(helper.make_node("Concat", parts, [name], name=name, axis=1))
    return relaid(model, nodes, name, [experts.router.inner, (columns + padding) // PANEL, PANEL], [1, 0, 2])


def swap(model: onnx.ModelProto, head_dim: int) -> None:
    """Replace `model`'s graph (which why_not() accepted) with one moecc.FusedDecoder, its weights in panels; the
    graph gains the input GREEDY_STEPS and the output GREEDY_TOKENS (see fused_decoder.c)."""
    decoder = _match(_attention_in_place(model, head_dim), head_dim)
    nodes: list[onnx.NodeProto] = []
    inputs = ["input_ids", "seqlens_k", "query_seqlens", "logit_positions", GREEDY_STEPS, decoder.cos, decoder.sin, decoder.embedding, decoder.final_norm]
    inputs += _panels(model, nodes, decoder.head)
    if not decoder.attributes["quantized"]:  # the head's scales: none
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), "fused_decoder.no_scales"))
        inputs.append("fused_decoder.no_scales")
    for layer in decoder.layers:
        inputs += [*layer.past, *layer.cache_scales, layer.input_norm, *_panels(model, nodes, layer.qkv), *([layer.qkv_bias] if layer.qkv_bias else []), *layer.qk_norms]
        inputs += [*_panels(model, nodes, layer.out), layer.post_norm]
        if layer.experts is None:
            inputs += [*_panels(model, nodes, layer.gate_up), *_panels(model, nodes, layer.down)]
            continue
        inputs.append(_mixer(model, nodes, layer))
        inputs += _panels(model, nodes, layer.down) if layer.down else []
        inputs += [layer.experts.node.input[2], moe.transposed(nodes, layer.experts.node.input[4])]
    outputs = ["logits", GREEDY_TOKENS, *(name for layer in decoder.layers for name in layer.present)]
    op_type = "FusedDecoderInt8Cache" if decoder.layers[0].cache_scales else "FusedDecoder"  # one per cache type, every layer's alike
    nodes.append(helper.make_node(op_type, inputs, outputs, name="fused_decoder", domain=DOMAIN, max_chain=MAX_CHAIN, **decoder.attributes))
    model.graph.input.append(helper.make_tensor_value_info(GREEDY_STEPS, onnx.TensorProto.INT64, []))
    model.graph.output.append(helper.make_tensor_value_info(GREEDY_TOKENS, onnx.TensorProto.INT64, ["batch", MAX_CHAIN]))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    read = {name for node in nodes for name in node.input}
    for constant in [tensor for tensor in model.graph.initializer if tensor.name not in read]:  # the Splits' widths
        model.graph.initializer.remove(constant)
