"""GPTQ, per-expert precision from routing, the rare-expert policy and W8A8 static scales."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from tokenizers import Tokenizer

import runtime
from compiler import corpus, quantization
from compiler.checkpoint import Checkpoint
from compiler.errors import BuildError
from compiler.ort_windows import run_windows
from compiler.pipeline import build
from compiler.recipe import load_recipe
from compiler.stages import calibrate, export, partition, quantize, quantize_experts
from compiler.weight_sites import moe_sites
from onnx_models import moe_model as _moe_model, run_moe as _run
from tiny_models import write_recipe

LOOSE_GATE = "verify:\n  tokens: 512\n  max_perplexity_increase: 1.0\n  min_top1_agreement: 0.0\n"


def test_gptq_has_lower_output_error_than_round_to_nearest():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((2, 64, 128)).astype(np.float32) * 0.05  # [E,N,K]
    mixing = rng.standard_normal((128, 128)) * 0.3 + np.eye(128)
    inputs = rng.standard_normal((2, 1000, 128)) @ mixing  # correlated features, as real activations are
    hessian = np.einsum("etk,etj->ekj", inputs, inputs)

    def output_error(levels, scales):
        difference = quantization.dequantize(levels, scales) - weight  # [E,N,K]
        return float(np.einsum("enk,ekj,enj->", difference, hessian, difference))

    rtn, ours = quantization.round_to_nearest(weight, 32, 4), quantization.gptq(weight, hessian, 32, 4)
    assert ours[0].min() >= -8 and ours[0].max() <= 7
    assert output_error(*ours) < 0.7 * output_error(*rtn)


@pytest.mark.parametrize("renormalize", [True, False])
def test_experts_split_by_precision_equal_one_moe_with_their_dequantized_weights(renormalize):
    """Hot experts INT8, cold INT4: two QMoE nodes mixing with the full top-k's weights compute the same layer."""
    rng = np.random.default_rng(1)
    experts, inner, hidden, top_k = 6, 32, 64, 2
    fc1 = rng.standard_normal((experts, 2 * inner, hidden), dtype=np.float32) * 0.1
    fc2 = rng.standard_normal((experts, hidden, inner), dtype=np.float32) * 0.1
    precision = {0: "int8", 3: "int8"}
    choices = [quantize.ExpertChoice(layer=0, expert=e, precision=precision.get(e, "int4"), routed_share=0.0, reason="test") for e in range(experts)]

    dequantized = []
    for weights in (fc1, fc2):
        exact = np.empty_like(weights)
        for e in range(experts):
            bits = 8 if e in precision else 4
            levels, scales = quantization.round_to_nearest(weights[e], weights.shape[-1] if bits == 8 else 32, bits)
            exact[e] = quantization.dequantize(levels, scales)
        dequantized.append(exact)
    x, router = rng.standard_normal((7, hidden), dtype=np.float32), rng.standard_normal((7, experts), dtype=np.float32)
    expected = _run(_moe_model(*dequantized, top_k, renormalize), x, router)

    model = _moe_model(fc1, fc2, top_k, renormalize)
    (site,) = moe_sites(model)
    quantized, _ = quantize_experts.quantize_layer(site, choices, 0, quantize.Quantizer("rtn", {}), 32)
    quantize._lower_moe(model.graph, site, choices, quantized, 32)
    assert [n.op_type for n in model.graph].count("QMoE") == 2
    assert np.abs(_run(model, x, router) - expected).max() <= 1e-5


@pytest.fixture(scope="module")
def three_token_calibration(tiny_pair, tmp_path_factory):
    """Three tokens of text cannot reach all 8 experts with top-2."""
    root = tmp_path_factory.mktemp("rare")
    checkpoint = Checkpoint(tiny_pair / "main")
    (root / "export").mkdir()
    export.run(checkpoint, export.ExportConfig(max_sequence_length=64), root / "export")
    ids = Tokenizer.from_file(str(tiny_pair / "main" / "tokenizer.json")).encode("def f(x): return x").ids
    results = {}
    for policy in ("all_tokens", "routed_only"):
        (root / policy).mkdir()
        config = calibrate.CalibrateConfig(text_sha256="x", max_tokens=3, window=64, min_tokens_per_expert=1, rare_experts=policy)
        results[policy] = calibrate.run(checkpoint, config, root / policy, export_dir=root / "export", ids=ids)
    return checkpoint, root, results


@pytest.mark.parametrize("policy", ["all_tokens", "routed_only"])
def test_unrouted_experts_get_valid_scales_and_the_report_names_them(three_token_calibration, tmp_path, policy):
    checkpoint, root, results = three_token_calibration
    unrouted = {(r.layer, r.expert) for r in results[policy].rarely_routed}
    assert unrouted and all(r.tokens == 0 for r in results[policy].rarely_routed)
    with np.load(root / policy / calibrate.STATISTICS_FILE, allow_pickle=False) as hessians:
        for layer, expert in unrouted:
            moment = hessians[calibrate.statistics_key("fc1", str(layer))][expert]
            assert (np.abs(moment).max() > 0) == (policy == "all_tokens")  # all_tokens: measured on every token

    (tmp_path / "plan").mkdir()
    partition.run(checkpoint, partition.PartitionConfig(partitions=1, strategy="balanced", hot_share=None, hot_count=None), tmp_path / "plan", calibrate_dir=root / policy)
    inputs = {"export_dir": root / "export", "calibrate_dir": root / policy, "partition_dir": tmp_path / "plan"}
    (tmp_path / "experts").mkdir()
    experts = quantize_experts.QuantizeExpertsConfig(partition=0, experts="int4", hot_experts=None, own_precision=None, method="gptq", block_size=16)
    quantize_experts.run(checkpoint, experts, tmp_path / "experts", **inputs)
    config = quantize.QuantizeConfig(weights="int4", method="gptq", block_size=16)
    result = quantize.run(checkpoint, config, tmp_path, **inputs, experts_dirs=[tmp_path / "experts"])
    named = {(c.layer, c.expert) for c in result.experts if "rarely routed (0 tokens)" in c.reason}
    assert named == unrouted
    model = onnx.load(str(tmp_path / "model.onnx"))
    scales = [numpy_helper.to_array(t) for t in model.graph.initializer if ".experts.fc" in t.name and t.name.endswith(".scales")]
    assert scales and all(np.isfinite(s).all() and (s > 0).all() for s in scales)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = next(iter(run_windows(session, list(range(40)), 40, ["logits"])))
    assert np.isfinite(logits).all()


