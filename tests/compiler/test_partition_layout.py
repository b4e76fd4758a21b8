"""A partitioned artifact: each partition's experts in nodes and files of their own, computing what the whole model computes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import runtime
from compiler import cli
from compiler.pipeline import build
from compiler.recipe import load_recipe
from runtime.decoder import BatchKvCache
from runtime.kernels import session
from tiny_models import write_recipe

LOOSE_GATE = "verify:\n  tokens: 512\n  max_perplexity_increase: 10.0\n  min_top1_agreement: 0.0\n"
INT4 = "quantize:\n  weights: int4\n  block_size: 16\n"


@pytest.fixture(scope="module")
def build_tiny(tiny_pair, tmp_path_factory):
    output, cache = tmp_path_factory.mktemp("partitioned"), tmp_path_factory.mktemp("partitioned-cache")

    def build_with(name: str, extra: str):
        return runtime.load(build(load_recipe(write_recipe(tiny_pair, name, LOOSE_GATE + extra)), output, cache_root=cache).artifact)

    return build_with


@pytest.fixture(scope="module")
def build_both(build_tiny):
    """A build loaded twice: with all partitions in one session, and expert-parallel (one worker per partition)."""

    def build_with(name: str, extra: str):
        single = build_tiny(name, extra)
        return single, runtime.load(single.path, target="cpu", placement="expert-parallel")

    return build_with


def _logits(generator, tokens):
    cache = generator.main.new_cache(64)
    return np.concatenate([cache.feed(tokens[:20]), cache.feed(tokens[20:21]), cache.feed(tokens[21:25])])


QUANTIZE = {"fp32": "", "int4": INT4, "kv8": "quantize:\n  kv_cache: int8\n"}  # kv8: fp32 weights, an INT8 KV cache


@pytest.mark.parametrize(
    "weights, partitions, strategy",
    [(w, p, s) for w in ("fp32", "int4") for p, s in [(2, "contiguous"), (2, "balanced"), (4, "contiguous"), (4, "balanced")]] + [("kv8", 2, "balanced")],
)
def test_partitioned_artifact_computes_the_whole_model(build_tiny, build_both, weights, partitions, strategy):
    """Run as one model and expert-parallel, a partitioned artifact gives the unpartitioned one's logits and greedy output."""
    quantize = QUANTIZE[weights]
    with session.node_by_node():  # as a partitioned model runs: the comparison is of the partitioning alone
        whole = build_tiny(f"whole-{weights}", quantize)
    assert "moecc.FusedDecoder" not in whole.main.kernels
    single, parallel = build_both(f"parted-{weights}-{partitions}-{strategy}", quantize + f"partition:\n  partitions: {partitions}\n  strategy: {strategy}\n")
    files = single.manifest.files
    for partition in range(partitions):
        assert files[f"main/model.experts.p{partition}.data"].size > 0
    assert not [name for name in files if name.startswith("draft/model.experts")]  # the dense draft has no experts to place
    assert {part for (part, _) in parallel.main.experts} == set(range(partitions))
    experts_kernel = "moecc.QMoE" if weights == "int4" else "moecc.MoE"  # partitioned INT4 layers mix by router weights
    assert parallel.main.kernels == single.main.kernels == ("moecc.Attention", experts_kernel), "the segments and workers run moecc's kernels too"
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, 200, 25)]
    reference = _logits(whole, tokens)
    # Partitions sum the experts in another order, which moves the hidden states by float rounding; an int8 cache's
    # scores round each query to 16 bits (runtime/kernels/attention.c), where such a move can shift a level.
    tolerance = 1e-4 if weights == "kv8" else 1e-5
    for parted in (single, parallel):
        assert np.abs(_logits(parted, tokens) - reference).max() <= tolerance
    prompt = tokens[:8]
    greedy = [t for step in whole.stream_ids(prompt, max_new_tokens=24, speculative=False, stop_tokens=set()) for t in step]
    for parted in (single, parallel):
        assert [t for step in parted.stream_ids(prompt, max_new_tokens=24, speculative=False, stop_tokens=set()) for t in step] == greedy
        assert [t for step in parted.stream_ids(prompt, max_new_tokens=24, draft_length=3, stop_tokens=set()) for t in step] == greedy


