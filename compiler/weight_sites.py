"""Where the quantizable weights of an exported decoder are, and which class each belongs to.

Calibrate measures the inputs of these sites and quantize rewrites them, so both find them here, by the
same rules, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from compiler.onnx_graph import MS_DOMAIN
TensorClass = Literal["attention", "router", "shared_expert", "mlp", "lm_head"]


@dataclass(frozen=True)
class DenseSite:
    """A MatMul whose second operand is a weight [K, N]."""

    node: ir.Node
    input: ir.Value  # activations [..., K]
    weight: ir.Value
    tensor_class: TensorClass


@dataclass(frozen=True)
class MoeSite:
    """One MoE block: tokens [T, H], router logits [T, E], expert weights fc1 [E, 2I, H] and fc2 [E, H, I]."""

    node: ir.Node
    layer: int  # ordinal among the model's MoE blocks
    tokens: ir.Value
    router_logits: ir.Value
    fc1: ir.Value
    fc2: ir.Value


def _is_moe(node: ir.Node) -> bool:
    return node.op_type == "MoE" and node.domain == MS_DOMAIN


def _dense_class(node: ir.Node, weight: ir.Value, graph: ir.Graph) -> TensorClass:
    if any(_is_moe(use.node) and use.idx == 1 for use in node.outputs[0].uses()) or "shared_expert_gate" in weight.name:
        return "router"  # routing decisions: a quantization error changes which experts run
    if node.outputs[0] in graph.outputs or any(use.node.op_type == "Cast" and use.node.outputs[0] in graph.outputs for use in node.outputs[0].uses()):
        return "lm_head"
    if ".self_attn." in weight.name:
        return "attention"
    if ".shared_expert." in weight.name:
        return "shared_expert"
    return "mlp"


def dense_sites(model: ir.Model) -> list[DenseSite]:
    sites = []
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
            sites.append(DenseSite(node, node.inputs[0], node.inputs[1], _dense_class(node, node.inputs[1], model.graph)))
    return sites


def moe_sites(model: ir.Model) -> list[MoeSite]:
    nodes = [node for node in model.graph if _is_moe(node)]
    return [MoeSite(node, layer, node.inputs[0], node.inputs[1], node.inputs[2], node.inputs[4]) for layer, node in enumerate(nodes)]