def test_mixed_precision_recipe_records_each_expert_and_decodes_losslessly(tiny_pair, tmp_path):
    extra = "partition:\n  hot_share: 0.13\nquantize:\n  weights: int4\n  method: gptq\n  block_size: 16\n  hot_experts: int8\n" + LOOSE_GATE
    report = build(load_recipe(write_recipe(tiny_pair, "mixed", extra)), tmp_path)
    record = next(r for r in report.manifest.stages if r.stage == "quantize" and r.model == "main")
    routing = next(r for r in report.manifest.stages if r.stage == "calibrate" and r.model == "main").result
    assert report.manifest.models["main"].precision == "int4-gptq-b16-mixed"
    for choice in record.result["experts"]:
        counts = routing["tokens_per_expert"][choice["layer"]]
        share = counts[choice["expert"]] / sum(counts)
        assert choice["precision"] == ("int8" if share >= 0.13 else "int4")
        assert choice["reason"].startswith("hot tier" if share >= 0.13 else "cold tier")
    assert len({c["precision"] for c in record.result["experts"]}) == 2

    generator = runtime.load(report.artifact)
    for prompt in corpus.heldout_prompts(3):
        ids = generator.encode(prompt)
        alone = [t for step in generator.stream_ids(ids, max_new_tokens=24, speculative=False) for t in step]
        assert [t for step in generator.stream_ids(ids, max_new_tokens=24, draft_length=3) for t in step] == alone


def test_w8a8_uses_the_calibrated_static_scales(tiny_pair, tmp_path):
    extra = "quantize:\n  weights: int8\n  method: rtn\n  block_size: 16\n  activations: int8\n  activation_range: entropy\n" + LOOSE_GATE
    report = build(load_recipe(write_recipe(tiny_pair, "w8a8", extra)), tmp_path)
    key = next(r.cache_key for r in report.manifest.stages if r.stage == "calibrate" and r.model == "main")
    ranges = json.loads((tmp_path / ".cache" / "calibrate" / key / calibrate.RANGES_FILE).read_text())
    assert all(r["entropy"] <= r["minmax"] * (1 + 1e-6) and r["percentile"] <= r["minmax"] * (1 + 1e-6) for r in ranges.values())
    model = onnx.load(str(report.artifact / "main" / "model.onnx"))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers
    for node in quantizers:
        assert initializers[node.input[1]] == pytest.approx(ranges[node.input[0]]["entropy"] / 127, rel=1e-6)
    assert runtime.load(report.artifact).generate("def f(", max_new_tokens=8).text


def test_block_size_that_does_not_divide_a_width_is_refused(tiny_pair, tmp_path):
    extra = "quantize:\n  weights: int4\n  block_size: 32\n" + LOOSE_GATE  # the tiny draft's hidden width is 48
    with pytest.raises(BuildError, match="block size 32 does not divide the input width 48"):
        build(load_recipe(write_recipe(tiny_pair, "odd", extra)), tmp_path)
    assert not (tmp_path / "odd").exists()


def test_smoothquant_rescaling_alone_leaves_the_model_unchanged(three_token_calibration, tmp_path):
    """Before rounding, moving scales from activations into weights is exact; only norms feeding nothing but W8A8 weights move."""
    checkpoint, root, _ = three_token_calibration
    model = ir.load(root / "export" / "model.onnx")
    denses = quantize.dense_sites(model)
    choices = [quantize._dense_choice(site, quantize.QuantizeConfig(weights="int8")) for site in denses]
    with np.load(root / "all_tokens" / calibrate.STATISTICS_FILE, allow_pickle=False) as stored:
        statistics = {key: stored[key] for key in stored.files}
    ranges = json.loads((root / "all_tokens" / calibrate.RANGES_FILE).read_text())
    smoothed = quantize._smooth(denses, choices, statistics, ranges, 0.5)
    assert smoothed == ["model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight", "model.norm.weight"]
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data")

    tokens = list(range(1, 41))
    outputs = []
    for path in (root / "export" / "model.onnx", tmp_path / "model.onnx"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(next(iter(run_windows(session, tokens, 40, ["logits"])))[0])
    assert np.abs(outputs[0] - outputs[1]).max() <= 1e-4


def test_smoothquant_build_records_the_smoothed_norms(tiny_pair, tmp_path):
    extra = "quantize:\n  weights: int8\n  block_size: 16\n  activations: int8\n  activation_range: minmax\n  smoothquant: 0.5\n" + LOOSE_GATE
    report = build(load_recipe(write_recipe(tiny_pair, "sq", extra)), tmp_path)
    assert report.manifest.models["draft"].precision == "int8-rtn-b16-a8-minmax-sq0.5"
    smoothed = next(r.result["smoothed"] for r in report.manifest.stages if r.stage == "quantize" and r.model == "draft")
    assert smoothed == ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"]
