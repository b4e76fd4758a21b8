"""Stage `calibrate`: run calibration text through the exported model and measure what quantization needs.

Measured with ONNX Runtime on the export stage's model, one pass over the text:
- routing per MoE layer and expert: tokens routed, mean gate weight; experts routed fewer tokens than the
  recipe's threshold are reported, and the rare-expert policy says what their statistics come from;
- second moments (x^T x, GPTQ's Hessian) of the input of every dense weight, of each expert's fc1 input
  (the tokens routed to it) and of its fc2 input (its SwiGLU output on those tokens); the largest
  magnitude per channel of every dense weight's input (for SmoothQuant);
- activation ranges of every dense weight's input, as min-max, percentile and entropy thresholds
  (onnxruntime's histogram collector), for static INT8 activation scales;
- the largest magnitude per layer, KV head and channel of the keys and values the model caches (keys
  after the rotary embedding, per rotated pair of channels: see kv_ranges), for an INT8 KV cache.

Legend: T tokens of one window, E experts, L MoE layers, H hidden size, I expert width.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict

from compiler.checkpoint import Checkpoint
from compiler.onnx_graph import IoNames
from compiler.ort_windows import run_windows
from compiler.stages.export import MODEL_FILE
from compiler.weight_sites import MoeSite, dense_sites, moe_sites

VERSION = "4"
ROUTING_FILE = "routing.json"
STATISTICS_FILE = "statistics.npz"  # plain arrays, read back with allow_pickle=False
RANGES_FILE = "activation_ranges.json"
RarePolicy = Literal["all_tokens", "routed_only"]


class CalibrateConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    text_sha256: str  # identity of the calibration text (the text itself comes with the stage inputs)
    max_tokens: int
    window: int  # tokens per forward pass, at most the exported maximum sequence length
    min_tokens_per_expert: int  # experts routed fewer tokens than this are rarely routed
    rare_experts: RarePolicy = "all_tokens"  # all_tokens: their statistics come from every token of the layer


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
    rare_expert_policy: str
    measured_inputs: int  # dense weight inputs with second moments and ranges


def statistics_key(kind: str, name: str) -> str:
    """Key in STATISTICS_FILE. Second moments: ('dense', input tensor name) or ('fc1' | 'fc2', MoE layer
    ordinal); per-channel largest magnitude of a dense weight's input: ('absmax', input tensor name); of the
    cached keys and values [KV heads, D]: ('kv_key' | 'kv_value', layer)."""
    return f"{kind}:{name}"


def kv_ranges(present_key: np.ndarray, present_value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest magnitudes [KV heads, D] of one window's cached keys and values [1, KV heads, T, D].

    A key's channels i and i + D/2 are the pair the rotary embedding turns (by an angle that grows with the
    position), so each gets the pair's largest norm: a bound at every position, not only at those calibrated."""
    half = present_key.shape[-1] // 2
    pair_norm = np.sqrt(present_key[..., :half].astype(np.float32) ** 2 + present_key[..., half:].astype(np.float32) ** 2).max(axis=(0, 2))  # [KV heads, D/2]
    return np.concatenate([pair_norm, pair_norm], axis=-1), np.abs(present_value.astype(np.float32)).max(axis=(0, 2))


