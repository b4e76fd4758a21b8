"""Rewrite a moecc decoder from onnxruntime's fused ops into standard ONNX (opset 23) that TensorRT parses.

What changes, op by op:
- GroupQueryAttention -> RotaryEmbedding + Concat with the past + Attention. The KV cache contract changes
  with it: past keys and values come in as [B, P, kv heads, D] (one contiguous prefix of the runtime's
  buffer for a single sequence) and only the S new entries go out, [B, S, kv heads, D]; the runtime appends
  them and rolls back by length. Positions are P .. P+S-1, the causal mask follows from them.
- SimplifiedLayerNormalization -> RMSNormalization; SkipSimplifiedLayerNormalization -> Add + RMSNormalization.
- MatMulNBits (INT4, or a draft's INT8) -> DequantizeLinear of an INT4 / INT8 [K, N] weight with blocks along
  K, then MatMul (TensorRT's weight-only kernels; the accuracy level of onnxruntime's kernel does not carry over).
- MoE / QMoE -> every expert for every token as two MatMuls over the experts' stacked weights, with the
  routing weights (zero outside the top k) applied between them:
  y = [w_1 a_1, ..., w_E a_E] @ [W2_1; ...; W2_E] with a_e = SwiGLU(x @ W1_e). TensorRT's sparse MoE layer
  exists only for newer GPUs and NVFP4 weights, and gathering each token's expert weights would put a Gather
  between a quantized weight and its MatMul, which weight-only quantization needs adjacent. The price is
  E/k times the expert arithmetic, the same for every token; the weights are read once per call either way.
  Quantized experts become INT4 (blocked) or INT8 (per expert row) DequantizeLinear weights.
- Float weights and activations in `precision` (fp16 for TensorRT's fast kernels); logits stay float32.
- The logit_positions input and its gather go: an engine returns every position's logits (the TensorRT
  path calls it in chunks of at most its prefill profile's tokens, with a logits buffer sized for them).
Legend: B batch, S new tokens, P cached tokens, T tokens, H hidden, E experts, I expert width, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler import quantization
from compiler.errors import BuildError
from compiler.onnx_graph import MS_DOMAIN, IoNames, new_initializer
from compiler.stages.quantize import routing_weights

OPSET = 23
PRECISIONS = {"fp16": (np.float16, ir.DataType.FLOAT16), "fp32": (np.float32, ir.DataType.FLOAT)}


@dataclass
class _Rewriter:
    graph: ir.Graph
    dtype: np.dtype  # of float weights and activations after lowering
    count: int = 0

    def const(self, stem: str, array: np.ndarray) -> ir.Value:
        self.count += 1
        return new_initializer(self.graph, f"trt.{stem}.{self.count}", array)

    def ints(self, stem: str, *values: int) -> ir.Value:
        return self.const(stem, np.array(values, dtype=np.int64))


def _attribute(node: ir.Node, name: str, default=None):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def _replace(graph: ir.Graph, node: ir.Node, nodes: list[ir.Node], outputs: list[ir.Value | None]) -> None:
    """Put `nodes` where `node` was; outputs[i] takes over node.outputs[i] (None: that output must be unused)."""
    graph.insert_before(node, nodes)
    for old, new in zip(node.outputs, outputs):
        if new is None:
            if old.uses() or old.is_graph_output():
                raise BuildError(f"tensorrt lowering: output {old.name} of {node.op_type} node {node.name} is used but has no standard-op equivalent")
            continue
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if new.is_graph_output():
            new.name = old.name
    graph.remove(node, safe=True)


def _every_position_logits(graph: ir.Graph, names: IoNames) -> None:
    """Remove the gather of the positions whose logits a call asks for: the head reads every position."""
    positions = next((value for value in graph.inputs if value.name == names.logit_positions), None)
    for gather in {use.node for use in positions.uses()} if positions is not None else ():
        _replace(graph, gather, [], [gather.inputs[0]])


# ---- positions and the causal mask, shared by every layer -----------------------------------------------------


@dataclass(frozen=True)
class _Positions:
    ids: ir.Value  # [B,S] int64: P .. P+S-1
    mask: ir.Value  # [S, P+S] bool: query i sees keys 0 .. P+i


def _positions(r: _Rewriter, input_ids: ir.Value, past_key: ir.Value, anchor: ir.Node) -> _Positions:
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs: list, attributes=None) -> ir.Value:
        nodes.append(ir.node(op_type, inputs, attributes))
        return nodes[-1].outputs[0]

    zero, one = r.const("zero", np.array(0, np.int64)), r.const("one", np.array(1, np.int64))
    past = op("Squeeze", [op("Shape", [past_key], {"start": 1, "end": 2})])  # P
    new = op("Squeeze", [op("Shape", [input_ids], {"start": 1, "end": 2})])  # S
    total = op("Add", [past, new])
    positions = op("Range", [past, total, one])  # [S]
    ids = op("Expand", [op("Unsqueeze", [positions, r.ints("axis", 0)]), op("Shape", [input_ids])])  # [B,S]
    keys = op("Unsqueeze", [op("Range", [zero, total, one]), r.ints("axis", 0)])  # [1,P+S]
    mask = op("LessOrEqual", [keys, op("Unsqueeze", [positions, r.ints("axis", 1)])])  # [S,P+S]
    r.graph.insert_before(anchor, nodes)
    return _Positions(ids, mask)


def _attention(r: _Rewriter, node: ir.Node, positions: _Positions, kv_inputs: dict[str, ir.Value]) -> None:
    """GroupQueryAttention -> standard ops; the new keys and values [B,S,kv heads,D] become the present outputs."""
    query, key, value, past_key, past_value, _, _, cos, sin = (list(node.inputs) + [None] * 9)[:9]
    heads, kv_heads = _attribute(node, "num_heads"), _attribute(node, "kv_num_heads")
    if not _attribute(node, "do_rotary", 0) or cos is None:
        raise BuildError(f"tensorrt lowering: GroupQueryAttention {node.name} without rotary embedding is not supported")
    head_dim = past_key.shape[3]
    scale = _attribute(node, "scale", 0.0) or 1.0 / np.sqrt(head_dim)
    nodes: list[ir.Node] = []
    if key is None:  # q, k and v packed in one input
        split = ir.node("Split", [query, r.ints("widths", heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)], {"axis": -1}, num_outputs=3)
        nodes.append(split)
        query, key, value = split.outputs
    interleaved = _attribute(node, "rotary_interleaved", 0)
    rotated_q = ir.node("RotaryEmbedding", [query, cos, sin, positions.ids], {"num_heads": heads, "interleaved": interleaved})  # [B,S,Q]
    rotated_k = ir.node("RotaryEmbedding", [key, cos, sin, positions.ids], {"num_heads": kv_heads, "interleaved": interleaved})  # [B,S,K]
    per_head = r.ints("per_head", 0, 0, kv_heads, head_dim)
    flat = r.ints("flat", 0, 0, kv_heads * head_dim)
    new_key = ir.node("Reshape", [rotated_k.outputs[0], per_head])  # [B,S,kv heads,D]
    new_value = ir.node("Reshape", [value, per_head])
    nodes += [rotated_q, rotated_k, new_key, new_value]
    full = []
    for past, new, kind in ((past_key, new_key, "key"), (past_value, new_value, "value")):
        concat = ir.node("Concat", [kv_inputs[past.name], new.outputs[0]], {"axis": 1})  # [B,P+S,kv heads,D]
        merged = ir.node("Reshape", [concat.outputs[0], flat])  # [B,P+S,K]
        nodes += [concat, merged]
        full.append(merged.outputs[0])
    attention = ir.node(
        "Attention", [rotated_q.outputs[0], *full, positions.mask], {"q_num_heads": heads, "kv_num_heads": kv_heads, "scale": float(scale)}
    )  # [B,S,Q]
    nodes.append(attention)
    _replace(r.graph, node, nodes, [attention.outputs[0], new_key.outputs[0], new_value.outputs[0]])


# ---- norms ------------------------------------------------------------------------------------------------------


def _norm(r: _Rewriter, node: ir.Node) -> None:
    epsilon = _attribute(node, "epsilon", 1e-5)
    if node.op_type == "SimplifiedLayerNormalization":
        norm = ir.node("RMSNormalization", [node.inputs[0], node.inputs[1]], {"axis": _attribute(node, "axis", -1), "epsilon": epsilon})
        _replace(r.graph, node, [norm], [norm.outputs[0]])
        return
    update, residual, weight = node.inputs[:3]
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        raise BuildError(f"tensorrt lowering: SkipSimplifiedLayerNormalization {node.name} with a bias is not supported")
    total = ir.node("Add", [update, residual])
    norm = ir.node("RMSNormalization", [total.outputs[0], weight], {"axis": -1, "epsilon": epsilon})
    _replace(r.graph, node, [total, norm], [norm.outputs[0], None, None, total.outputs[0]])


# ---- quantized weights as DequantizeLinear --------------------------------------------------------------------


def _dequantize(r: _Rewriter, stem: str, levels: np.ndarray, scales: np.ndarray, bits: int, block: int | None) -> list[ir.Node]:
    """DequantizeLinear of signed `levels` [K, N]; scales [K/block, N] in blocks along K, or [N] per column."""
    if bits == 4:
        nibbles = (levels.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
        packed = nibbles[0::2] | (nibbles[1::2] << 4)  # ONNX INT4: two per byte, first element in the low nibble
        tensor = ir.PackedTensor(packed, ir.DataType.INT4, shape=levels.shape)
        r.count += 1
        weight = ir.Value(name=f"trt.{stem}.{r.count}", shape=tensor.shape, type=ir.TensorType(ir.DataType.INT4), const_value=tensor)
        r.graph.register_initializer(weight)
    else:
        weight = r.const(stem, np.ascontiguousarray(levels.astype(np.int8)))
    attributes = {"axis": 0, "block_size": block} if block else {"axis": 1}
    return [ir.node("DequantizeLinear", [weight, r.const(stem + ".scales", np.ascontiguousarray(scales.astype(r.dtype)))], attributes)]


def _matmul_nbits(r: _Rewriter, node: ir.Node) -> None:
    if len(node.inputs) > 3 and any(value is not None for value in node.inputs[3:]):
        raise BuildError(f"tensorrt lowering: MatMulNBits {node.name} with zero points, group index or bias is not supported (moecc writes none)")
    k, n, bits, block = (_attribute(node, name) for name in ("K", "N", "bits", "block_size"))
    levels = quantization.unpack(node.inputs[1].const_value.numpy().reshape(n, -1), bits)  # [N,K]
    scales = node.inputs[2].const_value.numpy().reshape(n, k // block)
    nodes = _dequantize(r, "dense", levels.T, scales.T, bits, block)
    matmul = ir.node("MatMul", [node.inputs[0], nodes[-1].outputs[0]])
    _replace(r.graph, node, [*nodes, matmul], [matmul.outputs[0]])


# ---- experts ----------------------------------------------------------------------------------------------------

# Input positions: fc1, fc1 scales, fc2, fc2 scales, router weights; inputs moecc never writes must be absent.
_EXPERT_INPUTS = {"MoE": (2, None, 4, None, None), "QMoE": (2, 3, 5, 6, 14)}
_ABSENT = {"MoE": (3, 5, 6, 7), "QMoE": (4, 7, 8, 9, 10, 11, 12, 13)}


def _gate_up_order(rows: int) -> np.ndarray:
    """fc1 rows alternate gate, up (onnxruntime's fused SwiGLU): the order that puts all gate rows first."""
    return np.concatenate([np.arange(0, rows, 2), np.arange(1, rows, 2)])


def _expert_weights(r: _Rewriter, node: ir.Node) -> tuple[list[ir.Node], ir.Value, ir.Value, int]:
    """W1 [H, E*2I] (each expert's gate columns, then its up columns) and W2 [E*I, H], as values; and I."""
    fc1_at, fc1_scales_at, fc2_at, fc2_scales_at, _ = _EXPERT_INPUTS[node.op_type]
    fc1, fc2 = node.inputs[fc1_at].const_value.numpy(), node.inputs[fc2_at].const_value.numpy()
    bits = _attribute(node, "expert_weight_bits") if node.op_type == "QMoE" else None
    order = _gate_up_order(fc1.shape[1])
    if bits is None:  # float: fc1 [E,2I,H], fc2 [E,H,I]
        width = fc2.shape[2]
        w1 = r.const("experts.fc1", np.ascontiguousarray(fc1[:, order].transpose(2, 0, 1).reshape(fc1.shape[2], -1).astype(r.dtype)))
        w2 = r.const("experts.fc2", np.ascontiguousarray(fc2.transpose(0, 2, 1).reshape(-1, fc2.shape[1]).astype(r.dtype)))
        return [], w1, w2, width
    levels1, levels2 = quantization.unpack(fc1, bits)[:, order], quantization.unpack(fc2, bits)  # [E,2I,H], [E,H,I]
    scales1 = node.inputs[fc1_scales_at].const_value.numpy()[:, order]  # [E,2I,H/block] or [E,2I]
    scales2 = node.inputs[fc2_scales_at].const_value.numpy()  # [E,H,I/block] or [E,H]
    hidden, width = levels1.shape[2], levels2.shape[2]
    stacked1 = levels1.transpose(2, 0, 1).reshape(hidden, -1)  # [H, E*2I]
    stacked2 = levels2.transpose(0, 2, 1).reshape(-1, hidden)  # [E*I, H]
    if bits == 4:
        block = _attribute(node, "block_size")
        nodes1 = _dequantize(r, "experts.fc1", stacked1, scales1.transpose(2, 0, 1).reshape(hidden // block, -1), 4, block)
        nodes2 = _dequantize(r, "experts.fc2", stacked2, scales2.transpose(0, 2, 1).reshape(-1, hidden), 4, block)
    else:
        # One scale per expert row: per column of W1; for W2 per (expert, output column), i.e. blocks of I rows.
        nodes1 = _dequantize(r, "experts.fc1", stacked1, scales1.reshape(-1), 8, None)
        nodes2 = _dequantize(r, "experts.fc2", stacked2, scales2, 8, width)
    return [*nodes1, *nodes2], nodes1[-1].outputs[0], nodes2[-1].outputs[0], width


def _experts(r: _Rewriter, node: ir.Node) -> None:
    fc1_at, _, _, _, mixing_at = _EXPERT_INPUTS[node.op_type]
    present = [i for i in _ABSENT[node.op_type] if i < len(node.inputs) and node.inputs[i] is not None]
    if present or _attribute(node, "activation_type") != "swiglu" or _attribute(node, "swiglu_fusion") != 1:
        raise BuildError(f"tensorrt lowering: {node.op_type} {node.name} is not an interleaved-SwiGLU expert block without biases (what moecc exports)")
    if _attribute(node, "activation_alpha", 1.0) != 1.0 or _attribute(node, "activation_beta", 0.0) != 0.0:
        raise BuildError(f"tensorrt lowering: {node.op_type} {node.name}: only SwiGLU with alpha 1 and beta 0 is supported")
    tokens, logits = node.inputs[0], node.inputs[1]
    experts = node.inputs[fc1_at].shape[0]
    nodes, w1, w2, width = _expert_weights(r, node)
    if mixing_at is not None and mixing_at < len(node.inputs) and node.inputs[mixing_at] is not None:
        mixing = node.inputs[mixing_at]  # [T,E] already zero outside the top k
    else:
        routing = routing_weights(r.graph, f"trt.moe.{node.name}", logits, _attribute(node, "k"), bool(_attribute(node, "normalize_routing_weights")), r.dtype)
        nodes += routing
        mixing = routing[-1].outputs[0]
    up_projected = ir.node("MatMul", [tokens, w1])  # [T, E*2I]
    halves = ir.node("Reshape", [up_projected.outputs[0], r.ints("gate_up", 0, experts, 2, width)])  # [T,E,2,I]
    gate, up = ir.node("Split", [halves.outputs[0]], {"axis": 2, "num_outputs": 2}, num_outputs=2).outputs  # [T,E,1,I] each
    silu = ir.node("Mul", [gate, ir.node("Sigmoid", [gate]).outputs[0]])
    activated = ir.node("Mul", [silu.outputs[0], up])
    weights = ir.node("Reshape", [mixing, r.ints("mixing", 0, experts, 1, 1)])  # [T,E,1,1]
    weighted = ir.node("Mul", [activated.outputs[0], weights.outputs[0]])
    flat = ir.node("Reshape", [weighted.outputs[0], r.ints("flat", 0, experts * width)])  # [T, E*I]
    mixed = ir.node("MatMul", [flat.outputs[0], w2])  # [T,H]
    nodes += [up_projected, halves, gate.producer(), silu.inputs[1].producer(), silu, activated, weights, weighted, flat, mixed]
    _replace(r.graph, node, nodes, [mixed.outputs[0]])


# ---- the whole model --------------------------------------------------------------------------------------------


def _retype_floats(r: _Rewriter, float_type: ir.DataType) -> None:
    """Float initializers and attributes in the lowered precision; intermediate types are left to inference."""
    graph = r.graph
    for value in list(graph.initializers.values()):
        array = value.const_value
        if array.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) and array.dtype != float_type:
            converted = value.const_value.numpy().astype(r.dtype)
            value.const_value = ir.tensor(converted, name=value.name)
            value.type = ir.TensorType(float_type)
    for node in graph:
        if node.op_type == "ConstantOfShape" and "value" in node.attributes:
            tensor = node.attributes["value"].value
            if tensor.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(r.dtype)))
        for output in node.outputs:
            if not output.is_graph_output():
                output.type, output.shape = None, None


