"""Dropping experts from an exported MoE: their weights and their router columns go, the router renormalises.

With an expert's router column gone, the softmax runs over the remaining experts only, so their routing
weights are renormalised over the rest, and top-k never picks the dropped one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.errors import BuildError
from compiler.weight_sites import MoeSite


def _slice(graph: ir.Graph, value: ir.Value, kept: list[int], axis: int) -> int:
    """Replace the initializer `value` by its slices at `kept` along `axis`; returns the bytes removed."""
    array = value.const_value.numpy()
    smaller = np.ascontiguousarray(np.take(array, kept, axis=axis))
    value.const_value = ir.tensor(smaller, name=value.name)
    value.shape = ir.Shape(smaller.shape)
    return array.nbytes - smaller.nbytes


def prune_experts(graph: ir.Graph, site: MoeSite, kept: list[int]) -> int:
    """Keep only the experts `kept` (ascending original ids) of one MoE block; returns the bytes removed."""
    router = site.router_logits.producer()
    if router is None or router.op_type != "MatMul" or router.inputs[1].const_value is None:
        raise BuildError(f"pruning: the router of MoE layer {site.layer} is not a MatMul with a weight, which pruning needs")
    top_k = site.node.attributes["k"].value
    if len(kept) < top_k:
        raise BuildError(f"pruning: MoE layer {site.layer} would keep {len(kept)} experts, fewer than the {top_k} each token needs")
    removed = _slice(graph, router.inputs[1], kept, axis=1)  # [H,E] -> [H,E']
    for weight in (site.fc1, site.fc2):
        removed += _slice(graph, weight, kept, axis=0)  # [E,...] -> [E',...]
    return removed
