"""Single-node ONNX models for kernel-level tests (onnxruntime's MoE and what moecc rewrites it into)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def moe_model(fc1: np.ndarray, fc2: np.ndarray, top_k: int, renormalize: bool) -> ir.Model:
    """One float MoE node: tokens x [T,H] and router logits r [T,E] in, y [T,H] out."""
    experts, hidden = fc1.shape[0], fc1.shape[2]
    node = helper.make_node(
        "MoE", ["x", "r", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=top_k, activation_type="swiglu", swiglu_fusion=1,
        activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=int(renormalize),
    )
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", hidden]), helper.make_tensor_value_info("r", TensorProto.FLOAT, ["T", experts])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", hidden])],
        [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]))


def run_moe(model: ir.Model, x: np.ndarray, router: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "r": router})[0]
