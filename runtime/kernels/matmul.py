"""moecc.MatMul (matmul.c) in place of ONNX Runtime's MatMul where the weights are a large float32 constant, node
by node: a MatMul whose weights are computed, quantized, small (MIN_WEIGHTS) or of a width that is not a
multiple of 32 (a router's) stays ONNX Runtime's. The weights reach the kernel in panels of 32 columns
through a Reshape and a Transpose that ONNX Runtime folds into a new constant when the session loads."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.kernels import DOMAIN

PANEL = 32  # matmul.c's columns per panel
# Weights of fewer floats stay with ONNX Runtime: they fit a core's own cache, where reading them once per call
# is not what a call costs, and ONNX Runtime's kernel is called for less (the small-coder draft, whose largest
# weights are 128 K floats, decoded 0.89x as fast with moecc.MatMul for all of them).
MIN_WEIGHTS = 1 << 18


def _swappable(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> bool:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return False
    weights = constants.get(node.input[1])
    if weights is None or weights.data_type != onnx.TensorProto.FLOAT or len(weights.dims) != 2:
        return False
    return weights.dims[1] % PANEL == 0 and weights.dims[0] * weights.dims[1] >= MIN_WEIGHTS


def why_not(model: onnx.ModelProto) -> str | None:
    """Why moecc.MatMul stands in for no MatMul of `model`, or None when it stands in for some."""
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    if any(_swappable(node, constants) for node in model.graph.node):
        return None
    return f"no MatMul has float32 constant weights of a multiple of {PANEL} columns and at least {MIN_WEIGHTS} of them"


def relaid(model: onnx.ModelProto, nodes: list[onnx.NodeProto], name: str, shape: list[int], perm: list[int]) -> str:
    """The name of the constant `name` reshaped to `shape`, then transposed by `perm`: a Reshape and a Transpose
    appended to `nodes`, which ONNX Runtime folds into a new constant when the session loads."""
    model.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), f"{name}.panel_shape"))
    nodes.append(helper.make_node("Reshape", [name, f"{name}.panel_shape"], [f"{name}.columns"], name=f"{name}.reshape"))
    nodes.append(helper.make_node("Transpose", [f"{name}.columns"], [f"{name}.panels"], name=f"{name}.panel", perm=perm))
    return f"{name}.panels"


def panelled(model: onnx.ModelProto, nodes: list[onnx.NodeProto], weights: str) -> str:
    """The name of `weights` [K, N] (a float32 constant of `model`) as panels [N / 32, K, 32]."""
    inner, columns = next(tensor.dims for tensor in model.graph.initializer if tensor.name == weights)
    return relaid(model, nodes, weights, [inner, columns // PANEL, PANEL], [1, 0, 2])


def swap(model: onnx.ModelProto) -> int:
    """Swap every MatMul of `model` with large float32 constant weights of a multiple of 32 columns for
    moecc.MatMul, fed the weights as panels (one Reshape and Transpose per weight, however many nodes read
    it); returns how many."""
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    panels: dict[str, str] = {}
    swapped = 0
    for node in model.graph.node:
        if not _swappable(node, constants):
            nodes.append(node)
            continue
        weights = node.input[1]
        if weights not in panels:
            panels[weights] = panelled(model, nodes, weights)
        nodes.append(helper.make_node("MatMul", [node.input[0], panels[weights]], node.output, name=node.name, domain=DOMAIN))
        swapped += 1
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return swapped