def test_expert_parallel_batches_and_sends_each_partition_only_its_tokens(build_both, tiny_pair):
    single, parallel = build_both("parted-fp32-4-balanced", "partition:\n  partitions: 4\n  strategy: balanced\n")
    prompts = [[5, 17, 42, 9, 77, 3], [11, 12], [100, 3, 8, 9, 23, 41, 7, 66, 90]]
    rows = [parted.generate_batch_ids(prompts, max_new_tokens=12, stop_tokens=set(), draft_length=2)[0] for parted in (single, parallel)]
    assert rows[0] == rows[1]
    parallel.main.rows_sent.clear()
    parallel.main.new_cache(32).feed(prompts[2])
    top_k = json.loads((tiny_pair / "main" / "config.json").read_text())["num_experts_per_tok"]
    for position in range(len(parallel.main.layers)):
        sent = [parallel.main.rows_sent[part, position] for part in range(4)]
        # each token goes to the partitions holding its top-k experts: at least one, at most k of them
        assert len(prompts[2]) <= sum(sent) <= top_k * len(prompts[2]) and max(sent) <= len(prompts[2])
    # a padded batch call (rows of 2, 9 and no new tokens) sends its 11 tokens and none of its padding
    parallel.main.rows_sent.clear()
    parallel.main.tokens_seen.clear()
    batch = BatchKvCache(parallel.main, 3, 32)
    batch.prefill(prompts)
    logits = batch.feed({0: [4, 5], 1: [6, 7, 8, 9, 10, 11, 12, 13, 14]}, last={0: 2, 1: 1})
    for row, history in ((0, prompts[0] + [4, 5]), (1, prompts[1] + [6, 7, 8, 9, 10, 11, 12, 13, 14])):
        alone = single.main.new_cache(32).feed(history)
        assert np.abs(logits[row] - alone[-len(logits[row]) :]).max() <= 1e-4 and len(logits[row]) == 2 - row
    real = sum(map(len, prompts)) + 11
    for position in range(len(parallel.main.layers)):
        assert parallel.main.tokens_seen[position] == real
        assert real <= sum(parallel.main.rows_sent[part, position] for part in range(4)) <= top_k * real


