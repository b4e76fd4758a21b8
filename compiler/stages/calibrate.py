"""Stage `calibrate`: run calibration text through the exported fp32 model and measure expert routing.

Legend: T tokens of one window, E experts, L MoE layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict

from compiler.checkpoint import Checkpoint
from compiler.ort_windows import run_windows
from compiler.stages.export import MODEL_FILE

VERSION = "1"
ROUTING_FILE = "routing.json"


class CalibrateConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    text_sha256: str  # identity of the calibration text (the text itself comes with the stage inputs)
    max_tokens: int
    window: int  # tokens per forward pass, at most the exported maximum sequence length
    min_tokens_per_expert: int  # experts routed fewer tokens than this are reported as rarely routed


class RareExpert(BaseModel):
    model_config = ConfigDict(frozen=True)
    layer: int
    expert: int
    tokens: int


class CalibrateResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    tokens: int
    moe_layers: int
    tokens_per_expert: list[list[int]]  # [L][E]: tokens whose top-k included the expert
    mean_gate_weight: list[list[float]]  # [L][E]: mean routing weight over the tokens routed to it
    rarely_routed: list[RareExpert]


def _router_outputs(model_path: Path) -> tuple[bytes, list[str], list[int]]:
    """The model with each MoE node's router logits exposed as graph outputs, and each node's top-k."""
    proto = onnx.load(str(model_path), load_external_data=False)
    names, top_k = [], []
    for node in proto.graph.node:
        if node.op_type in ("MoE", "QMoE") and node.domain == "com.microsoft":
            names.append(node.input[1])
            top_k.append(next(attr.i for attr in node.attribute if attr.name == "k"))
            proto.graph.output.append(onnx.ValueInfoProto(name=node.input[1]))  # type inferred: fp32 or fp16
    return proto.SerializeToString(), names, top_k


def _routing_weights(logits: np.ndarray, k: int, renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts [T,k] and their weights [T,k], as the MoE kernel computes them."""
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # [T,E]
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # [T,k]
    weights = np.take_along_axis(probs, chosen, axis=-1)  # [T,k]
    if renormalize:
        weights /= weights.sum(axis=-1, keepdims=True)
    return chosen, weights


def run(checkpoint: Checkpoint, config: CalibrateConfig, out_dir: Path, progress=None, *, export_dir: Path, ids: list[int]) -> CalibrateResult:
    dims = checkpoint.dims
    if dims.num_experts == 0:
        result = CalibrateResult(tokens=0, moe_layers=0, tokens_per_expert=[], mean_gate_weight=[], rarely_routed=[])
        (out_dir / ROUTING_FILE).write_text(result.model_dump_json(indent=1))
        return result
    ids = ids[: config.max_tokens]
    model_bytes, router_names, top_ks = _router_outputs(export_dir / MODEL_FILE)
    options = ort.SessionOptions()
    # The model comes from memory; its weights stay in the export stage's external-data file.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(export_dir))
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    layers, experts = len(router_names), dims.num_experts
    counts = np.zeros((layers, experts), np.int64)
    weight_sums = np.zeros((layers, experts), np.float64)
    total = -(-len(ids) // config.window)
    for done, router_logits in enumerate(run_windows(session, ids, config.window, router_names), start=1):
        for layer, logits in enumerate(router_logits):  # [T,E] per MoE layer
            chosen, weights = _routing_weights(logits.astype(np.float32), top_ks[layer], dims.norm_topk_prob)
            np.add.at(counts[layer], chosen.ravel(), 1)
            np.add.at(weight_sums[layer], chosen.ravel(), weights.ravel())
        if progress:
            progress(done, total)
    mean_gate = np.divide(weight_sums, counts, out=np.zeros_like(weight_sums), where=counts > 0)
    rare = [
        RareExpert(layer=layer, expert=expert, tokens=int(counts[layer, expert]))
        for layer in range(layers)
        for expert in range(experts)
        if counts[layer, expert] < config.min_tokens_per_expert
    ]
    result = CalibrateResult(
        tokens=len(ids),
        moe_layers=layers,
        tokens_per_expert=counts.tolist(),
        mean_gate_weight=np.round(mean_gate, 6).tolist(),
        rarely_routed=rare,
    )
    (out_dir / ROUTING_FILE).write_text(result.model_dump_json(indent=1))
    return result
