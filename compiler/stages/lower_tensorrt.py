"""Stage `lower_tensorrt`: the quantized model in standard ONNX ops for TensorRT, checked on ONNX Runtime.

The rewrite is compiler.tensorrt_lowering. No GPU is needed to prove it right: ONNX Runtime's CPU
provider runs the lowered graph too, so this stage scores it on held-out text exactly as the verify stage
scores the CPU model (half of each window as a prompt, the rest fed on top of the cache, which exercises
the appended-KV path), and the same accuracy gate decides. The engine built from it is that graph.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from compiler import tensorrt_lowering
from compiler.checkpoint import Checkpoint
from compiler.stages import verify
from compiler.stages.export import DATA_FILE, MODEL_FILE
from runtime.appended_kv import OrtAppendedDecoder
from runtime.evaluate import next_token_nll

VERSION = "2"


class LowerTensorRTConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    precision: Literal["fp16", "fp32"]
    text_sha256: str
    tokens: int  # held-out tokens scored, from the end of the text
    window: int
    max_perplexity_increase: float
    min_top1_agreement: float


class LowerTensorRTResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    precision: str
    files: list[str]
    op_counts: dict[str, int]
    check: verify.VerifyResult  # the lowered graph on ONNX Runtime against the exported reference


def _appended_scores(decoder: OrtAppendedDecoder, ids: list[int], window: int) -> verify.Scores:
    """verify.scores for an appended-KV model: each window's first half as a prompt, the rest on top of the cache."""
    losses, predictions, finite = [], [], True
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        cache = decoder.new_cache(len(chunk))
        half = max(1, len(chunk) // 2)
        logits = np.concatenate([cache.feed(chunk[:half]), *([cache.feed(chunk[half:])] if chunk[half:] else [])])[:-1]
        finite &= bool(np.isfinite(logits).all())
        losses.append(next_token_nll(logits, np.asarray(chunk[1:])))
        predictions.append(np.argmax(logits, axis=-1))
    return np.concatenate(losses), np.concatenate(predictions), finite


def run(
    checkpoint: Checkpoint, config: LowerTensorRTConfig, out_dir: Path, progress=None, *, model_dir: Path, export_dir: Path, ids: list[int]
) -> LowerTensorRTResult:
    model = tensorrt_lowering.lower(ir.load(model_dir / MODEL_FILE), config.precision)
    ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE)
    ops = Counter(node.op_type for node in model.graph)
    dims = checkpoint.dims
    # DequantizeLinear stays unfused on ONNX Runtime so it computes what TensorRT's weight-only kernels do
    # (fused, onnxruntime would round the activations to INT8 too); W8A8's QuantizeLinear / DequantizeLinear pairs run as written.
    decoder = OrtAppendedDecoder(
        out_dir / MODEL_FILE, dims.num_layers, dims.num_kv_heads, dims.head_dim, config.precision, {"session.disable_quant_qdq": "1"}
    )
    held_out = ids[-config.tokens :]
    check = verify.judge(
        len(held_out), verify.scores(export_dir, held_out, config.window), _appended_scores(decoder, held_out, config.window),
        config.max_perplexity_increase, config.min_top1_agreement,
        hint="the TensorRT lowering changed the model's predictions; try tensorrt.precision: fp32 to tell precision from a lowering fault",
    )
    return LowerTensorRTResult(precision=config.precision, files=[MODEL_FILE, DATA_FILE], op_counts=dict(sorted(ops.items())), check=check)