def test_changing_one_partitions_precision_rewrites_only_its_file(build_tiny, capsys):
    rule = "partition:\n  partitions: 2\n  strategy: contiguous\n  precision: [{}, {}]\n"
    both_int4 = build_tiny("parted-int4-int4", INT4 + rule.format("int4", "int4"))
    second_int8 = build_tiny("parted-int4-int8", INT4 + rule.format("int4", "int8"))
    before, after = both_int4.manifest.files, second_int8.manifest.files
    # Only partition 1's experts were quantized again: partition 0's run came from the stage cache.
    runs = {r.config["partition"]: r for r in second_int8.manifest.stages if r.model == "main" and r.stage == "quantize_experts"}
    assert (runs[0].cached, runs[1].cached) == (True, False)
    assert [g["precision"] for g in runs[1].result["groups"]] == ["int8"] * len(runs[1].result["groups"]) and runs[1].result["groups"]
    assert after["main/model.experts.p0.data"] == before["main/model.experts.p0.data"]  # same digest and size
    assert after["main/model.experts.p1.data"].size > before["main/model.experts.p1.data"].size  # INT8 now
    assert second_int8.manifest.models["main"].precision == "int4-rtn-b16-mixed"
    assert cli.main(["inspect", str(second_int8.path), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["partition"]["main"]["files"]
    assert [(f["file"], f["precision"], f["bytes"]) for f in files] == [
        ("main/model.experts.p0.data", ["int4"], after["main/model.experts.p0.data"].size), ("main/model.experts.p1.data", ["int8"], after["main/model.experts.p1.data"].size)
    ]
    experts = next(r.result["experts"] for r in second_int8.manifest.stages if r.model == "main" and r.stage == "quantize")
    plan = next(r.result for r in second_int8.manifest.stages if r.model == "main" and r.stage == "partition")
    for choice in experts:
        part = plan["layers"][choice["layer"]]["partition_of_expert"][choice["expert"]]
        assert (choice["precision"], choice["reason"]) == (["int4", "int8"][part], f"partition {part} rule")
    prompt = [5, 17, 42, 9, 77, 3]
    alone = [t for step in second_int8.stream_ids(prompt, max_new_tokens=24, speculative=False, stop_tokens=set()) for t in step]
    assert [t for step in second_int8.stream_ids(prompt, max_new_tokens=24, draft_length=3, stop_tokens=set()) for t in step] == alone


def test_a_precision_per_partition_must_match_the_partitions(tiny_pair):
    from compiler.errors import RecipeError

    recipe = write_recipe(tiny_pair, "bad-precision", "partition:\n  partitions: 2\n  precision: [int4]\n")
    with pytest.raises(RecipeError, match=r"bad-precision\.yaml:\d+: field 'partition': .*precision lists 1 partitions; partitions is 2"):
        load_recipe(recipe)


def test_expert_parallel_placement_needs_partitioned_experts_on_the_cpu(build_tiny):
    whole = build_tiny("whole-fp32", "")
    with pytest.raises(runtime.ArtifactError, match="experts are not partitioned") as refused:
        runtime.load(whole.path, placement="expert-parallel")
    assert "partition.partitions > 1" in refused.value.hint
    with pytest.raises(runtime.MoeccError, match="expert-parallel placement runs on the cpu target"):
        runtime.load(whole.path, target="tensorrt", placement="expert-parallel")
    with pytest.raises(runtime.MoeccError, match="unknown placement 'spread'; available: single, expert-parallel"):
        runtime.load(whole.path, placement="spread")


def test_expert_parallel_generator_serves_several_threads(build_both):
    from concurrent.futures import ThreadPoolExecutor

    _, parallel = build_both("parted-fp32-2-balanced", "partition:\n  partitions: 2\n  strategy: balanced\n")
    prompts = [[5, 17, 42, 9], [11, 12, 13], [100, 3, 8, 9, 23], [7, 7, 7], [60, 61], [3, 1, 4, 1, 5]]

    def generate(prompt):
        return [t for step in parallel.stream_ids(prompt, max_new_tokens=16, draft_length=3, stop_tokens=set()) for t in step]

    alone = [generate(prompt) for prompt in prompts]
    with ThreadPoolExecutor(max_workers=3) as pool:
        assert list(pool.map(generate, prompts)) == alone


def test_a_tampered_partition_file_is_refused_in_either_placement(build_tiny, tmp_path):
    import shutil

    original = build_tiny("parted-fp32-2-balanced", "partition:\n  partitions: 2\n  strategy: balanced\n")
    artifact = tmp_path / "copy"
    shutil.copytree(original.path, artifact)
    data = artifact / "main" / "model.experts.p1.data"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x01
    data.write_bytes(bytes(content))
    for placement in runtime.PLACEMENTS:
        with pytest.raises(runtime.ArtifactError, match=r"model\.experts\.p1\.data: sha256 does not match"):
            runtime.load(artifact, target="cpu", placement=placement)


def test_a_cut_that_does_not_enclose_the_experts_is_refused(build_tiny, tmp_path):
    import shutil

    original = build_tiny("parted-fp32-2-balanced", "partition:\n  partitions: 2\n  strategy: balanced\n")
    artifact = tmp_path / "copy"
    shutil.copytree(original.path, artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    layers = manifest["models"]["main"]["expert_layers"]
    layers[0]["output"] = layers[1]["tokens"]  # "the experts of layer 0" would then include layer 1's attention
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(runtime.ArtifactError, match="expert-parallel cut: the experts of layer 0 read the model input"):
        runtime.load(artifact, placement="expert-parallel")
