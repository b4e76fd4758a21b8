"""moecc.MoE (moe.c) in place of ONNX Runtime's com.microsoft MoE, for the float32 SwiGLU experts moecc exports.

The kernel takes each expert's fc2 transposed, so that a unit's output weights are one row it streams: the
swap feeds it through a Transpose of the weight, which ONNX Runtime folds into a new constant when the
session loads (the artifact keeps the standard layout).
"""

from __future__ import annotations

import onnx

from runtime.kernels import DOMAIN

# ONNX Runtime's MoE inputs, by position; the kernel takes input, router_probs, fc1 and fc2 (transposed).
_MOE_INPUTS = (
    "input", "router_probs", "fc1_experts_weights", "fc1_experts_bias", "fc2_experts_weights", "fc2_experts_bias",
    "fc3_experts_weights", "fc3_experts_bias",
)  # fmt: skip
# Attributes the kernel implements, with the values it accepts (None: any).
_ATTRIBUTES = {"k": None, "normalize_routing_weights": {0, 1}, "activation_alpha": None, "activation_beta": None, "swiglu_limit": None,
               "activation_type": {b"swiglu"}, "swiglu_fusion": {1}, "use_sparse_mixer": {0}}  # fmt: skip
_REQUIRED = ("k", "activation_type", "swiglu_fusion")  # ONNX Runtime's defaults (no activation named, fusion 0) are not ours
_PASSED = ("k", "normalize_routing_weights", "activation_alpha", "activation_beta", "swiglu_limit")
HIDDEN_MULTIPLE, UNITS = 16, 16  # moe.c's: H a multiple of 16 (its widest vectors), I of UNITS (one pass)


def unsupported(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> str | None:
    """Why moecc.MoE cannot stand in for this MoE node, whose graph has these `constants`; None when it can."""
    names = dict(zip(_MOE_INPUTS, node.input))
    if extra := sorted(name for name, value in names.items() if value and name not in ("input", "router_probs", "fc1_experts_weights", "fc2_experts_weights")):
        return f"uses {', '.join(extra)}"
    for attribute in node.attribute:
        allowed = _ATTRIBUTES.get(attribute.name, set())
        if allowed is not None and onnx.helper.get_attribute_value(attribute) not in allowed:
            return f"sets {attribute.name}={onnx.helper.get_attribute_value(attribute)!r}"
    if missing := [name for name in _REQUIRED if not any(attribute.name == name for attribute in node.attribute)]:
        return f"no {', '.join(missing)} (the kernel takes interleaved SwiGLU)"
    fc1, fc2 = constants.get(names.get("fc1_experts_weights", "")), constants.get(names.get("fc2_experts_weights", ""))
    if fc1 is None or fc2 is None:
        return "its expert weights are not constants"
    if fc1.data_type != onnx.TensorProto.FLOAT or fc2.data_type != onnx.TensorProto.FLOAT:
        return "its expert weights are not float32"
    if len(fc1.dims) != 3 or len(fc2.dims) != 3:
        return "its expert weights are not [E, rows, columns]"
    experts, hidden, inter = fc1.dims[0], fc1.dims[2], fc1.dims[1] // 2
    if list(fc2.dims) != [experts, hidden, inter]:
        return f"fc1 {list(fc1.dims)} and fc2 {list(fc2.dims)} do not match"
    if hidden <= 0 or inter <= 0 or hidden % HIDDEN_MULTIPLE or inter % UNITS:
        return f"hidden size {hidden} and expert size {inter} (the kernel takes positive multiples of 16)"
    if next(attribute.i for attribute in node.attribute if attribute.name == "k") > experts:
        return f"k is larger than its {experts} experts"
    return None


def why_not(model: onnx.ModelProto) -> str | None:
    """Why moecc.MoE cannot stand in for every MoE node of `model`, or None when it can (or there are none)."""
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MoE" and node.domain == "com.microsoft" and (reason := unsupported(node, constants)):
            return f"{node.name}: {reason}"
    return None


def swap(model: onnx.ModelProto) -> int:
    """Swap every MoE node of `model` (which why_not() accepted) for moecc.MoE, fed its fc2 through a
    Transpose (one per weight, however many nodes read it); returns how many."""
    nodes: list[onnx.NodeProto] = []
    transposed: set[str] = set()
    swapped = 0
    for node in model.graph.node:
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        names = dict(zip(_MOE_INPUTS, node.input))
        fc2 = names["fc2_experts_weights"]
        if fc2 not in transposed:
            nodes.append(onnx.helper.make_node("Transpose", [fc2], [f"{fc2}.transposed"], name=f"{fc2}.transpose", perm=[0, 2, 1]))
            transposed.add(fc2)
        ours = onnx.helper.make_node("MoE", [names["input"], names["router_probs"], names["fc1_experts_weights"], f"{fc2}.transposed"], node.output, name=node.name, domain=DOMAIN)
        ours.attribute.extend(attribute for attribute in node.attribute if attribute.name in _PASSED)
        nodes.append(ours)
        swapped += 1
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return swapped
