"""The weights a built model computes with, put back into its transformers checkpoint.

A recipe that quantizes a dense model's products (MatMulNBits: 8- or 4-bit blocks, no zero points) changes
the function the artifact computes; transformers given the dequantized weights computes the same one. Export
parity checks against that model, and the transformers benchmark gives its assisted generation that draft,
so both sides speculate with the same weights. Given the artifact's graph at MatMulNBits's accuracy level 0
(full precision), ONNX Runtime agrees with it to float rounding; at the artifact's own level 4, as the runtime
computes a draft's products, the activations are rounded to 8 bits too.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from compiler import quantization
from compiler.architectures import architecture_of, dims_of

_TIED_HEADS = ("model.embed_tokens", "lm_head")  # a tied head is quantized as the head only: the embedding stays float
_NOT_PUT_BACK = ("QMoE", "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger")  # experts, W8A8, ...


def take_exported_weights(model, exported: onnx.ModelProto) -> None:
    """Put each quantized product's dequantized weights [N, K] of `exported` (the artifact's model.onnx,
    loaded with its data) into `model`, a transformers decoder, split where export fused them (q, k and v;
    gate and up)."""
    import torch

    others = sorted({node.op_type for node in exported.graph.node if node.op_type in _NOT_PUT_BACK})
    if others:
        raise ValueError(f"the model has {', '.join(others)} nodes: only MatMulNBits products are put back")
    arrays = {tensor.name: numpy_helper.to_array(tensor) for tensor in exported.graph.initializer}
    config = model.config.to_dict()
    dims = dims_of(architecture_of(config), config)  # the sizes export packed the products by
    fused = {  # export's packed products, in their column order
        "self_attn.qkv_proj": [
            ("self_attn.q_proj", dims.num_heads * dims.head_dim),
            ("self_attn.k_proj", dims.num_kv_heads * dims.head_dim),
            ("self_attn.v_proj", dims.num_kv_heads * dims.head_dim),
        ],
        "mlp.gate_up_proj": [("mlp.gate_proj", dims.intermediate_size), ("mlp.up_proj", dims.intermediate_size)],
    }
    for node in exported.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        sizes = {attribute.name: attribute.i for attribute in node.attribute}
        if len(node.input) > 3 or sizes["bits"] not in (4, 8):
            raise ValueError(f"{node.name}: only 4- and 8-bit blocks without zero points are put back")
        rows, features, bits = sizes["N"], sizes["K"], sizes["bits"]
        levels = quantization.unpack(arrays[node.input[1]].reshape(rows, features * bits // 8), bits)
        weight = torch.from_numpy(quantization.dequantize(levels, arrays[node.input[2]].reshape(rows, -1)))
        name = node.input[1].removesuffix(f".weight.T.q{bits}")
        if name in _TIED_HEADS:
            model.lm_head.weight = torch.nn.Parameter(weight)
            continue
        layer, _, product = name.removeprefix("model.layers.").partition(".")
        parts = fused.get(product, [(product, rows)])
        for (part, width), piece in zip(parts, torch.split(weight, [width for _, width in parts])):
            model.model.layers[int(layer)].get_submodule(part).weight.data = piece.clone()
