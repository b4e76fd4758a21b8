"""Expert placement from measured routing: balanced shards, tiers, and the traffic simulator."""

from __future__ import annotations

import numpy as np
import pytest

from compiler import partitioning
from compiler.stages import partition


def test_balanced_shards_beat_contiguous_and_keep_sizes_equal():
    loads = [10, 9, 1, 1, 1, 1, 8, 9]
    for partitions in (2, 4):
        plan = partitioning.balanced(loads, partitions)
        assert np.bincount(plan, minlength=partitions).tolist() == [len(loads) // partitions] * partitions
        assert partitioning.imbalance(loads, plan, partitions) < partitioning.imbalance(loads, partitioning.contiguous(loads, partitions), partitions)
    assert partitioning.imbalance(loads, partitioning.balanced(loads, 2), 2) == 1.0  # 10+8+1+1 = 9+9+1+1


def test_balanced_shards_on_skewed_routing_stay_near_the_bound():
    rng = np.random.default_rng(0)
    for experts, partitions in ((16, 2), (64, 8), (128, 64)):
        loads = rng.zipf(1.5, experts).clip(max=1000).tolist()
        plan = partitioning.balanced(loads, partitions)
        bound = max(max(loads) / (sum(loads) / partitions), 1.0)  # one partition holds the hottest expert at least
        contiguous = partitioning.imbalance(loads, partitioning.contiguous(loads, partitions), partitions)
        assert partitioning.imbalance(loads, plan, partitions) <= max(bound * 1.05, min(contiguous, 1.25))


def test_tiers_by_share_or_count():
    loads = [50, 30, 15, 5]
    assert partitioning.tiers(loads, 0.15, None) == ["hot", "hot", "hot", "cold"]
    assert partitioning.tiers(loads, None, 1) == ["hot", "cold", "cold", "cold"]
    assert partitioning.tiers(loads, None, None) == ["cold"] * 4


def test_devices_per_token_counts_distinct_partitions():
    selected = np.array([[0, 1], [0, 2], [1, 3]])
    assert partitioning.devices_per_token(selected, [0, 0, 0, 0]) == 1.0
    assert partitioning.devices_per_token(selected, [0, 0, 1, 1]) == pytest.approx((1 + 2 + 2) / 3)


def test_simulator_covers_device_counts_and_strategies():
    loads = [partitioning.zipf_popularity(128, 1.0, seed) * 1000 for seed in range(2)]
    rows = partitioning.simulate([layer.round().astype(int).tolist() for layer in loads], top_k=8, devices=[2, 4, 64, 256], tokens=512)
    assert {(row["devices"], row["strategy"]) for row in rows} == {(n, s) for n in (2, 4, 64) for s in ("contiguous", "balanced")}
    for n in (2, 4, 64):
        by = {row["strategy"]: row for row in rows if row["devices"] == n}
        assert by["balanced"]["max_imbalance"] <= by["contiguous"]["max_imbalance"]
        assert 1.0 <= by["balanced"]["devices_per_token"] <= min(8, n)


def test_shipped_routing_plan(shipped_artifact):
    """On the shipped model's calibration routing, the balanced plan for 2 shards is within 1.10 of perfect and beats contiguous."""
    import runtime

    manifest = runtime.load(shipped_artifact).manifest
    routing = next(r.result for r in manifest.stages if r.model == "main" and r.stage == "calibrate")
    config = partition.PartitionConfig(partitions=2, strategy="balanced", hot_share=None, hot_count=None)
    result = partition.plan(routing["tokens_per_expert"], routing["tokens"], config)
    assert result.max_imbalance <= 1.10
    assert result.max_imbalance_by_strategy["balanced"] < result.max_imbalance_by_strategy["contiguous"]
    for layer in result.layers:
        assert sorted(np.bincount(layer.partition_of_expert).tolist()) == [4, 4]
        assert sum(layer.partition_loads) == sum(layer.tokens_per_expert)


def test_inspect_draws_the_plan_and_plan_sim_reads_measured_routing(shipped_artifact, tmp_path, capsys):
    import json

    from compiler.cli import main as cli

    picture = tmp_path / "routing.png"
    assert cli(["inspect", str(shipped_artifact), "--heatmap", str(picture), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layers = summary["partition"]["main"]["layers"]
    assert len(layers) == 4 and all(len(layer["tiers"]) == 8 for layer in layers)

    assert cli(["plan-sim", str(shipped_artifact), "--devices", "2", "4", "8", "16", "--json"]) == 0
    simulated = json.loads(capsys.readouterr().out)
    assert simulated["top_k"] == 2
    assert {row["devices"] for row in simulated["rows"]} == {2, 4, 8}  # 16 devices for 8 experts: skipped
    two = {row["strategy"]: row for row in simulated["rows"] if row["devices"] == 2}
    assert two["balanced"]["max_imbalance"] < two["contiguous"]["max_imbalance"]


def test_pruning_drops_rare_experts_and_the_gate_decides(tiny_pair, tmp_path):
    from compiler.errors import BuildError
    from compiler.pipeline import build
    from compiler.recipe import load_recipe
    from tiny_models import write_recipe

    import runtime

    loose = "partition:\n  prune_below_share: 0.1\nverify:\n  tokens: 512\n  max_perplexity_increase: 10.0\n  min_top1_agreement: 0.0\n"
    report = build(load_recipe(write_recipe(tiny_pair, "pruned", loose)), tmp_path / "a")
    plan = next(r.result for r in report.manifest.stages if r.model == "main" and r.stage == "partition")
    quantized = next(r.result for r in report.manifest.stages if r.model == "main" and r.stage == "quantize")
    dropped = {(layer["layer"], e) for layer in plan["layers"] for e in layer["pruned"]}
    assert dropped and plan["pruned_experts"] == len(dropped) == len(quantized["pruned"]) and quantized["pruned_bytes"] > 0
    for layer in plan["layers"]:
        shares = np.asarray(layer["tokens_per_expert"]) / sum(layer["tokens_per_expert"])
        assert set(layer["pruned"]) <= set(np.flatnonzero(shares < 0.1))
        assert len(layer["pruned"]) <= 8 - 2  # never fewer experts than a token selects
    generator = runtime.load(report.artifact)
    ids = generator.encode("def main():")
    alone = [t for step in generator.stream_ids(ids, max_new_tokens=16, speculative=False) for t in step]
    assert [t for step in generator.stream_ids(ids, max_new_tokens=16, draft_length=3) for t in step] == alone

    strict = "partition:\n  prune_below_share: 0.2\nverify:\n  tokens: 512\n  max_perplexity_increase: 0.0001\n"
    with pytest.raises(BuildError, match=r"accuracy gate failed: perplexity .* top-1 agreement"):
        build(load_recipe(write_recipe(tiny_pair, "overpruned", strict)), tmp_path / "b")
    assert not (tmp_path / "b" / "overpruned").exists()
