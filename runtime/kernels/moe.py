"""moecc.MoE and moecc.QMoE (moe.c) in place of ONNX Runtime's com.microsoft MoE and QMoE, for the float32 SwiGLU
experts moecc exports and their INT4 (block-wise) and INT8 (per-row) quantizations.

The kernels take each expert's fc2 transposed, so that a unit's output weights are one row they stream, and
moecc.QMoE takes one level per byte: the swap feeds the weights through the ops that unpack and transpose
them, which ONNX Runtime folds into new constants when the session loads (the artifact keeps the standard
layout, and a session holds the unpacked levels in place of the packed ones).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
# QMoE's inputs, by position (of those after fc2's scales moecc.QMoE takes the router weights; not biases, fc3 or zero points).
_QMOE_INPUTS = (
    "input", "router_probs", "fc1_experts_weights", "fc1_scales", "fc1_experts_bias", "fc2_experts_weights", "fc2_scales", "fc2_experts_bias",
    "fc3_experts_weights", "fc3_scales", "fc3_experts_bias", "fc1_zero_points", "fc2_zero_points", "fc3_zero_points", "router_weights",
)  # fmt: skip
_QMOE_ATTRIBUTES = _ATTRIBUTES | {"expert_weight_bits": {4, 8}, "block_size": None}
HIDDEN_MULTIPLE, UNITS = 16, 16  # moe.c's: H a multiple of 16 (its widest vectors), I of UNITS (one pass); blocks of 16 too


def _unsupported_form(node: onnx.NodeProto, names: dict[str, str], used: tuple[str, ...], attributes: dict, required: tuple[str, ...]) -> str | None:
    """Why a node that takes inputs `names` cannot be the kernel's, which reads only `used` and these attributes."""
    if extra := sorted(name for name, value in names.items() if value and name not in used):
        return f"uses {', '.join(extra)}"
    for attribute in node.attribute:
        allowed = attributes.get(attribute.name, set())
        if allowed is not None and onnx.helper.get_attribute_value(attribute) not in allowed:
            return f"sets {attribute.name}={onnx.helper.get_attribute_value(attribute)!r}"
    if missing := [name for name in required if not any(attribute.name == name for attribute in node.attribute)]:
        return f"no {', '.join(missing)} (the kernel takes interleaved SwiGLU)"
    return None


