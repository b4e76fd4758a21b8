"""moecc.Attention (attention.c) in place of ONNX Runtime's GroupQueryAttention, with the per-head query and
key norms in front of it folded in where the export wrote them (session.py decides when to swap)."""

from __future__ import annotations

import onnx

from runtime.kernels import DOMAIN, attribute_value

# moecc.Attention's inputs, as the names of GroupQueryAttention's inputs (ONNX Runtime's schema, by position).
_GQA_INPUTS = (
    "query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache",
    "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight", "k_norm_weight", "query_seqlens",
)  # fmt: skip
_OURS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "cos_cache", "sin_cache", "query_seqlens", "k_scale", "v_scale", "q_norm_weight", "k_norm_weight")
_REQUIRED = {"past_key", "past_value", "seqlens_k", "cos_cache", "sin_cache", "query_seqlens"}
_IGNORED = {"total_sequence_length"}  # the kernel reads each row's length from seqlens_k
# Attributes the kernel implements, with the values it accepts (None: any), and those whose default it implements.
_ATTRIBUTES = {"num_heads": None, "kv_num_heads": None, "scale": None, "do_rotary": {1}, "rotary_interleaved": {0},
               "k_quant_type": {b"NONE", b"PER_CHANNEL"}, "v_quant_type": {b"NONE", b"PER_CHANNEL"}, "kv_cache_bit_width": {8}}  # fmt: skip
_DEFAULTS = {"local_window_size": {-1}, "softcap": {0.0}, "smooth_softmax": {0}, "causal": {1}}
MAX_HEAD_SIZE, MAX_GROUP = 512, 16  # attention.c's limits


