"""Stage `quantize`: weight precision per tensor class and per expert, lowered to ONNX Runtime's CPU kernels.

Each weight gets a precision from the recipe's rules: a tensor class (attention, router, shared expert,
dense mlp, lm_head, experts) and, for experts, their measured routing share (hot experts may get a
different precision than cold ones). Every choice is recorded with its reason.

Lowering on `cpu`:
- experts: `QMoE`; INT4 block-wise, INT8 with one scale per output row (onnxruntime's block-wise 8-bit
  QMoE quantizes activations on the fly, per-row keeps them in float). A layer whose experts differ in
  precision becomes one QMoE per precision: each selects among its own experts by the router logits and
  mixes with the routing weights of the full top-k (`router_weights`), which are zero for experts the full
  top-k did not pick, so the kernel skips them.
- dense weights: INT4 as `MatMulNBits`; INT8 as a block-wise DequantizeLinear feeding the MatMul; with INT8
  activations (W8A8) a QuantizeLinear / DequantizeLinear pair on the input with a static scale from
  calibration and a per-channel INT8 weight, which onnxruntime fuses into an integer MatMul.
  A draft model's INT4 and INT8 dense weights become `MatMulNBits` with integer products (accuracy level 4:
  each row's activations rounded to INT8 per block of K, on the fly). That kernel reads a quarter or an
  eighth of the float weight's bytes and is 2 to 6 times faster for one token (one-off measure, 2 threads,
  µs per matrix: 256x1024 fp32 38, INT8 20, INT4 18; 1024x4096 fp32 813, INT8 312, INT4 210), but the
  rounding turns the 1e-5 float noise between a token's call alone and in a verify block into logit
  differences of about 1e-2 (measured on the shipped pair), where a near tie can tip the argmax. The main
  model keeps float products so that speculation stays lossless; a draft's numerics only move its
  acceptance.
- the KV cache (kv_cache: int8): INT8 with one scale per KV head and channel from the calibrated ranges
  (compiler/kv_quantization.py).
Weights are rounded to nearest or by GPTQ with the second moments measured by the calibrate stage; the
experts' weights arrive quantized from the quantize_experts stage (one run per partition), dense ones are
quantized here.
Norms and the embedding stay in float. Legend: E experts, N output rows, K input features, T tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from compiler import kv_quantization, pruning, quantization
from compiler.checkpoint import Checkpoint
from compiler.errors import BuildError
from compiler.stages import calibrate, partition
from compiler.stages.export import DATA_FILE, MODEL_FILE
from compiler.onnx_graph import MS_DOMAIN, new_initializer
from compiler.weight_sites import DenseSite, MoeSite, dense_sites, moe_sites
from runtime.artifact import ExpertLayer, PartitionOutputs

VERSION = "13"
SESSION_OPTIONS_FILE = "session_options.json"  # ONNX Runtime settings the model must run with
EXPERTS_FILE = "experts.npz"  # written by the quantize_experts stage, one per partition
Precision = Literal["fp32", "int8", "int4"]
BITS = {"int8": 8, "int4": 4}
NORM_WEIGHT_INPUT = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}  # which input is the scale


def array_key(partition: int, layer: int, precision: str, kind: str) -> str:
    """The name of an array in EXPERTS_FILE: kind fc1, fc1.scales, fc2 or fc2.scales of a layer's experts of one precision."""
    return f"p{partition}.layer{layer}.{precision}.{kind}"


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    weights: Precision = "fp32"  # every class not named in `classes`, except the router
    method: Literal["rtn", "gptq"] = "rtn"
    block_size: int = 32
    classes: dict[str, Precision] = {}  # attention, router, shared_expert, mlp, lm_head, experts
    hot_experts: Precision | None = None  # precision of the partition plan's hot tier
    activations: Literal["fp32", "int8"] = "fp32"  # int8: static scales on the inputs of INT8 dense weights
    activation_range: Literal["minmax", "percentile", "entropy"] = "percentile"
    smoothquant: float | None = None  # alpha; needs activation_range minmax
    partition_precision: dict[int, Precision] = {}  # partition -> its experts' precision, overriding the rules above
    kv_cache: Literal["auto", "int8"] = "auto"  # int8: the attention's cache in INT8 with calibrated per-channel scales
    integer_products: bool = False  # dense INT4/INT8 weights multiply INT8-rounded activations (a draft's: see above)


