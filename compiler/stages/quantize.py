"""Stage `quantize`: INT4 or INT8 weight-only quantization (symmetric, round to nearest) for the CPU target.

Expert weights become ONNX Runtime `QMoE`, stored unsigned with an offset of half the range: INT4 in
blocks along the input dimension (low nibble first), INT8 with one scale per output row (ONNX Runtime's
block-wise 8-bit QMoE did not match its own MoE on the dequantized weights, per-row did, to 1e-7).
Dense MatMul weights become `MatMulNBits` through onnxruntime's own quantizer. Routers, norms and the
embedding stay in float. Legend: E experts, N output rows, K input features.
"""

from __future__ import annotations

import logging
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

VERSION = "3"


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    weights: Literal["fp32", "int8", "int4"] = "fp32"  # fp32: nothing to do, the exported model is the artifact's
    block_size: int = 32


class QuantizeResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    precision: str
    quantized_experts: int
    expert_scales: str  # "per block of N" or "per row"
    quantized_matmuls: int
    op_counts: dict[str, int]


def quantize_blocks(weight: np.ndarray, block_size: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """[E,N,K] float -> unsigned levels [E,N,K*bits/8] and scales [E,N,K/block] (symmetric, round to nearest)."""
    experts, rows, columns = weight.shape
    blocks = weight.reshape(experts, rows, columns // block_size, block_size)
    top = 2 ** (bits - 1) - 1  # 7 or 127: the grid stays symmetric, the lowest level is unused
    scales = np.abs(blocks).max(axis=-1, keepdims=True) / top
    scales[scales == 0] = 1.0
    levels = np.clip(np.round(blocks / scales), -top - 1, top).astype(np.int16) + top + 1  # unsigned with offset
    levels = levels.reshape(experts, rows, columns).astype(np.uint8)
    if bits == 4:
        levels = levels[..., 0::2] | (levels[..., 1::2] << 4)  # low nibble first
    return levels.astype(np.uint8), scales[..., 0].astype(np.float32)


def _quantize_experts(model: ir.Model, bits: int, block_size: int) -> int:
    count = 0
    for node in list(model.graph):
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        x, router, fc1, _, fc2 = node.inputs[:5]
        new_inputs: list[ir.Value | None] = [x, router]
        for weight in (fc1, fc2):
            array = weight.const_value.numpy().astype(np.float32)
            packed, scales = quantize_blocks(array, block_size if bits == 4 else array.shape[-1], bits)
            if bits == 8:
                scales = scales[..., 0]  # one scale per row: [E,N]
            values = []
            for suffix, array in ((f"q{bits}", packed), ("scales", scales)):
                value = ir.Value(name=f"{weight.name}.{suffix}", shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                                 const_value=ir.tensor(array, name=f"{weight.name}.{suffix}"))
                model.graph.register_initializer(value)
                values.append(value)
            new_inputs += [*values, None]  # weights, scales, no bias
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        attributes |= {"expert_weight_bits": bits} | ({"block_size": block_size} if bits == 4 else {})
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
    if config.weights == "fp32":  # writes no model: the pipeline then takes the export stage's
        return QuantizeResult(precision="fp32", quantized_experts=0, expert_scales="none", quantized_matmuls=0, op_counts={})
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # The quantizer logs every node at INFO; the pipeline reports progress itself.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    bits = {"int8": 8, "int4": 4}[config.weights]
    model = ir.load(export_dir / MODEL_FILE)
    experts = _quantize_experts(model, bits, config.block_size)
    # Routers decide which experts run: a quantization error there changes the computation, not just its precision.
    routers = [n.name for n in model.graph if n.op_type == "MatMul" and any(u.node.op_type == "QMoE" and u.idx == 1 for u in n.outputs[0].uses())]
    with tempfile.TemporaryDirectory() as scratch:
        ir.save(model, Path(scratch) / MODEL_FILE, external_data=DATA_FILE)
        proto = onnx.load(str(Path(scratch) / MODEL_FILE))
    quantizer = MatMulNBitsQuantizer(
        proto, nodes_to_exclude=routers,
        algo_config=DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=True, bits=bits),
    )
    quantizer.process()
    quantized = ir.from_proto(quantizer.model.model)
    ir.save(quantized, out_dir / MODEL_FILE, external_data=DATA_FILE)
    ops = Counter(n.op_type for n in quantized.graph)
    return QuantizeResult(
        precision=f"{config.weights}-rtn-b{config.block_size}", quantized_experts=experts,
        expert_scales=f"per block of {config.block_size}" if bits == 4 else "per row",
        quantized_matmuls=ops["MatMulNBits"], op_counts=dict(sorted(ops.items())),
    )
