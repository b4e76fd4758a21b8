"""Stage `lower`: rewrites for the target's kernels, after quantization; on `cpu`, experts split for the threads.

onnxruntime's CPU MoE and QMoE kernels run each selected expert on one thread and hand the experts to the
threads by index range, so a decode step (one token, k experts) keeps at most k threads busy, and often
one: two selected experts in the same range run one after the other. Splitting every expert's
intermediate dimension into P parts, part p of expert e becoming sub-expert p*E + e, gives each thread its
share of every selected expert. The parts' outputs sum to the expert's output exactly, since SwiGLU works
elementwise along the intermediate dimension. The router logits are repeated P times and k multiplied by
P, so the top k*P picks the P parts of each of the top k experts; the softmax then gives each part 1/P of
its expert's weight, which fc2 (or its scales) absorbs by a factor P. Where a QMoE takes its mixing
weights as router_weights (layers whose experts differ in precision), those are repeated unchanged.
Two experts whose router logits tie exactly at the k-th place would each get some of their parts (the
kernel breaks ties by index); in fp32 such a tie has vanishing odds, fp16 logits tie far more easily, so
fp16 models keep their experts whole. moecc's own CPU MoE kernels (runtime/kernels/moe.c, float and
quantized experts) split every selected expert among the threads themselves; to them the parts are a few more
routes per token, and they keep ONNX Runtime's MoE and QMoE (with kernels="onnxruntime", and for QMoE nodes
moecc's kernel does not take) busy.
Legend: E experts, I intermediate width, H hidden width, P parts.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from compiler.checkpoint import Checkpoint
from compiler.onnx_graph import MS_DOMAIN, new_initializer
from compiler.stages.export import DATA_FILE, MODEL_FILE
from compiler.stages.quantize import SESSION_OPTIONS_FILE

VERSION = "2"
# Input positions of the expert weights: (fc1, fc1 scales, fc2, fc2 scales, router weights); None: absent.
_INPUTS = {"MoE": (2, None, 4, None, None), "QMoE": (2, 3, 5, 6, 14)}
_BIASES = {"MoE": (3, 5, 6, 7), "QMoE": (4, 7, 8, 9, 10, 11, 12, 13)}  # fc biases, fc3, zero points: never written by moecc


class LowerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    expert_parts: int = 2


class LowerResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    expert_parts: int
    split_nodes: list[str]  # MoE / QMoE nodes whose experts were split
    kept_whole: dict[str, str]  # node -> why its experts stay whole
    op_counts: dict[str, int]


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def _replace_initializer(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    name = node.inputs[index].name
    graph.initializers.pop(name)
    node.replace_input_with(index, new_initializer(graph, name, array))


def _parts(array: np.ndarray, axis: int, parts: int) -> np.ndarray:
    """[E, ...] -> [P*E, ...]: the array cut into P equal slices along `axis`, slice p of expert e at p*E + e."""
    return np.concatenate(np.split(array, parts, axis=axis), axis=0)


def _why_not(node: ir.Node, parts: int) -> str | None:
    fc1_at, fc1_scales_at, fc2_at, fc2_scales_at, _ = _INPUTS[node.op_type]
    if any(i < len(node.inputs) and node.inputs[i] is not None for i in _BIASES[node.op_type]):
        return "has biases, fc3 or zero points"
    activation, fusion = (node.attributes.get(name) for name in ("activation_type", "swiglu_fusion"))
    if activation is None or activation.value != "swiglu" or fusion is None or fusion.value != 1:
        return "only interleaved SwiGLU experts are split"  # gate/up row pairs are what keeps a slice whole
    if node.inputs[fc1_at].const_value is None or node.inputs[fc2_at].const_value is None:
        return "expert weights are not initializers"
    if node.inputs[fc1_scales_at if fc1_scales_at is not None else fc1_at].const_value.dtype == ir.DataType.FLOAT16:
        return "fp16 router logits can tie exactly, and tied experts would each get some of their parts"
    columns = _array(node.inputs[fc2_at]).shape[2]  # I, or I/2 packed INT4 values
    if columns % parts:
        return f"{columns} fc2 columns do not split into {parts}"
    block = node.attributes["block_size"].value if "block_size" in node.attributes else None
    if block and fc2_scales_at is not None and _array(node.inputs[fc2_scales_at]).shape[2] % parts:
        return f"fc2's blocks of {block} do not split into {parts}"
    return None


def _split(graph: ir.Graph, node: ir.Node, parts: int) -> None:
    fc1_at, fc1_scales_at, fc2_at, fc2_scales_at, router_weights_at = _INPUTS[node.op_type]
    mixing = node.inputs[router_weights_at] if router_weights_at is not None and router_weights_at < len(node.inputs) else None
    # fc1 rows are gate/up pairs along the intermediate dimension [E, 2I, ...]: contiguous slices keep the pairs.
    _replace_initializer(graph, node, fc1_at, _parts(_array(node.inputs[fc1_at]), 1, parts))
    if fc1_scales_at is not None:
        _replace_initializer(graph, node, fc1_scales_at, _parts(_array(node.inputs[fc1_scales_at]), 1, parts))
    fc2 = _parts(_array(node.inputs[fc2_at]), 2, parts)  # [E, H, I] columns
    factor = 1 if mixing is not None else parts  # each part's softmax weight is 1/P of its expert's
    if fc2_scales_at is None:
        _replace_initializer(graph, node, fc2_at, fc2 * np.asarray(factor, fc2.dtype))
    else:
        _replace_initializer(graph, node, fc2_at, fc2)
        scales = _array(node.inputs[fc2_scales_at])  # [E, H, I/block] (INT4) or [E, H] (INT8, one per row)
        scales = _parts(scales, 2, parts) if scales.ndim == 3 else np.concatenate([scales] * parts, axis=0)
        _replace_initializer(graph, node, fc2_scales_at, scales * np.asarray(factor, scales.dtype))
    repeats = [("router", 1)] + ([("router_weights", router_weights_at)] if mixing is not None else [])
    for label, index in repeats:
        concat = ir.node("Concat", [node.inputs[index]] * parts, {"axis": -1}, name=f"{node.name}.{label}.parts")
        graph.insert_before(node, concat)
        node.replace_input_with(index, concat.outputs[0])
    node.attributes["k"] = ir.AttrInt64("k", node.attributes["k"].value * parts)


def run(checkpoint: Checkpoint, config: LowerConfig, out_dir: Path, progress=None, *, model_dir: Path) -> LowerResult:
    nodes_split, kept_whole = [], {}
    moe_nodes = []
    model = None
    if config.expert_parts > 1:
        model = ir.load(model_dir / MODEL_FILE)
        moe_nodes = [node for node in model.graph if node.domain == MS_DOMAIN and node.op_type in _INPUTS]
    for done, node in enumerate(moe_nodes, 1):
        reason = _why_not(node, config.expert_parts)
        if reason:
            kept_whole[node.name] = reason
        else:
            _split(model.graph, node, config.expert_parts)
            nodes_split.append(node.name)
        if progress:
            progress(done, len(moe_nodes))
    if not nodes_split:  # writes no model: the pipeline then takes the previous stage's
        return LowerResult(expert_parts=config.expert_parts, split_nodes=[], kept_whole=kept_whole, op_counts={})
    ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE)
    if (model_dir / SESSION_OPTIONS_FILE).is_file():
        shutil.copyfile(model_dir / SESSION_OPTIONS_FILE, out_dir / SESSION_OPTIONS_FILE)
    ops = Counter(node.op_type for node in model.graph)
    return LowerResult(expert_parts=config.expert_parts, split_nodes=nodes_split, kept_whole=kept_whole, op_counts=dict(sorted(ops.items())))