def lower(model: ir.Model, precision: str) -> ir.Model:
    """The model rewritten in place into standard ops with the appended-KV contract (see the module doc)."""
    dtype, float_type = PRECISIONS[precision]
    graph = model.graph
    r = _Rewriter(graph, np.dtype(dtype))
    names = IoNames()
    # Past keys and values in the appended-KV layout [B, P, kv heads, D]; GroupQueryAttention's lengths go.
    kv_inputs = {}
    for old in graph.inputs:
        if old.name.startswith("past_key_values."):
            batch, kv_heads, past, head_dim = old.shape
            kv_inputs[old.name] = ir.Value(name=old.name, shape=ir.Shape([batch, past, kv_heads, head_dim]), type=ir.TensorType(float_type))
    _every_position_logits(graph, names)
    dropped = (names.seqlens_k, names.total_sequence_length, names.query_seqlens, names.logit_positions)
    interface = [kv_inputs.get(value.name, value) for value in graph.inputs if value.name not in dropped]
    positions = None
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            if node.domain != MS_DOMAIN:
                raise BuildError(f"tensorrt lowering: node {node.name} is in domain {node.domain!r}")
            if node.op_type == "GroupQueryAttention":
                if positions is None:  # shared by every layer, computed once at the top of the graph
                    input_ids = next(value for value in graph.inputs if value.name == names.input_ids)
                    positions = _positions(r, input_ids, next(iter(kv_inputs.values())), next(iter(graph)))
                _attention(r, node, positions, kv_inputs)
            elif node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
                _norm(r, node)
            elif node.op_type == "MatMulNBits":
                _matmul_nbits(r, node)
            elif node.op_type in _EXPERT_INPUTS:
                _experts(r, node)
            else:
                raise BuildError(f"tensorrt lowering: no standard-op form for {node.op_type} (node {node.name})")
        elif node.op_type == "SimplifiedLayerNormalization":  # the ONNX-domain spelling onnxruntime also accepts
            _norm(r, node)
    # The graph's interface: ids and the pasts in, logits and the new keys and values out.
    graph.inputs.clear()
    graph.inputs.extend(interface)
    for output in graph.outputs:
        if output.name.startswith("present."):
            output.type, output.shape = ir.TensorType(float_type), None
    for name, value in list(graph.initializers.items()):
        if not value.uses():  # the fused ops' weights, now held in their rewritten form
            graph.initializers.pop(name)
    _retype_floats(r, float_type)
    for index, logits in enumerate(graph.outputs):
        producer = logits.producer()
        if logits.name != names.logits or float_type == ir.DataType.FLOAT or (producer is not None and producer.op_type == "Cast"):
            continue
        cast = ir.node("Cast", [logits], {"to": ir.DataType.FLOAT})  # logits stay float32, as on the CPU target
        graph.append(cast)
        graph.outputs[index] = cast.outputs[0]
        logits.name, cast.outputs[0].name = names.logits + ".lowered", names.logits
        cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.opset_imports.clear()
    graph.opset_imports[""] = OPSET
    model.opset_imports.clear()
    model.opset_imports[""] = OPSET
    return model
