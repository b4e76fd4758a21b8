"""Stage `quantize`: block-wise INT4 weight-only quantization (round to nearest) for the CPU target.

Expert weights become ONNX Runtime `QMoE` (symmetric blocks along the input dimension, stored unsigned
with offset 8, low nibble first); dense MatMul weights become `MatMulNBits` through onnxruntime's own
quantizer. The router and the norms stay in float. Legend: E experts, N output rows, K input features.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from compiler.checkpoint import Checkpoint
from compiler.stages.export import DATA_FILE, MODEL_FILE

VERSION = "1"
_BITS = 4


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    weights: Literal["fp32", "int4"] = "fp32"  # fp32: the stage passes the exported model through unchanged
    block_size: int = 32


class QuantizeResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    precision: str
    quantized_experts: int
    quantized_matmuls: int
    op_counts: dict[str, int]


def quantize_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[E,N,K] float -> packed uint8 [E,N,K/2] and scales [E,N,K/block] (symmetric, round to nearest)."""
    experts, rows, columns = weight.shape
    blocks = weight.reshape(experts, rows, columns // block_size, block_size)
    scales = np.abs(blocks).max(axis=-1, keepdims=True) / 7.0  # int4 in [-8, 7]; 7 keeps the grid symmetric
    scales[scales == 0] = 1.0
    levels = np.clip(np.round(blocks / scales), -8, 7).astype(np.int16) + 8  # unsigned with offset 8
    levels = levels.reshape(experts, rows, columns).astype(np.uint8)
    packed = levels[..., 0::2] | (levels[..., 1::2] << 4)  # low nibble first
    return packed.astype(np.uint8), scales[..., 0].astype(np.float32)


def _quantize_experts(model: ir.Model, block_size: int) -> int:
    count = 0
    for node in list(model.graph):
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        x, router, fc1, _, fc2 = node.inputs[:5]
        new_inputs: list[ir.Value | None] = [x, router]
        for weight in (fc1, fc2):
            packed, scales = quantize_blocks(weight.const_value.numpy().astype(np.float32), block_size)
            values = []
            for suffix, array in (("q4", packed), ("scales", scales)):
                value = ir.Value(name=f"{weight.name}.{suffix}", shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                                 const_value=ir.tensor(array, name=f"{weight.name}.{suffix}"))
                model.graph.register_initializer(value)
                values.append(value)
            new_inputs += [*values, None]  # weights, scales, no bias
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        attributes |= {"expert_weight_bits": _BITS, "block_size": block_size}
        qmoe = ir.node("QMoE", new_inputs[:-1], attributes, domain="com.microsoft", name=node.name)
        model.graph.insert_before(node, qmoe)
        node.outputs[0].replace_all_uses_with(qmoe.outputs[0])
        model.graph.remove(node, safe=True)
        for weight in (fc1, fc2):
            if not weight.uses():
                model.graph.initializers.pop(weight.name)
        count += 1
    return count


def run(checkpoint: Checkpoint, config: QuantizeConfig, out_dir: Path, progress=None, *, export_dir: Path) -> QuantizeResult:
    if config.weights == "fp32":
        model = ir.load(export_dir / MODEL_FILE)
        ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE)
        return QuantizeResult(precision="fp32", quantized_experts=0, quantized_matmuls=0, op_counts=dict(Counter(n.op_type for n in model.graph)))
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = ir.load(export_dir / MODEL_FILE)
    experts = _quantize_experts(model, config.block_size)
    # Routers decide which experts run: a quantization error there changes the computation, not just its precision.
    routers = [n.name for n in model.graph if n.op_type == "MatMul" and any(u.node.op_type == "QMoE" and u.idx == 1 for u in n.outputs[0].uses())]
    with tempfile.TemporaryDirectory() as scratch:
        ir.save(model, Path(scratch) / MODEL_FILE, external_data=DATA_FILE)
        proto = onnx.load(str(Path(scratch) / MODEL_FILE))
    quantizer = MatMulNBitsQuantizer(
        proto, nodes_to_exclude=routers,
        algo_config=DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=True, bits=_BITS),
    )
    quantizer.process()
    quantized = ir.from_proto(quantizer.model.model)
    ir.save(quantized, out_dir / MODEL_FILE, external_data=DATA_FILE)
    ops = Counter(n.op_type for n in quantized.graph)
    return QuantizeResult(
        precision=f"int4-rtn-b{config.block_size}", quantized_experts=experts, quantized_matmuls=ops["MatMulNBits"], op_counts=dict(sorted(ops.items()))
    )