def unsupported(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> str | None:
    """Why moecc.MoE cannot stand in for this MoE node, whose graph has these `constants`; None when it can."""
    names = dict(zip(_MOE_INPUTS, node.input))
    if reason := _unsupported_form(node, names, ("input", "router_probs", "fc1_experts_weights", "fc2_experts_weights"), _ATTRIBUTES, _REQUIRED):
        return reason
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


def unsupported_quantized(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> str | None:
    """Why moecc.QMoE cannot stand in for this QMoE node, whose graph has these `constants`; None when it can."""
    names = dict(zip(_QMOE_INPUTS, node.input))
    used = ("input", "router_probs", "fc1_experts_weights", "fc1_scales", "fc2_experts_weights", "fc2_scales", "router_weights")
    if reason := _unsupported_form(node, names, used, _QMOE_ATTRIBUTES, (*_REQUIRED, "expert_weight_bits")):
        return reason
    normalized = any(attribute.name == "normalize_routing_weights" and attribute.i == 1 for attribute in node.attribute)
    if names.get("router_weights") and normalized:
        return "router weights with normalize_routing_weights=1"  # moecc's layers mix by router weights unnormalized
    weights = [constants.get(names.get(name, "")) for name in ("fc1_experts_weights", "fc1_scales", "fc2_experts_weights", "fc2_scales")]
    if any(weight is None for weight in weights):
        return "its expert weights or scales are not constants"
    fc1, fc1_scales, fc2, fc2_scales = weights
    if fc1.data_type != onnx.TensorProto.UINT8 or fc2.data_type != onnx.TensorProto.UINT8 or len(fc1.dims) != 3 or len(fc2.dims) != 3:
        return "its expert weights are not packed [E, rows, bytes] uint8"
    if fc1_scales.data_type != onnx.TensorProto.FLOAT or fc2_scales.data_type != onnx.TensorProto.FLOAT:
        return "its scales are not float32"
    bits = next(attribute.i for attribute in node.attribute if attribute.name == "expert_weight_bits")
    experts, hidden, inter = fc1.dims[0], fc1.dims[2] * 8 // bits, fc1.dims[1] // 2
    if list(fc2.dims) != [experts, hidden, inter * bits // 8]:
        return f"fc1 {list(fc1.dims)} and fc2 {list(fc2.dims)} do not match"
    if hidden <= 0 or inter <= 0 or hidden % HIDDEN_MULTIPLE or inter % UNITS:
        return f"hidden size {hidden} and expert size {inter} (the kernel takes positive multiples of 16)"
    for scales, rows, width in ((fc1_scales, 2 * inter, hidden), (fc2_scales, hidden, inter)):
        per_row = list(scales.dims) == [experts, rows]
        if bits == 8 and not per_row:  # ONNX Runtime rounds the activations of block-wise INT8 experts: not float products
            return "block-wise INT8 scales (the kernel takes one per row)"
        if not per_row and not (len(scales.dims) == 3 and scales.dims[:2] == [experts, rows] and scales.dims[2] and width % scales.dims[2] == 0
                                and width // scales.dims[2] % UNITS == 0):  # fmt: skip
            return f"scales {list(scales.dims)} for [{experts}, {rows}, {width}] weights (the kernel takes blocks of a multiple of 16)"
    if next(attribute.i for attribute in node.attribute if attribute.name == "k") > experts:
        return f"k is larger than its {experts} experts"
    return None


_CHECKS = {"MoE": unsupported, "QMoE": unsupported_quantized}


def _why_not(model: onnx.ModelProto, op_type: str) -> str | None:
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == op_type and node.domain == "com.microsoft" and (reason := _CHECKS[op_type](node, constants)):
            return f"{node.name}: {reason}"
    return None


def why_not(model: onnx.ModelProto) -> str | None:
    """Why moecc.MoE cannot stand in for every MoE node of `model`, or None when it can (or there are none)."""
    return _why_not(model, "MoE")


def why_not_quantized(model: onnx.ModelProto) -> str | None:
    """Why moecc.QMoE cannot stand in for every QMoE node of `model`, or None when it can (or there are none)."""
    return _why_not(model, "QMoE")


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


def _unpacked(model: onnx.ModelProto, nodes: list[onnx.NodeProto], name: str, bits: int, dims: list[int]) -> str:
    """INT4 levels [.., C / 2] packed two per byte, low nibble first -> one per byte [.., C], by ops ONNX Runtime
    folds when the session loads; INT8 levels as they are."""
    if bits == 8:
        return name
    constants = {"mask": np.array(15, np.uint8), "shift": np.array(4, np.uint8), "last": np.array([-1], np.int64), "shape": np.array([*dims[:-1], 2 * dims[-1]], np.int64)}
    names = {key: f"{name}.unpack.{key}" for key in constants}
    model.graph.initializer.extend(numpy_helper.from_array(value, names[key]) for key, value in constants.items())
    nodes += [
        helper.make_node("BitwiseAnd", [name, names["mask"]], [f"{name}.low"]),
        helper.make_node("BitShift", [name, names["shift"]], [f"{name}.high"], direction="RIGHT"),
        helper.make_node("Unsqueeze", [f"{name}.low", names["last"]], [f"{name}.low.paired"]),
        helper.make_node("Unsqueeze", [f"{name}.high", names["last"]], [f"{name}.high.paired"]),
        helper.make_node("Concat", [f"{name}.low.paired", f"{name}.high.paired"], [f"{name}.pairs"], axis=-1),
        helper.make_node("Reshape", [f"{name}.pairs", names["shape"]], [f"{name}.levels"]),
    ]
    return f"{name}.levels"


def _scales_by_block(model: onnx.ModelProto, nodes: list[onnx.NodeProto], name: str, per_row_axis: int, transposed: bool) -> str:
    """Scales [E, rows, blocks] (or [E, rows], one block per row, given a block axis at `per_row_axis`), transposed
    to [E, blocks, rows] where asked."""
    dims = next(tensor.dims for tensor in model.graph.initializer if tensor.name == name)
    output = name
    if len(dims) == 2:
        axes = f"{name}.block_axis"
        model.graph.initializer.append(numpy_helper.from_array(np.array([per_row_axis], np.int64), axes))
        nodes.append(helper.make_node("Unsqueeze", [name, axes], [output := f"{name}.blocks"]))
    elif transposed:
        nodes.append(helper.make_node("Transpose", [name], [output := f"{name}.transposed"], perm=[0, 2, 1]))
    return output


def swap_quantized(model: onnx.ModelProto) -> int:
    """Swap every QMoE node of `model` (which why_not_quantized() accepted) for moecc.QMoE, fed its levels one per
    byte and fc2's levels and scales transposed (once per weight, however many nodes read it); returns how many."""
    nodes: list[onnx.NodeProto] = []
    prepared: dict[str, str] = {}
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    swapped = 0
    for node in list(model.graph.node):
        if node.op_type != "QMoE" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        names = dict(zip(_QMOE_INPUTS, node.input))
        bits = next(attribute.i for attribute in node.attribute if attribute.name == "expert_weight_bits")
        inputs = []
        for kind, role in (("fc1_experts_weights", "levels"), ("fc1_scales", "scales"), ("fc2_experts_weights", "transposed levels"), ("fc2_scales", "transposed scales")):
            name = names[kind]
            if name not in prepared:
                if role == "levels":
                    prepared[name] = _unpacked(model, nodes, name, bits, shapes[name])
                elif role == "transposed levels":
                    levels = _unpacked(model, nodes, name, bits, shapes[name])
                    nodes.append(helper.make_node("Transpose", [levels], [prepared.setdefault(name, f"{name}.levels.transposed")], perm=[0, 2, 1]))
                else:
                    prepared[name] = _scales_by_block(model, nodes, name, 2 if kind == "fc1_scales" else 1, transposed=kind == "fc2_scales")
            inputs.append(prepared[name])
        mixing = [names["router_weights"]] if names.get("router_weights") else []
        ours = helper.make_node("QMoE", [names["input"], names["router_probs"], *inputs, *mixing], node.output, name=node.name, domain=DOMAIN)
        ours.attribute.extend(attribute for attribute in node.attribute if attribute.name in (*_PASSED, "expert_weight_bits"))
        nodes.append(ours)
        swapped += 1
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return swapped