class TensorChoice(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    tensor_class: str
    precision: str
    reason: str


class ExpertChoice(BaseModel):
    model_config = ConfigDict(frozen=True)
    layer: int
    expert: int
    precision: str
    routed_share: float
    reason: str


class QuantizeResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    precision: str
    method: str
    dense: list[TensorChoice]
    experts: list[ExpertChoice]
    smoothed: list[str]  # norms whose weights absorbed SmoothQuant's scales
    session_options: dict[str, str]
    op_counts: dict[str, int]
    pruned: list[ExpertChoice] = []  # experts dropped by the partition plan (their choice records the routed share)
    pruned_bytes: int = 0  # their weights and router columns, before quantization
    expert_layers: list[ExpertLayer] = []  # where a partitioned model's MoE layers are cut for expert parallelism
    kv_cache: Literal["auto", "int8"] = "auto"


def precision_label(config: QuantizeConfig) -> str:
    if config.weights == "fp32" and not config.classes and config.hot_experts is None:
        return "fp32"
    label = f"{config.weights}-{config.method}-b{config.block_size}"
    if config.activations == "int8":
        label += f"-a8-{config.activation_range}" + (f"-sq{config.smoothquant:g}" if config.smoothquant else "")
    if config.classes or (config.hot_experts and config.hot_experts != config.classes.get("experts", config.weights)):
        label += "-mixed"
    return label


def _dense_choice(site: DenseSite, config: QuantizeConfig) -> TensorChoice:
    if site.tensor_class in config.classes:
        precision, reason = config.classes[site.tensor_class], f"recipe rule for class {site.tensor_class}"
    elif site.tensor_class == "router":
        precision, reason = "fp32", "router stays in float: its errors change which experts run"
    else:
        precision, reason = config.weights, "recipe default"
    return TensorChoice(name=site.weight.name, tensor_class=site.tensor_class, precision=precision, reason=reason)


def expert_choices(tokens_per_expert: list[list[int]], tiers: list[list[str]], rare: set[tuple[int, int]], policy: str, config: QuantizeConfig) -> list[ExpertChoice]:
    """Each expert's precision: the hot tier's when the recipe gives one, else the experts' rule or the default."""
    cold = config.classes.get("experts", config.weights)
    choices = []
    for layer, (counts, layer_tiers) in enumerate(zip(tokens_per_expert, tiers)):
        total = max(1, sum(counts))
        for expert, (count, tier) in enumerate(zip(counts, layer_tiers)):
            share = count / total
            if config.hot_experts and tier == "hot":
                precision, reason = config.hot_experts, f"hot tier ({share:.1%} of routed tokens)"
            elif config.hot_experts:
                precision, reason = cold, f"cold tier ({share:.1%} of routed tokens)"
            else:
                precision, reason = cold, "recipe rule for class experts" if "experts" in config.classes else "recipe default"
            if (layer, expert) in rare and precision != "fp32" and config.method == "gptq":
                reason += f"; rarely routed ({count} tokens), calibrated on " + ("all tokens of the layer" if policy == "all_tokens" else "its routed tokens only")
            choices.append(ExpertChoice(layer=layer, expert=expert, precision=precision, routed_share=round(share, 5), reason=reason))
    return choices


def _smooth(denses: list[DenseSite], choices: list[TensorChoice], statistics: dict[str, np.ndarray], ranges: dict, alpha: float) -> list[str]:
    """SmoothQuant where a norm feeds only W8A8 weights: its weight absorbs 1/s, theirs s.

    The second moments and the min-max range of the smoothed input are rescaled to match; a norm with any
    other consumer (a router, an MoE block) is left alone, since that consumer would see the change.
    """
    groups: dict[str, list[DenseSite]] = {}
    for site, choice in zip(denses, choices):
        if choice.precision == "int8":
            groups.setdefault(site.input.name, []).append(site)
    smoothed = []
    for name, sites in groups.items():
        norm = sites[0].input.producer()
        if norm is not None and norm.op_type == "GatherND" and len(norm.inputs[0].uses()) == 1:
            norm = norm.inputs[0].producer()  # the head reads the rows of asked positions: a per-channel scale passes through
        if norm is None or norm.op_type not in NORM_WEIGHT_INPUT or {u.node for u in sites[0].input.uses()} != {s.node for s in sites}:
            continue
        weights = [site.weight.const_value.numpy() for site in sites]  # [K,N] each
        activation_max = statistics[calibrate.statistics_key("absmax", name)]
        scales = quantization.smoothing_scales(activation_max, np.max([np.abs(w).max(axis=1) for w in weights], axis=0), alpha)  # [K]
        gamma = norm.inputs[NORM_WEIGHT_INPUT[norm.op_type]]
        gamma.const_value = ir.tensor((gamma.const_value.numpy() / scales).astype(weights[0].dtype), name=gamma.name)
        for site, weight in zip(sites, weights):
            site.weight.const_value = ir.tensor((weight * scales[:, None]).astype(weight.dtype), name=site.weight.name)
        key = calibrate.statistics_key("dense", name)
        statistics[key] = statistics[key] / np.outer(scales, scales)
        ranges[name]["minmax"] = float((activation_max / scales).max())
        smoothed.append(gamma.name)
    return smoothed


def _replace(graph: ir.Graph, node: ir.Node, replacement: list[ir.Node], output: ir.Value) -> None:
    """Put `replacement` where `node` was; `output` takes over its single output, including its name."""
    graph.insert_before(node, replacement)
    name = node.outputs[0].name
    node.outputs[0].replace_all_uses_with(output, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    output.name = name  # a graph output keeps the name the runtime binds


class Quantizer:
    """Rounds weights [..., N, K] by the configured method; GPTQ reads the calibrated second moments [..., K, K]."""

    def __init__(self, method: str, statistics: dict[str, np.ndarray]):
        self.method, self.statistics = method, statistics

    def __call__(self, weight: np.ndarray, bits: int, block_size: int, moments_key: str, experts: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        if weight.shape[-1] % block_size:
            raise BuildError(
                f"quantize: block size {block_size} does not divide the input width {weight.shape[-1]} of a {moments_key.split(':')[0]} weight",
                hint="choose a quantize.block_size that divides every hidden and expert width",
            )
        if self.method == "gptq":
            hessian = self.statistics[moments_key]
            return quantization.gptq(weight, hessian if experts is None else hessian[experts], block_size, bits)
        return quantization.round_to_nearest(weight, block_size, bits)


def _lower_dense(graph: ir.Graph, site: DenseSite, precision: str, quantize: Quantizer, config: QuantizeConfig, ranges: dict) -> None:
    bits = BITS[precision]
    weight = site.weight.const_value.numpy()  # [K,N]
    dtype = weight.dtype
    rows, features = weight.shape[1], weight.shape[0]
    key = calibrate.statistics_key("dense", site.input.name)
    name = site.weight.name
    if config.activations == "int8" and precision == "int8":
        levels, scales = quantize(weight.T.astype(np.float32), 8, features, key)  # one scale per output channel
        activation_scale = np.asarray(ranges[site.input.name][config.activation_range] / 127, dtype)
        zero = np.zeros((), np.int8)
        x_scale, x_zero = new_initializer(graph, f"{name}.input_scale", activation_scale), new_initializer(graph, f"{name}.input_zero", zero)
        x = ir.node("QuantizeLinear", [site.input, x_scale, x_zero])
        x_dq = ir.node("DequantizeLinear", [x.outputs[0], x_scale, x_zero])
        w_dq = ir.node(
            "DequantizeLinear",
            [new_initializer(graph, f"{name}.q8", np.ascontiguousarray(levels.T.astype(np.int8))), new_initializer(graph, f"{name}.scales", scales[:, 0].astype(dtype)),
             new_initializer(graph, f"{name}.zero", np.zeros(rows, np.int8))],
            {"axis": 1},
        )
        replacement = [x, x_dq, w_dq, ir.node("MatMul", [x_dq.outputs[0], w_dq.outputs[0]])]
    elif bits == 8 and not config.integer_products:  # MatMulNBits' 8-bit float kernel measured 14x slower (591 vs 42 us, 256x1024)
        block = config.block_size
        levels, scales = quantize(weight.T.astype(np.float32), 8, block, key)  # [N,K], [N,K/block]
        w_dq = ir.node(
            "DequantizeLinear",
            [new_initializer(graph, f"{name}.q8", np.ascontiguousarray(levels.T.astype(np.int8))), new_initializer(graph, f"{name}.scales", np.ascontiguousarray(scales.T.astype(dtype)))],
            {"axis": 0, "block_size": block},
        )
        replacement = [w_dq, ir.node("MatMul", [site.input, w_dq.outputs[0]])]
    else:
        block = config.block_size
        levels, scales = quantize(weight.T.astype(np.float32), bits, block, key)  # [N,K], [N,K/block]
        packed = quantization.pack(levels, bits).reshape(rows, features // block, block * bits // 8)
        products = {"accuracy_level": 4} if config.integer_products else {}  # level 0 (the default): float products
        replacement = [ir.node(
            "MatMulNBits",
            [site.input, new_initializer(graph, f"{name}.q{bits}", packed), new_initializer(graph, f"{name}.scales", scales.reshape(-1).astype(dtype))],
            {"K": features, "N": rows, "bits": bits, "block_size": block, **products},
            domain=MS_DOMAIN,
        )]
    _replace(graph, site.node, replacement, replacement[-1].outputs[0])
    graph.initializers.pop(site.weight.name)


def _expert_group(graph: ir.Graph, site: MoeSite, experts: list[int], label: str, bits: int, quantized: dict[str, np.ndarray], key) -> list[ir.Value]:
    """QMoE weight inputs for `experts` (positions in the node) of one MoE layer, from the quantize_experts stage's
    arrays (`key(kind)` names them): fc1 weights, scales, no bias, fc2 weights, scales."""
    inputs: list[ir.Value | None] = []
    tag = label + (f".e{'-'.join(map(str, experts))}" if len(experts) < site.fc1.shape[0] else "")
    for weight, kind in ((site.fc1, "fc1"), (site.fc2, "fc2")):
        inputs += [new_initializer(graph, f"{weight.name}.{tag}.q{bits}", quantized[key(kind)]), new_initializer(graph, f"{weight.name}.{tag}.scales", quantized[key(f"{kind}.scales")])]
        if kind == "fc1":
            inputs.append(None)  # no bias
    return inputs


def routing_weights(graph: ir.Graph, prefix: str, router_logits: ir.Value, top_k: int, renormalize: bool, float_type: np.dtype) -> list[ir.Node]:
    """Nodes computing the full top-k's mixing weights [T,E], zero outside the top-k, as the MoE kernel would."""
    probs = ir.node("Softmax", [router_logits], {"axis": -1})
    top = ir.node("TopK", [probs.outputs[0], new_initializer(graph, f"{prefix}.k", np.array([top_k], np.int64))], {"axis": -1}, num_outputs=2)
    values, indices = top.outputs  # [T,k]
    nodes = [probs, top]
    if renormalize:
        total = ir.node("ReduceSum", [values, new_initializer(graph, f"{prefix}.last_axis", np.array([-1], np.int64))], {"keepdims": 1})
        values_node = ir.node("Div", [values, total.outputs[0]])
        nodes += [total, values_node]
        values = values_node.outputs[0]
    shape = ir.node("Shape", [probs.outputs[0]])
    zeros = ir.node("ConstantOfShape", [shape.outputs[0]], {"value": ir.tensor(np.zeros(1, float_type))})
    scatter = ir.node("ScatterElements", [zeros.outputs[0], indices, values], {"axis": -1})
    return nodes + [shape, zeros, scatter]


def _float_partition(graph: ir.Graph, site: MoeSite, positions: list[int], part: int, mixing: ir.Value, attributes: dict) -> list[ir.Node]:
    """One partition's float experts as their own MoE node, weighted by the whole layer's routing.

    onnxruntime's MoE takes no routing weights, so the node gets log g for the experts of this partition the
    layer selected and a large negative logit for the others, picks min(k, its experts) without
    renormalising, and its softmax divides by s, the sum of those g: the output times s is the partition's
    share of the layer's output (zero when none of its experts was selected).
    """
    name = f"moe.{site.layer}.p{part}"
    dtype = site.fc1.const_value.dtype.numpy()
    index = new_initializer(graph, f"{name}.experts", np.array(positions, np.int64))
    weights = ir.node("Gather", [mixing, index], {"axis": 1})  # [T,E_p], zero outside the layer's top k
    floor = new_initializer(graph, f"{name}.floor", np.array(1e-30 if dtype == np.float32 else 1e-7, dtype))
    clipped = ir.node("Max", [weights.outputs[0], floor])  # Log(0) would be -inf
    logits = ir.node("Log", [clipped.outputs[0]])
    selected = ir.node("Greater", [weights.outputs[0], new_initializer(graph, f"{name}.zero", np.zeros((), dtype))])
    masked = ir.node("Where", [selected.outputs[0], logits.outputs[0], new_initializer(graph, f"{name}.unselected", np.array(-1e4, dtype))])
    total = ir.node("ReduceSum", [weights.outputs[0], new_initializer(graph, f"{name}.last_axis", np.array([-1], np.int64))], {"keepdims": 1})
    fc1 = new_initializer(graph, f"{site.fc1.name}.p{part}", np.ascontiguousarray(site.fc1.const_value.numpy()[positions]))
    fc2 = new_initializer(graph, f"{site.fc2.name}.p{part}", np.ascontiguousarray(site.fc2.const_value.numpy()[positions]))
    moe = ir.node(
        "MoE", [site.tokens, masked.outputs[0], fc1, None, fc2],
        attributes | {"k": min(attributes["k"], len(positions)), "normalize_routing_weights": 0}, domain=MS_DOMAIN, name=f"{site.node.name}.p{part}",
    )
    share = ir.node("Mul", [moe.outputs[0], total.outputs[0]])
    return [weights, clipped, logits, selected, masked, total, moe, share]


def _named(value: ir.Value, name: str, float_type: ir.DataType) -> ir.Value:
    """A value the runtime finds by name (where an expert-parallel runtime cuts the graph), with its type recorded."""
    value.name, value.type = name, ir.TensorType(float_type)
    return value


def _lower_moe(
    graph: ir.Graph, site: MoeSite, choices: list[ExpertChoice], quantized: dict[str, np.ndarray], block_size: int,
    kept: list[int] | None = None, partition_of: list[int] | None = None,
) -> ExpertLayer | None:
    """The layer's experts as one node per (partition, precision): QMoE for quantized experts, MoE for float ones
    of a partitioned layer. `kept`: the original ids of the experts left after pruning; `partition_of`: each
    original expert's partition (None: one partition), whose weights then live in tensors of their own, and
    whose cut (the values entering the experts and each partition's share) is returned."""
    kept = kept if kept is not None else [choice.expert for choice in choices]
    groups: dict[tuple[int, str], list[int]] = {}
    for choice in choices:
        groups.setdefault((partition_of[choice.expert] if partition_of else 0, choice.precision), []).append(choice.expert)
    precisions = {precision for _, precision in groups}
    if precisions == {"fp32"} and len(groups) == 1:
        return None
    if "fp32" in precisions and len(precisions) > 1:
        raise ValueError(f"MoE layer {site.layer}: experts must all be quantized or all stay fp32 (got {sorted(precisions)})")
    attributes = {name: attr.value for name, attr in site.node.attributes.items()}
    top_k, renormalize = attributes["k"], bool(attributes["normalize_routing_weights"])
    nodes: list[ir.Node] = []
    mixing = None
    # The mixing weights are computed in the graph and passed as router_weights when the layer's experts
    # are split over several nodes (precisions, partitions), and when the top-k weights are not renormalised:
    # onnxruntime's CPU QMoE (1.32) renormalises them whatever normalize_routing_weights says (measured).
    if len(groups) > 1 or not renormalize:
        # activations share the weights' float type
        nodes += routing_weights(graph, f"moe.{site.layer}", site.router_logits, top_k, renormalize, site.fc1.const_value.dtype.numpy())
        mixing = nodes[-1].outputs[0]
    float_type = site.fc1.const_value.dtype
    if partition_of:
        _named(mixing, f"moe.{site.layer}.mixing", float_type)
    partials, shares = [], {}
    for (part, precision), experts in sorted(groups.items()):
        experts = [kept.index(expert) for expert in experts]  # positions in the (pruned) node
        if partition_of:
            columns, outputs = shares.setdefault(part, ([], []))
            columns += experts
        if precision == "fp32":
            nodes += _float_partition(graph, site, experts, part, mixing, attributes)
            partials.append(nodes[-1].outputs[0])
            if partition_of:
                outputs.append(_named(partials[-1], f"moe.{site.layer}.p{part}.fp32.share", float_type).name)
            continue
        bits = BITS[precision]
        label = f"p{part}.{precision}" if partition_of else precision
        weights = _expert_group(graph, site, experts, label, bits, quantized, lambda kind: array_key(part, site.layer, precision, kind))
        group_attributes = attributes | {"expert_weight_bits": bits} | ({"block_size": block_size} if bits == 4 else {})
        inputs = [site.tokens, site.router_logits, *weights]
        if mixing is not None:
            index = new_initializer(graph, f"moe.{site.layer}.{label}.experts", np.array(experts, np.int64))
            logits = ir.node("Gather", [site.router_logits, index], {"axis": 1})
            mix = ir.node("Gather", [mixing, index], {"axis": 1})
            nodes += [logits, mix]
            # Inputs 7-13 (fc2 bias, fc3, zero points) are absent; 14 is router_weights.
            inputs = [site.tokens, logits.outputs[0], *weights, *([None] * 7), mix.outputs[0]]
            group_attributes |= {"k": min(top_k, len(experts)), "normalize_routing_weights": 0}
        qmoe = ir.node("QMoE", inputs, group_attributes, domain=MS_DOMAIN, name=f"{site.node.name}.{label}")
        nodes.append(qmoe)
        partials.append(qmoe.outputs[0])
        if partition_of:
            outputs.append(_named(partials[-1], f"moe.{site.layer}.{label}.share", float_type).name)
    while len(partials) > 1:  # the runtime's expert-parallel sum follows this order
        total = ir.node("Add", partials[:2])
        nodes.append(total)
        partials = [total.outputs[0], *partials[2:]]
    output = site.node.outputs[0].name
    _replace(graph, site.node, nodes, partials[0])
    for weight in (site.fc1, site.fc2):
        graph.initializers.pop(weight.name)
    if not partition_of:
        return None
    _named(partials[0], output, float_type)
    return ExpertLayer(
        layer=site.layer, tokens=site.tokens.name, router_logits=site.router_logits.name, mixing=mixing.name, output=output,
        partitions=[PartitionOutputs(partition=part, columns=sorted(columns), outputs=outputs) for part, (columns, outputs) in sorted(shares.items())],
    )


def planned_expert_choices(routing: calibrate.CalibrateResult, plan: partition.PartitionResult, config: QuantizeConfig) -> tuple[list[ExpertChoice], list[ExpertChoice]]:
    """Each kept expert's precision (from the rules, the tiers and its partition's own precision), and the pruned experts."""
    rare = {(r.layer, r.expert) for r in routing.rarely_routed}
    experts = expert_choices(routing.tokens_per_expert, [layer.tiers for layer in plan.layers], rare, routing.rare_expert_policy, config)
    dropped = {(layer.layer, expert) for layer in plan.layers for expert in layer.pruned}
    pruned = [choice.model_copy(update={"reason": f"pruned: {choice.routed_share:.2%} of routed tokens"}) for choice in experts if (choice.layer, choice.expert) in dropped]
    experts = [choice for choice in experts if (choice.layer, choice.expert) not in dropped]
    own = config.partition_precision
    experts = [
        choice.model_copy(update={"precision": own[part], "reason": f"partition {part} rule"}) if part in own else choice
        for choice in experts for part in [plan.layers[choice.layer].partition_of_expert[choice.expert]]
    ]
    return experts, pruned


def run(
    checkpoint: Checkpoint, config: QuantizeConfig, out_dir: Path, progress=None, *,
    export_dir: Path, calibrate_dir: Path, partition_dir: Path, experts_dirs: list[Path],
) -> QuantizeResult:
    """experts_dirs: the quantize_experts stage's output for each partition."""
    routing = calibrate.read_routing(calibrate_dir)
    plan = partition.read_plan(partition_dir)
    experts, pruned = planned_expert_choices(routing, plan, config)
    label = precision_label(config)
    if config.partition_precision:
        own = config.partition_precision
        if label == "fp32":
            label = f"{own[min(own)]}-{config.method}-b{config.block_size}" + ("-mixed" if len(set(own.values())) > 1 else "")
        elif {choice.precision for choice in experts} != {config.classes.get("experts", config.weights)} and not label.endswith("-mixed"):
            label += "-mixed"
    if label == "fp32" and config.kv_cache == "auto" and not pruned and plan.partitions <= 1:  # writes no model: the pipeline then takes the export stage's
        return QuantizeResult(precision="fp32", method="none", dense=[], experts=experts, smoothed=[], session_options={}, op_counts={})

    model = ir.load(export_dir / MODEL_FILE)
    kept = {layer.layer: [e for e in range(len(layer.tiers)) if e not in layer.pruned] for layer in plan.layers}
    pruned_bytes = sum(pruning.prune_experts(model.graph, site, kept[site.layer]) for site in moe_sites(model) if plan.layers[site.layer].pruned)
    smoothing = config.activations == "int8" and config.smoothquant is not None
    statistics = {}
    if config.method == "gptq" or smoothing:  # round to nearest alone needs no calibrated statistics
        statistics = calibrate.read_statistics(calibrate_dir, ("dense", "absmax"))  # the experts' are quantize_experts' to read
    ranges = json.loads((calibrate_dir / calibrate.RANGES_FILE).read_text())
    moes, denses = moe_sites(model), dense_sites(model)
    choices = [_dense_choice(site, config) for site in denses]
    smoothed = _smooth(denses, choices, statistics, ranges, config.smoothquant) if smoothing else []
    quantize = Quantizer(config.method, statistics)
    quantized = {}
    for folder in experts_dirs:
        with np.load(folder / EXPERTS_FILE, allow_pickle=False) as stored:
            quantized |= {key: stored[key] for key in stored.files}
    total, done = len(moes) + len(denses), 0
    expert_layers: list[ExpertLayer] = []
    for site in moes:
        partition_of = plan.layers[site.layer].partition_of_expert if plan.partitions > 1 else None
        cut = _lower_moe(model.graph, site, [c for c in experts if c.layer == site.layer], quantized, config.block_size, kept[site.layer], partition_of)
        if cut is not None:
            expert_layers.append(cut)
        done += 1
        if progress:
            progress(done, total)
    for site, choice in zip(denses, choices):
        if choice.precision != "fp32":
            _lower_dense(model.graph, site, choice.precision, quantize, config, ranges)
        done += 1
        if progress:
            progress(done, total)
    if config.kv_cache == "int8":
        kv_quantization.quantize_cache(model.graph, calibrate.read_statistics(calibrate_dir, ("kv_key", "kv_value")))
    ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE)
    options = {}
    if config.activations == "fp32" and not config.integer_products and any(c.precision == "int8" for c in choices):
        # onnxruntime would fuse the INT8 DequantizeLinear + MatMul into an int8-activation kernel whose result
        # for a token depends on how many tokens share the call (measured: logits 8e-3 apart), which breaks
        # lossless speculation; unfused, the weights are dequantized per call and the MatMul stays in float.
        options["session.disable_quant_qdq"] = "1"
        (out_dir / SESSION_OPTIONS_FILE).write_text(json.dumps(options))
    ops = Counter(node.op_type for node in model.graph)
    return QuantizeResult(
        precision=label, method=config.method, dense=choices, experts=experts, smoothed=smoothed, session_options=options,
        op_counts=dict(sorted(ops.items())), pruned=pruned, pruned_bytes=pruned_bytes, expert_layers=expert_layers, kv_cache=config.kv_cache,
    )


def session_options_of(model_dir: Path) -> dict[str, str]:
    """The session settings a model folder written by this stage needs (none for the export stage's)."""
    path = model_dir / SESSION_OPTIONS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
