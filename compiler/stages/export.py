"""Stage `export`: stream a validated checkpoint into an ONNX decoder with KV cache (weights as external data)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from compiler.checkpoint import Checkpoint
from compiler.onnx_graph import build_decoder

VERSION = "4"  # 3: query_seqlens input; 4: logit_positions input
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


class ExportConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    precision: Literal["fp32", "fp16"] = "fp32"
    max_sequence_length: int = 2048


class ExportResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    files: list[str]
    nodes: int
    op_counts: dict[str, int]
    precision: str
    max_sequence_length: int


def run(checkpoint: Checkpoint, config: ExportConfig, out_dir: Path, progress=None) -> ExportResult:
    model = build_decoder(checkpoint.arch, checkpoint.dims, checkpoint.read, config.max_sequence_length, config.precision)
    total = len(model.graph.initializers)

    def written(tensor, info) -> None:  # called by onnx_ir once per tensor as it streams to disk
        if progress:
            progress(info.index + 1, total)

    ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE, callback=written)
    ops = Counter(node.op_type for node in model.graph)
    return ExportResult(
        files=[MODEL_FILE, DATA_FILE],
        nodes=sum(ops.values()),
        op_counts=dict(sorted(ops.items())),
        precision=config.precision,
        max_sequence_length=config.max_sequence_length,
    )