def _routing_weights(logits: np.ndarray, k: int, renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts [T,k] and their weights [T,k], as the MoE kernel computes them."""
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # [T,E]
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # [T,k]
    weights = np.take_along_axis(probs, chosen, axis=-1)  # [T,k]
    if renormalize:
        weights /= weights.sum(axis=-1, keepdims=True)
    return chosen, weights


def swiglu(tokens: np.ndarray, fc1: np.ndarray) -> np.ndarray:
    """An expert's fc2 input: tokens [T,H] through fc1 [2I,H] with gate and up rows interleaved -> [T,I]."""
    projected = tokens @ fc1.T  # [T,2I]
    gate, up = projected[:, 0::2], projected[:, 1::2]
    return gate / (1 + np.exp(-gate)) * up


class _ExpertMoments:
    """Per MoE layer: second moments of each expert's fc1 and fc2 inputs, over the tokens routed to it."""

    def __init__(self, site: MoeSite):
        experts, inner2, hidden = site.fc1.shape.numpy()
        self.fc1_weight = site.fc1.const_value.numpy().astype(np.float32)  # [E,2I,H]
        self.fc1 = np.zeros((experts, hidden, hidden))
        self.fc2 = np.zeros((experts, inner2 // 2, inner2 // 2))

    def add(self, tokens: np.ndarray, chosen: np.ndarray) -> None:
        tokens = tokens.astype(np.float64)
        for expert in np.unique(chosen):
            routed = tokens[(chosen == expert).any(axis=-1)]
            inner = swiglu(routed, self.fc1_weight[expert])
            self.fc1[expert] += routed.T @ routed
            self.fc2[expert] += inner.T @ inner

    def add_all_tokens_fc2(self, expert: int, tokens: np.ndarray) -> None:
        inner = swiglu(tokens.astype(np.float64), self.fc1_weight[expert])
        self.fc2[expert] += inner.T @ inner


def _session_with_outputs(export_dir: Path, names: list[str]) -> ort.InferenceSession:
    """The exported model with `names` exposed as graph outputs, its weights read from the export folder."""
    proto = onnx.load(str(export_dir / MODEL_FILE), load_external_data=False)
    for name in names:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))  # type inferred: fp32 or fp16
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(export_dir))
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


class _Ranges:
    """Symmetric |x| thresholds per tensor by min-max, percentile and entropy, gathered window by window."""

    def __init__(self):
        from onnxruntime.quantization.calibrate import HistogramCollector

        self.largest: dict[str, float] = {}
        # Entropy's threshold search is quadratic in bins in onnxruntime's Python: 512 bins keep it to seconds.
        self.collectors = {
            method: HistogramCollector(method=method, symmetric=True, num_bins=bins, num_quantized_bins=128, percentile=99.999, scenario="same")
            for method, bins in (("percentile", 2048), ("entropy", 512))
        }

    def add(self, name: str, values: np.ndarray) -> None:
        self.largest[name] = max(self.largest.get(name, 0.0), float(np.abs(values).max()))
        with contextlib.redirect_stdout(io.StringIO()):  # the collectors print progress; stdout may carry --json
            for collector in self.collectors.values():
                collector.collect({name: values.reshape(-1)})

    def thresholds(self) -> dict[str, dict[str, float]]:
        ranges = {name: {"minmax": value} for name, value in self.largest.items()}
        with contextlib.redirect_stdout(io.StringIO()):
            for method, collector in self.collectors.items():
                for name, bounds in (collector.compute_collection_result() if self.largest else {}).items():
                    ranges[name][method] = max(abs(float(bounds[0])), abs(float(bounds[1])))
        return ranges


