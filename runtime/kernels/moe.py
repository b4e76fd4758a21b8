"""moecc.MoE and moecc.QMoE (moe.c) in place of ONNX Runtime's com.microsoft MoE and QMoE, for the float32 SwiGLU
experts moecc exports and their INT4 and INT8 quantizations (INT4 per block of a row or per row, INT8 per row).

The kernels take each expert's fc2 transposed, so that a unit's output weights are one row they stream, and
moecc.QMoE takes one level per byte: the swap feeds the weights through the ops that unpack and transpose
them, which ONNX Runtime folds into new constants when the session loads (the artifact keeps the standard
layout, and a session holds the unpacked levels in place of the packed ones).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.kernels import DOMAIN, attribute_value

# ONNX Runtime's MoE inputs, by position; the kernel takes input, router_probs, fc1 and fc2 (transposed).
_MOE_INPUTS = (
    "input", "router_probs", "fc1_experts_weights", "fc1_experts_bias", "fc2_experts_weights", "fc2_experts_bias",
    "fc3_experts_weights", "fc3_experts_bias",
)  # fmt: skip
# Attributes the kernel implements, with the values it accepts (None: any).
_ATTRIBUTES = {"k": None, "normalize_routing_weights": {0, 1}, "activation_alpha": None, "activation_beta": None, "swiglu_limit": None,
               "activation_type": {b"swiglu"}, "swiglu_fusion": {1}, "use_sparse_mixer": {0}}  # fmt: skip
_REQUIRED = ("k", "activation_type", "swiglu_fusion")  # ONNX Runtime's defaults (no activation named, fusion 0) are not ours
# The MoE attributes moecc.MoE (and moecc.FusedDecoder for its experts) take over from the node.
PASSED_ATTRIBUTES = ("k", "normalize_routing_weights", "activation_alpha", "activation_beta", "swiglu_limit")
# QMoE's inputs, by position (of those after fc2's scales moecc.QMoE takes the router weights; not biases, fc3 or zero points).
_QMOE_INPUTS = (
    "input", "router_probs", "fc1_experts_weights", "fc1_scales", "fc1_experts_bias", "fc2_experts_weights", "fc2_scales", "fc2_experts_bias",
    "fc3_experts_weights", "fc3_scales", "fc3_experts_bias", "fc1_zero_points", "fc2_zero_points", "fc3_zero_points", "router_weights",
)  # fmt: skip
_QMOE_ATTRIBUTES = _ATTRIBUTES | {"expert_weight_bits": {4, 8}, "block_size": None}
HIDDEN_MULTIPLE, UNITS = 16, 16  # moe.c's: H a multiple of 16 (its widest vectors), I of UNITS (one pass); blocks of 16 too
_UNPACK_OPSET, _UNSQUEEZE_OPSET = 18, 13  # BitwiseAnd's; Unsqueeze's with its axes as an input


def _unsupported_form(node: onnx.NodeProto, names: dict[str, str], used: tuple[str, ...], attributes: dict, required: tuple[str, ...]) -> str | None:
    """Why a node that takes inputs `names` cannot be the kernel's, which reads only `used` and these attributes."""
    if extra := sorted(name for name, value in names.items() if value and name not in used):
        return f"uses {', '.join(extra)}"
    for attribute in node.attribute:
        allowed = attributes.get(attribute.name, set())
        if allowed is not None and onnx.helper.get_attribute_value(attribute) not in allowed:
            return f"sets {attribute.name}={onnx.helper.get_attribute_value(attribute)!r}"
    if missing := [name for name in required if not any(attribute.name == name for attribute in node.attribute)]:
        swiglu = " (the kernel takes interleaved SwiGLU)" if {"activation_type", "swiglu_fusion"} & set(missing) else ""
        return f"no {', '.join(missing)}{swiglu}"
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
    if attribute_value(node, "k") > experts:
        return f"k is larger than its {experts} experts"
    return None


