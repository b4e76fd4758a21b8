"""Stage `quantize_experts`: one partition's expert weights, quantized; the pipeline runs it once per partition.

Each partition is a stage run of its own, cached apart, so a rebuild that changes one partition's
settings (its precision) requantizes that partition only, and the manifest's stage records show it. An
unpartitioned model is one partition. The config holds only what decides the experts' weights (not the
dense rules), so changing how attention is quantized keeps every partition's experts. The quantize stage
reads the results into its QMoE nodes. Experts are taken by their original ids from the exported model,
with the calibrated second moments of their layer for GPTQ; pruned experts are skipped.
Writes experts.npz: per layer and precision, fc1 and fc2 levels (packed) and scales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from compiler import quantization
from compiler.checkpoint import Checkpoint
from compiler.stages import calibrate, partition
from compiler.stages.export import MODEL_FILE
from compiler.stages.quantize import BITS, EXPERTS_FILE, ExpertChoice, Precision, QuantizeConfig, Quantizer, array_key, planned_expert_choices
from compiler.weight_sites import MoeSite, moe_sites

VERSION = "1"


class QuantizeExpertsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    partition: int
    experts: Precision  # the recipe's rule for experts (classes.experts, else weights)
    hot_experts: Precision | None  # the hot tier's precision
    own_precision: Precision | None  # this partition's own precision (recipe partition.precision), overriding both
    method: Literal["rtn", "gptq"]
    block_size: int

    def as_quantize_config(self) -> QuantizeConfig:
        own = {self.partition: self.own_precision} if self.own_precision else {}
        return QuantizeConfig(weights=self.experts, hot_experts=self.hot_experts, method=self.method, block_size=self.block_size, partition_precision=own)


class ExpertGroup(BaseModel):
    model_config = ConfigDict(frozen=True)
    layer: int
    precision: str
    experts: list[int]  # original ids, in the order of the arrays' first axis


class QuantizeExpertsResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    partition: int
    groups: list[ExpertGroup]
    bytes: int  # of the quantized weights and scales


def quantize_layer(site: MoeSite, choices: list[ExpertChoice], partition: int, quantize: Quantizer, block_size: int) -> tuple[dict[str, np.ndarray], list[ExpertGroup]]:
    """One layer's quantized experts of one partition, per precision (choices: theirs, by original id; fp32 ones are skipped)."""
    arrays, groups = {}, []
    for precision in sorted({c.precision for c in choices if c.precision != "fp32"}):
        originals = [c.expert for c in choices if c.precision == precision]
        bits = BITS[precision]
        for weight, kind in ((site.fc1, "fc1"), (site.fc2, "fc2")):
            stored = weight.const_value.numpy()[originals]  # [E',N,K]
            levels, scales = quantize(
                stored.astype(np.float32), bits, block_size if bits == 4 else stored.shape[-1], calibrate.statistics_key(kind, str(site.layer)), originals
            )
            if bits == 8:
                scales = scales[..., 0]  # one scale per row: [E',N]
            arrays[array_key(partition, site.layer, precision, kind)] = quantization.pack(levels, bits)
            arrays[array_key(partition, site.layer, precision, f"{kind}.scales")] = scales.astype(stored.dtype)
        groups.append(ExpertGroup(layer=site.layer, precision=precision, experts=originals))
    return arrays, groups


def run(
    checkpoint: Checkpoint, config: QuantizeExpertsConfig, out_dir: Path, progress=None, *, export_dir: Path, calibrate_dir: Path, partition_dir: Path
) -> QuantizeExpertsResult:
    plan = partition.read_plan(partition_dir)
    routing = calibrate.read_routing(calibrate_dir)
    experts, _ = planned_expert_choices(routing, plan, config.as_quantize_config())
    mine = [c for c in experts if c.precision != "fp32" and max(0, plan.layers[c.layer].partition_of_expert[c.expert]) == config.partition]
    arrays: dict[str, np.ndarray] = {}
    groups = []
    if mine:
        statistics = calibrate.read_statistics(calibrate_dir, calibrate.EXPERT_KINDS) if config.method == "gptq" else {}
        quantize = Quantizer(config.method, statistics)
        sites = {site.layer: site for site in moe_sites(ir.load(export_dir / MODEL_FILE))}
        layers = sorted({c.layer for c in mine})
        for done, layer in enumerate(layers, 1):
            layer_arrays, layer_groups = quantize_layer(sites[layer], [c for c in mine if c.layer == layer], config.partition, quantize, config.block_size)
            arrays |= layer_arrays
            groups += layer_groups
            if progress:
                progress(done, len(layers))
    np.savez(out_dir / EXPERTS_FILE, **arrays)
    return QuantizeExpertsResult(partition=config.partition, groups=groups, bytes=sum(a.nbytes for a in arrays.values()))