def run(checkpoint: Checkpoint, config: CalibrateConfig, out_dir: Path, progress=None, *, export_dir: Path, ids: list[int]) -> CalibrateResult:
    dims = checkpoint.dims
    ids = ids[: config.max_tokens]
    model = ir.load(export_dir / MODEL_FILE)
    moes = moe_sites(model)
    # Every dense weight's input, and each MoE block's tokens (in this export also its router's input).
    inputs = sorted({site.input.name for site in dense_sites(model)} | {site.tokens.name for site in moes})
    presents = [(IoNames.present(layer, "key"), IoNames.present(layer, "value")) for layer in range(dims.num_layers)]
    taps = inputs + [site.router_logits.name for site in moes]
    session = _session_with_outputs(export_dir, taps)
    read = taps + [name for pair in presents for name in pair]  # the presents are graph outputs already

    experts = dims.num_experts
    counts = np.zeros((len(moes), experts), np.int64)
    weight_sums = np.zeros((len(moes), experts), np.float64)
    moments = {name: 0.0 for name in inputs}
    channel_max = {name: 0.0 for name in inputs}
    expert_moments = [_ExpertMoments(site) for site in moes]
    ranges = _Ranges()
    cached_ranges = {names: (0.0, 0.0) for names in presents}  # the largest |key|, |value| [KV heads, D] per layer
    windows = []  # MoE layer inputs, kept for the rare-expert policy's second pass
    total = -(-len(ids) // config.window)
    for done, outputs in enumerate(run_windows(session, ids, config.window, read), start=1):
        values = dict(zip(read, outputs))
        for names, (key_range, value_range) in cached_ranges.items():
            window_key, window_value = kv_ranges(values[names[0]], values[names[1]])
            cached_ranges[names] = np.maximum(key_range, window_key), np.maximum(value_range, window_value)
        for name in inputs:
            flat = values[name].reshape(-1, values[name].shape[-1]).astype(np.float32)  # [T,K]
            moments[name] = moments[name] + flat.T.astype(np.float64) @ flat
            channel_max[name] = np.maximum(channel_max[name], np.abs(flat).max(axis=0))
            ranges.add(name, flat)
        if config.rare_experts == "all_tokens":
            windows.append([values[site.tokens.name] for site in moes])
        for layer, site in enumerate(moes):
            logits = values[site.router_logits.name].astype(np.float32)  # [T,E]
            chosen, weights = _routing_weights(logits, dims.experts_per_token, dims.norm_topk_prob)
            np.add.at(counts[layer], chosen.ravel(), 1)
            np.add.at(weight_sums[layer], chosen.ravel(), weights.ravel())
            expert_moments[layer].add(values[site.tokens.name], chosen)
        if progress:
            progress(done, total)

    rare = [
        RareExpert(layer=layer, expert=expert, tokens=int(counts[layer, expert]))
        for layer in range(len(moes))
        for expert in range(experts)
        if counts[layer, expert] < config.min_tokens_per_expert
    ]
    if config.rare_experts == "all_tokens":  # too few routed tokens to measure from: use every token of the layer
        for expert in rare:
            layer = expert_moments[expert.layer]
            layer.fc1[expert.expert] = moments[moes[expert.layer].tokens.name]
            layer.fc2[expert.expert] = 0
            for layer_inputs in windows:
                layer.add_all_tokens_fc2(expert.expert, layer_inputs[expert.layer])

    statistics = {statistics_key("dense", name): moment for name, moment in moments.items()}
    statistics |= {statistics_key("absmax", name): largest for name, largest in channel_max.items()}
    for layer, moments in enumerate(expert_moments):
        statistics[statistics_key("fc1", str(layer))] = moments.fc1
        statistics[statistics_key("fc2", str(layer))] = moments.fc2
    for layer, (key_range, value_range) in enumerate(cached_ranges.values()):
        statistics[statistics_key("kv_key", str(layer))] = key_range
        statistics[statistics_key("kv_value", str(layer))] = value_range
    np.savez(out_dir / STATISTICS_FILE, **{key: np.asarray(value, np.float32) for key, value in statistics.items()})
    (out_dir / RANGES_FILE).write_text(json.dumps(ranges.thresholds(), indent=1, sort_keys=True))

    mean_gate = np.divide(weight_sums, counts, out=np.zeros_like(weight_sums), where=counts > 0)
    result = CalibrateResult(
        tokens=len(ids),
        moe_layers=len(moes),
        tokens_per_expert=counts.tolist(),
        mean_gate_weight=np.round(mean_gate, 6).tolist(),
        rarely_routed=rare,
        rare_expert_policy=config.rare_experts,
        measured_inputs=len(inputs),
    )
    (out_dir / ROUTING_FILE).write_text(result.model_dump_json(indent=1))
    return result


def read_routing(calibrate_dir: Path) -> CalibrateResult:
    return CalibrateResult.model_validate_json((calibrate_dir / ROUTING_FILE).read_text())


EXPERT_KINDS = ("fc1", "fc2")  # the experts' second moments; dense and absmax belong to dense weights, kv_key and kv_value to the cache


def read_statistics(calibrate_dir: Path, kinds: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The statistics of the given kinds (see statistics_key), read as plain arrays."""
    with np.load(calibrate_dir / STATISTICS_FILE, allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files if key.split(":", 1)[0] in kinds}