def unsupported_quantized(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], opset: int = 21) -> str | None:
    """Why moecc.QMoE cannot stand in for this QMoE node, whose graph has these `constants` and this default-domain
    `opset`; None when it can."""
    names = dict(zip(_QMOE_INPUTS, node.input))
    if any(node.input[len(_QMOE_INPUTS) :]):  # newer ONNX Runtimes' global and activation scales
        return "uses inputs past router_weights"
    used = ("input", "router_probs", "fc1_experts_weights", "fc1_scales", "fc2_experts_weights", "fc2_scales", "router_weights")
    if reason := _unsupported_form(node, names, used, _QMOE_ATTRIBUTES, (*_REQUIRED, "expert_weight_bits")):
        return reason
    # ONNX Runtime's QMoE renormalizes the top k's probabilities whatever the attribute says, and moecc's layers
    # mix by router weights unnormalized: the kernel takes those two forms.
    normalize, mixed = attribute_value(node, "normalize_routing_weights", 0), bool(names.get("router_weights"))
    if normalize != (0 if mixed else 1):
        return f"normalize_routing_weights={normalize} {'with' if mixed else 'without'} router weights"
    weights = [constants.get(names.get(name, "")) for name in ("fc1_experts_weights", "fc1_scales", "fc2_experts_weights", "fc2_scales")]
    if any(weight is None for weight in weights):
        return "its expert weights or scales are not constants"
    fc1, fc1_scales, fc2, fc2_scales = weights
    if fc1.data_type != onnx.TensorProto.UINT8 or fc2.data_type != onnx.TensorProto.UINT8 or len(fc1.dims) != 3 or len(fc2.dims) != 3:
        return "its expert weights are not packed [E, rows, bytes] uint8"
    if fc1_scales.data_type != onnx.TensorProto.FLOAT or fc2_scales.data_type != onnx.TensorProto.FLOAT:
        return "its scales are not float32"
    bits, block = attribute_value(node, "expert_weight_bits"), attribute_value(node, "block_size", 0)
    if opset < _UNSQUEEZE_OPSET:
        return f"opset {opset} (the swap's Unsqueeze takes its axes as an input, opset {_UNSQUEEZE_OPSET})"
    if bits == 4 and opset < _UNPACK_OPSET:
        return f"opset {opset} (unpacking INT4 levels takes BitwiseAnd, opset {_UNPACK_OPSET})"
    experts, hidden, inter = fc1.dims[0], fc1.dims[2] * 8 // bits, fc1.dims[1] // 2
    if list(fc2.dims) != [experts, hidden, inter * bits // 8]:
        return f"fc1 {list(fc1.dims)} and fc2 {list(fc2.dims)} do not match"
    if hidden <= 0 or inter <= 0 or hidden % HIDDEN_MULTIPLE or inter % UNITS:
        return f"hidden size {hidden} and expert size {inter} (the kernel takes positive multiples of 16)"
    if bits == 8 and block:  # ONNX Runtime rounds the activations of block-wise INT8 experts: not float products
        return "block-wise INT8 scales (the kernel takes one per row)"
    for scales, rows, width in ((fc1_scales, 2 * inter, hidden), (fc2_scales, hidden, inter)):
        expected = [experts, rows, width // block] if block else [experts, rows]
        if list(scales.dims) != expected or (block and (width % block or block % UNITS)):
            return f"scales {list(scales.dims)} for [{experts}, {rows}, {width}] weights in blocks of {block or 'a row'} (the kernel takes blocks of a multiple of 16 that divide the rows)"
    if attribute_value(node, "k") > experts:
        return f"k is larger than its {experts} experts"
    return None


def _why_not(model: onnx.ModelProto, op_type: str) -> str | None:
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)
    for node in model.graph.node:
        if node.op_type != op_type or node.domain != "com.microsoft":
            continue
        if reason := unsupported(node, constants) if op_type == "MoE" else unsupported_quantized(node, constants, opset):
            return f"{node.name}: {reason}"
    return None


def why_not(model: onnx.ModelProto) -> str | None:
    """Why moecc.MoE cannot stand in for every MoE node of `model`, or None when it can (or there are none)."""
    return _why_not(model, "MoE")


def why_not_quantized(model: onnx.ModelProto) -> str | None:
    """Why moecc.QMoE cannot stand in for every QMoE node of `model`, or None when it can (or there are none)."""
    return _why_not(model, "QMoE")


def transposed(nodes: list[onnx.NodeProto], fc2: str) -> str:
    """The name of experts' fc2 [E, H, I] transposed to [E, I, H], as the kernels take it: a Transpose appended to
    `nodes`, which ONNX Runtime folds into a constant when the session loads."""
    nodes.append(onnx.helper.make_node("Transpose", [fc2], [f"{fc2}.transposed"], name=f"{fc2}.transpose", perm=[0, 2, 1]))
    return f"{fc2}.transposed"


def swap(model: onnx.ModelProto) -> int:
    """Swap every MoE node of `model` (which why_not() accepted) for moecc.MoE, fed its fc2 through a
    Transpose (one per weight, however many nodes read it); returns how many."""
    nodes: list[onnx.NodeProto] = []
    swapped_weights: dict[str, str] = {}
    swapped = 0
    for node in model.graph.node:
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        names = dict(zip(_MOE_INPUTS, node.input))
        fc2 = names["fc2_experts_weights"]
        if fc2 not in swapped_weights:
            swapped_weights[fc2] = transposed(nodes, fc2)
        ours = onnx.helper.make_node("MoE", [names["input"], names["router_probs"], names["fc1_experts_weights"], swapped_weights[fc2]], node.output, name=node.name, domain=DOMAIN)
        ours.attribute.extend(attribute for attribute in node.attribute if attribute.name in PASSED_ATTRIBUTES)
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
        helper.make_node("BitwiseAnd", [name, names["mask"]], [f"{name}.low"], name=f"{name}.low"),
        helper.make_node("BitShift", [name, names["shift"]], [f"{name}.high"], name=f"{name}.high", direction="RIGHT"),
        helper.make_node("Unsqueeze", [f"{name}.low", names["last"]], [f"{name}.low.paired"], name=f"{name}.low.paired"),
        helper.make_node("Unsqueeze", [f"{name}.high", names["last"]], [f"{name}.high.paired"], name=f"{name}.high.paired"),
        helper.make_node("Concat", [f"{name}.low.paired", f"{name}.high.paired"], [f"{name}.pairs"], name=f"{name}.pairs", axis=-1),
        helper.make_node("Reshape", [f"{name}.pairs", names["shape"]], [f"{name}.levels"], name=f"{name}.levels"),
    ]
    return f"{name}.levels"


