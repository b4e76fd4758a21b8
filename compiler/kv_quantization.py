"""An INT8 KV cache: per-channel scales from the calibrated ranges, set on each layer's GroupQueryAttention.

ONNX Runtime's CPU GroupQueryAttention quantizes the keys and values it appends and dequantizes the cache it
reads, with one scale per KV head and channel. Every read goes through the cache, the new tokens' own keys
included, so a token's logits do not depend on how many tokens share its call (lossless speculation holds).
The cache is a quarter of float32's size, and attention over a long context reads a quarter of the bytes.
The runtime's own CPU kernel (runtime/kernels/attention.c) reads and writes the same cache the same way.
Legend: D head size.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.onnx_graph import IoNames, new_initializer
from compiler.stages.calibrate import statistics_key

INPUT_SLOTS = {"key": 12, "value": 13}  # GroupQueryAttention's k_scale and v_scale inputs
LEVELS = 127  # symmetric INT8


def scales(largest: np.ndarray) -> np.ndarray:
    """[1, KV heads, 1, D] scales from the largest magnitudes [KV heads, D]; a channel never seen non-zero gets 1."""
    return np.where(largest > 0, largest / LEVELS, 1.0).astype(np.float32)[None, :, None, :]


def quantize_cache(graph: ir.Graph, statistics: dict[str, np.ndarray]) -> None:
    """Give every layer's attention an INT8 cache with the calibrated scales."""
    attentions = {node.outputs[1].name: node for node in graph if node.op_type == "GroupQueryAttention"}  # by present key
    graph_inputs = {value.name: value for value in graph.inputs}
    for layer in range(len(attentions)):
        node = attentions[IoNames.present(layer, "key")]
        for kind, slot in INPUT_SLOTS.items():  # the export leaves both slots empty
            scale = scales(statistics[statistics_key(f"kv_{kind}", str(layer))])
            node.replace_input_with(slot, new_initializer(graph, f"model.layers.{layer}.self_attn.{kind}_cache_scale", scale))
            for cache in (graph_inputs[IoNames.past(layer, kind)], node.outputs[1 if kind == "key" else 2]):
                cache.type = ir.TensorType(ir.DataType.INT8)
        for kind in ("k", "v"):
            node.attributes[f"{kind}_quant_type"] = ir.AttrString(f"{kind}_quant_type", "PER_CHANNEL")
        node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", 8)
