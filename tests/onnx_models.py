"""Single-node ONNX models for kernel-level tests (onnxruntime's MoE and what moecc rewrites it into)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compiler.stages import quantize, quantize_experts
from compiler.weight_sites import moe_sites

EXPERTS, INNER, HIDDEN, TOP_K = 6, 128, 64, 2
# Expert precisions of a test layer: all float, all INT4, all INT8, or mixed (two INT8 experts, the rest INT4).
PRECISIONS = {"fp32": {}, "int4": {e: "int4" for e in range(EXPERTS)}, "int8": {e: "int8" for e in range(EXPERTS)}, "mixed": {0: "int8", 3: "int8"}}


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
    options = ort.SessionOptions()
    # DequantizeLinear + MatMul stay apart: fused, onnxruntime would quantize the activations too.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "r": router})[0]


def moe_layer(precision: str, renormalize: bool) -> ir.Model:
    """One MoE layer with seeded weights, quantized by the quantize stage's own rewrite unless fp32."""
    rng = np.random.default_rng(2)
    fc1 = rng.standard_normal((EXPERTS, 2 * INNER, HIDDEN), dtype=np.float32) * 0.1
    fc2 = rng.standard_normal((EXPERTS, HIDDEN, INNER), dtype=np.float32) * 0.1
    model = moe_model(fc1, fc2, TOP_K, renormalize)
    if precision != "fp32":
        chosen = PRECISIONS[precision]
        choices = [quantize.ExpertChoice(layer=0, expert=e, precision=chosen.get(e, "int4"), routed_share=0.0, reason="test") for e in range(EXPERTS)]
        (site,) = moe_sites(model)
        quantized, _ = quantize_experts.quantize_layer(site, choices, 0, quantize.Quantizer("rtn", {}), 32)
        quantize._lower_moe(model.graph, site, choices, quantized, 32)
    return model