# How each weight input of a QMoE node reaches moecc.QMoE: (levels to unpack, transposed, a per-row scale's block axis).
_PREPARED = {"fc1_experts_weights": (True, False, None), "fc1_scales": (False, False, 2), "fc2_experts_weights": (True, True, None), "fc2_scales": (False, True, 1)}


def _prepared(model: onnx.ModelProto, nodes: list[onnx.NodeProto], name: str, kind: str, bits: int, dims: list[int]) -> str:
    """The value moecc.QMoE reads in place of the weight input `name` of this `kind`, from nodes appended to `nodes`."""
    levels, transposed, block_axis = _PREPARED[kind]
    output = _unpacked(model, nodes, name, bits, dims) if levels else name
    if block_axis is not None and len(dims) == 2:  # one scale per row: a block axis of size 1
        axes = f"{name}.block_axis"
        model.graph.initializer.append(numpy_helper.from_array(np.array([block_axis], np.int64), axes))
        nodes.append(helper.make_node("Unsqueeze", [name, axes], [output := f"{name}.blocks"], name=f"{name}.unsqueeze"))
    elif transposed:
        nodes.append(helper.make_node("Transpose", [output], [f"{output}.transposed"], name=f"{output}.transpose", perm=[0, 2, 1]))
        output = f"{output}.transposed"
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
        names, bits = dict(zip(_QMOE_INPUTS, node.input)), attribute_value(node, "expert_weight_bits")
        for kind in _PREPARED:
            if names[kind] not in prepared:
                prepared[names[kind]] = _prepared(model, nodes, names[kind], kind, bits, shapes[names[kind]])
        mixing = [names["router_weights"]] if names.get("router_weights") else []
        inputs = [names["input"], names["router_probs"], *(prepared[names[kind]] for kind in _PREPARED), *mixing]
        ours = helper.make_node("QMoE", inputs, node.output, name=node.name, domain=DOMAIN)
        ours.attribute.extend(attribute for attribute in node.attribute if attribute.name in (*PASSED_ATTRIBUTES, "expert_weight_bits"))
        nodes.append(ours)
        swapped += 1
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return swapped
