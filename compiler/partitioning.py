"""Expert placement from measured routing: shards balanced by load, hot/cold tiers, pruning, and a traffic simulator.

Loads are tokens routed to each expert of each MoE layer ([L][E]), as the calibrate stage counts them.
A shard plan gives each layer's experts to N partitions of equal size (memory per device stays equal);
`contiguous` takes them by index, as TensorRT-LLM and vLLM place experts, `balanced` by measured load.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Strategy = Literal["contiguous", "balanced"]


def experts_per_token(loads: list[int], tokens: int) -> int:
    """k, from one layer's routed counts: every token is counted once for each of its k experts."""
    return round(sum(loads) / max(1, tokens))


def _sizes(experts: int, partitions: int) -> list[int]:
    """Experts per partition: as equal as possible, the larger ones first."""
    return [experts // partitions + (p < experts % partitions) for p in range(partitions)]


def contiguous(loads: list[int], partitions: int) -> list[int]:
    """Partition of each expert by index ranges."""
    return [p for p, size in enumerate(_sizes(len(loads), partitions)) for _ in range(size)]


def balanced(loads: list[int], partitions: int) -> list[int]:
    """Partition of each expert, equal sizes, minimising the largest partition load.

    Longest-processing-time first (heaviest expert to the lightest partition with room), then swaps of two
    experts between the heaviest partition and another while a swap lowers the heavier of the two.
    """
    sizes = _sizes(len(loads), partitions)
    assignment = [0] * len(loads)
    totals, counts = [0] * partitions, [0] * partitions
    for expert in sorted(range(len(loads)), key=lambda e: (-loads[e], e)):
        partition = min((p for p in range(partitions) if counts[p] < sizes[p]), key=lambda p: (totals[p], p))
        assignment[expert] = partition
        totals[partition] += loads[expert]
        counts[partition] += 1
    improved = True
    while improved:
        improved = False
        heaviest = max(range(partitions), key=lambda p: totals[p])
        for a in (e for e in range(len(loads)) if assignment[e] == heaviest):
            for b in (e for e in range(len(loads)) if assignment[e] != heaviest):
                other = assignment[b]
                delta = loads[a] - loads[b]
                if delta > 0 and max(totals[heaviest] - delta, totals[other] + delta) < totals[heaviest]:
                    assignment[a], assignment[b] = other, heaviest
                    totals[heaviest] -= delta
                    totals[other] += delta
                    improved = True
                    break
            if improved:
                break
    return assignment


STRATEGIES = {"contiguous": contiguous, "balanced": balanced}


def imbalance(loads: list[int], assignment: list[int], partitions: int) -> float:
    """Largest partition load over the mean partition load (1.0 is perfect balance)."""
    totals = np.bincount(assignment, weights=loads, minlength=partitions)
    return float(totals.max() / max(totals.mean(), 1e-12))


def tiers(loads: list[int], hot_share: float | None, hot_count: int | None) -> list[str]:
    """hot or cold per expert: a routed share at or above hot_share, or among the hot_count most routed."""
    total = max(1, sum(loads))
    if hot_count is not None:
        hottest = set(sorted(range(len(loads)), key=lambda e: (-loads[e], e))[:hot_count])
        return ["hot" if e in hottest else "cold" for e in range(len(loads))]
    return ["hot" if hot_share is not None and load / total >= hot_share else "cold" for load in loads]


def pruned(loads: list[int], below_share: float, keep_at_least: int) -> list[int]:
    """Experts routed less than below_share of their layer's tokens, least routed first, never leaving fewer than keep_at_least."""
    total = max(1, sum(loads))
    candidates = sorted((e for e, load in enumerate(loads) if load / total < below_share), key=lambda e: (loads[e], e))
    return sorted(candidates[: max(0, len(loads) - keep_at_least)])


def devices_per_token(selected: np.ndarray, assignment: list[int]) -> float:
    """Mean number of distinct partitions a token's selected experts live on; selected [T, k] expert ids.

    Each is one copy of the token's hidden state sent to a device (and one result back): the traffic of
    expert parallelism per token and layer.
    """
    devices = np.asarray(assignment)[selected]  # [T,k]
    distinct = (np.diff(np.sort(devices, axis=1), axis=1) != 0).sum(axis=1) + 1
    return float(distinct.mean())


def zipf_popularity(experts: int, skew: float, seed: int = 0) -> np.ndarray:
    """Synthetic routing shares: expert i of a random order weighs 1/(i+1)^skew (0: uniform)."""
    weights = 1.0 / np.arange(1, experts + 1) ** skew
    return weights[np.random.default_rng(seed).permutation(experts)]


def sample_routing(popularity: np.ndarray, top_k: int, tokens: int, seed: int = 0) -> np.ndarray:
    """Top-k selections [T, k] drawn independently per token, without replacement, in proportion to popularity."""
    rng = np.random.default_rng(seed)
    keys = rng.random((tokens, len(popularity))) ** (1.0 / np.maximum(popularity, 1e-12))  # Efraimidis-Spirakis
    return np.argsort(-keys, axis=1)[:, :top_k]


def simulate(loads: list[list[int]], top_k: int, devices: list[int], tokens: int = 4096) -> list[dict]:
    """Per device count and strategy: load imbalance (worst layer's max/mean) and hidden-state copies per token
    and layer, for tokens routed independently with each layer's measured (or synthetic) shares."""
    rows = []
    selections = [sample_routing(np.asarray(layer, dtype=np.float64), top_k, tokens, seed) for seed, layer in enumerate(loads)]
    for count in devices:
        if count > min(len(layer) for layer in loads):
            continue  # fewer experts than devices: a shard plan without replicas cannot use them all
        for name, choose in STRATEGIES.items():
            plans = [choose(layer, count) for layer in loads]
            rows.append({
                "devices": count, "strategy": name,
                "max_imbalance": round(max(imbalance(layer, plan, count) for layer, plan in zip(loads, plans)), 4),
                "mean_imbalance": round(float(np.mean([imbalance(layer, plan, count) for layer, plan in zip(loads, plans)])), 4),
                "devices_per_token": round(float(np.mean([devices_per_token(chosen, plan) for chosen, plan in zip(selections, plans)])), 4),
            })
    return rows