def unsupported(node: onnx.NodeProto, head_dim: int, cache_type: int, shapes: dict[str, list[int]]) -> str | None:
    """Why moecc.Attention cannot stand in for this GroupQueryAttention, whose past keys are of `cache_type`
    (float32 activations with a float32 or int8 cache) and whose constants have `shapes`; None when it can."""
    names = dict(zip(_GQA_INPUTS, node.input))
    if missing := sorted(name for name in _REQUIRED if not names.get(name)):
        return f"no {', '.join(missing)}"
    if cache_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8):
        return f"a {onnx.helper.tensor_dtype_to_np_dtype(cache_type)} cache (the kernel takes float32 or int8)"
    if extra := sorted(name for name, value in names.items() if value and name not in (*_OURS, *_IGNORED)):
        return f"uses {', '.join(extra)}"
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    for name, value in attributes.items():
        allowed = _ATTRIBUTES.get(name, _DEFAULTS.get(name, set()))
        if allowed is not None and value not in allowed:
            return f"sets {name}={value!r}"
    if attributes.get("do_rotary") != 1:
        return "no rotary embedding"
    if shapes.get(names["cos_cache"], [0, head_dim // 2])[1:] != [head_dim // 2]:
        return "a partial rotary embedding"
    if cache_type == onnx.TensorProto.INT8 and not (
        attributes.get("k_quant_type") == attributes.get("v_quant_type") == b"PER_CHANNEL" and names.get("k_scale") and names.get("v_scale")
    ):
        return "an int8 cache without per-channel scales"
    if head_dim % 16 or head_dim > MAX_HEAD_SIZE:
        return f"head size {head_dim} (the kernel takes multiples of 16 up to {MAX_HEAD_SIZE})"
    if attributes["num_heads"] % attributes["kv_num_heads"] or attributes["num_heads"] // attributes["kv_num_heads"] > MAX_GROUP:
        return f"{attributes['num_heads']} query heads over {attributes['kv_num_heads']} key/value heads"
    return None


def why_not(model: onnx.ModelProto, head_dim: int) -> str | None:
    """Why moecc.Attention cannot stand in for every GroupQueryAttention of `model`, or None when it can (or there
    are none)."""
    nodes = [node for node in model.graph.node if node.op_type == "GroupQueryAttention"]
    types = {value.name: value.type.tensor_type.elem_type for value in model.graph.input}
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    for node in nodes:
        if reason := unsupported(node, head_dim, types.get(node.input[3], onnx.TensorProto.UNDEFINED), shapes):
            return f"{node.name}: {reason}"
    return None


class _Graph:
    """Who produces and who reads each value of a graph, and the shapes of its constants."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {name: node for node in graph.node for name in node.output}
        self.readers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        for value in graph.output:
            self.readers[value.name] = self.readers.get(value.name, 0) + 1
        self.shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}

    def only_reader(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The node of `op_type` producing `name`, when this value has no other reader."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and self.readers.get(name) == 1 else None


def _folded_norms(graph: _Graph, names: dict[str, str], head_dim: int) -> tuple[dict[str, str], float, list[onnx.NodeProto]] | None:
    """The export's per-head query and key norms (qkv -> Split -> Reshape -> SimplifiedLayerNormalization ->
    Reshape -> attention) as the kernel's inputs: the packed qkv and both norms' weights, their epsilon, and
    the nodes they replace; None when the attention's inputs are not exactly that pattern."""
    chains = {}
    for role in ("query", "key"):
        flat = graph.only_reader(names.get(role, ""), "Reshape")
        norm = flat and graph.only_reader(flat.input[0], "SimplifiedLayerNormalization")
        per_head = norm and graph.only_reader(norm.input[0], "Reshape")
        if not per_head or attribute_value(norm, "axis", -1) != -1 or graph.shapes.get(norm.input[1]) != [head_dim]:
            return None
        chains[role] = (per_head, norm, flat)
    split = graph.producer.get(chains["query"][0].input[0])
    parts = [chains["query"][0].input[0], chains["key"][0].input[0], names.get("value")]
    if split is None or split.op_type != "Split" or list(split.output) != parts or attribute_value(split, "axis", 0) not in (-1, 2):
        return None
    if any(graph.readers.get(part) != 1 for part in parts):  # q, k and v go nowhere else
        return None
    epsilons = {attribute_value(norm, "epsilon", 1e-5) for _, norm, _ in chains.values()}
    if len(epsilons) != 1:
        return None
    inputs = {"query": split.input[0], "key": "", "value": "", "q_norm_weight": chains["query"][1].input[1], "k_norm_weight": chains["key"][1].input[1]}
    return inputs, epsilons.pop(), [split, *(step for chain in chains.values() for step in chain)]


def swap(model: onnx.ModelProto, head_dim: int) -> int:
    """Swap every GroupQueryAttention of `model` (which why_not() accepted) for moecc.Attention, folding the
    per-head query and key norms in front of it into the kernel where the export wrote them; returns how many."""
    graph = _Graph(model.graph)
    folded: list[onnx.NodeProto] = []
    nodes = [node for node in model.graph.node if node.op_type == "GroupQueryAttention"]
    for node in nodes:
        names = dict(zip(_GQA_INPUTS, node.input))
        epsilon = None
        if norms := _folded_norms(graph, names, head_dim):
            changes, epsilon, replaced = norms
            names |= changes
            folded += replaced
        inputs = [names.get(name, "") for name in _OURS]
        while not inputs[-1]:
            inputs.pop()
        attributes = [attribute for attribute in node.attribute if attribute.name in ("num_heads", "kv_num_heads", "scale")]
        node.CopyFrom(onnx.helper.make_node("Attention", inputs, node.output, name=node.name, domain=DOMAIN))
        node.attribute.extend(attributes)
        if epsilon is not None:
            node.attribute.append(onnx.helper.make_attribute("epsilon", epsilon))
    for node in folded:
        model.graph.node.remove(node)
    unread = {name for node in folded for name in node.input} - {name for node in model.graph.node for name in node.input}
    for constant in [tensor for tensor in model.graph.initializer if tensor.name in unread]:  # the Reshapes' shapes, the Split's widths
        model.graph.initializer.remove(constant)
    return len(nodes)
