"""Stage `partition`: a placement plan for the experts from the routing the calibration text produced.

Per MoE layer: the experts' shard (partition) under the recipe's strategy, with each partition's load and
the largest over the mean for both strategies; each expert's tier (hot or cold), which the quantize
stage's per-expert precision rules read. Writes plan.json; the plan is the stage's result in the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from compiler import partitioning
from compiler.checkpoint import Checkpoint
from compiler.stages import calibrate

VERSION = "2"
PLAN_FILE = "plan.json"


class PartitionConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    partitions: int
    strategy: Literal["contiguous", "balanced"]
    hot_share: float | None
    hot_count: int | None
    prune_below_share: float | None = None


class LayerPlan(BaseModel):
    model_config = ConfigDict(frozen=True)
    layer: int
    tokens_per_expert: list[int]
    partition_of_expert: list[int]  # -1: pruned
    partition_loads: list[int]
    imbalance: float  # largest partition load / mean, under the chosen strategy
    imbalance_by_strategy: dict[str, float]
    tiers: list[Literal["hot", "cold"]]
    pruned: list[int] = []  # experts dropped: routed less than prune_below_share of the layer's tokens


class PartitionResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    partitions: int
    strategy: str
    layers: list[LayerPlan]
    max_imbalance: float  # over layers, under the chosen strategy
    max_imbalance_by_strategy: dict[str, float]
    hot_share: float | None
    hot_count: int | None
    prune_below_share: float | None = None
    pruned_experts: int = 0
    files: list[str]


def plan(tokens_per_expert: list[list[int]], tokens: int, config: PartitionConfig) -> PartitionResult:
    """The plan for every MoE layer; `tokens` routed in all (each counted once per selected expert)."""
    layers = []
    for layer, all_loads in enumerate(tokens_per_expert):
        top_k = partitioning.experts_per_token(all_loads, tokens)
        dropped = partitioning.pruned(all_loads, config.prune_below_share, top_k) if config.prune_below_share else []
        kept = [e for e in range(len(all_loads)) if e not in dropped]
        loads = [all_loads[e] for e in kept]
        partitions = min(config.partitions, len(loads))
        assignments = {name: choose(loads, partitions) for name, choose in partitioning.STRATEGIES.items()}
        chosen = assignments[config.strategy]
        placement = [-1] * len(all_loads)
        for expert, part in zip(kept, chosen):
            placement[expert] = part
        layers.append(LayerPlan(
            layer=layer, tokens_per_expert=all_loads, partition_of_expert=placement,
            partition_loads=np.bincount(chosen, weights=loads, minlength=partitions).astype(int).tolist(),
            imbalance=round(partitioning.imbalance(loads, chosen, partitions), 4),
            imbalance_by_strategy={name: round(partitioning.imbalance(loads, a, partitions), 4) for name, a in assignments.items()},
            tiers=partitioning.tiers(all_loads, config.hot_share, config.hot_count), pruned=dropped,
        ))
    worst = {name: max((layer.imbalance_by_strategy[name] for layer in layers), default=1.0) for name in partitioning.STRATEGIES}
    return PartitionResult(
        partitions=config.partitions, strategy=config.strategy, layers=layers, max_imbalance=worst[config.strategy],
        max_imbalance_by_strategy=worst, hot_share=config.hot_share, hot_count=config.hot_count,
        prune_below_share=config.prune_below_share, pruned_experts=sum(len(layer.pruned) for layer in layers),
        files=[PLAN_FILE],
    )


def run(checkpoint: Checkpoint, config: PartitionConfig, out_dir: Path, progress=None, *, calibrate_dir: Path) -> PartitionResult:
    routing = calibrate.read_routing(calibrate_dir)
    result = plan(routing.tokens_per_expert, routing.tokens, config)
    (out_dir / PLAN_FILE).write_text(json.dumps(result.model_dump(), indent=1))
    return result


def read_plan(partition_dir: Path) -> PartitionResult:
    return PartitionResult.model_validate_json((partition_dir / PLAN_FILE).read_text())
