"""The TensorRT lowering computes what the CPU model computes: checked on ONNX Runtime, which runs both graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import runtime
from compiler.onnx_graph import MS_DOMAIN
from compiler.tensorrt_lowering import lower
from onnx_models import EXPERTS, HIDDEN, PRECISIONS, moe_layer, run_moe
from runtime.appended_kv import OrtAppendedDecoder
from runtime.sampling import SamplingParams
from runtime.speculative import FixedDraftLength, GenerationStats, LookupDraft, ModelDraft, decode


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_lowered_experts_compute_the_same_layer(precision, renormalize):
    rng = np.random.default_rng(3)
    x, router = rng.standard_normal((9, HIDDEN), dtype=np.float32), rng.standard_normal((9, EXPERTS), dtype=np.float32)
    expected = run_moe(moe_layer(precision, renormalize), x, router)
    lowered = lower(moe_layer(precision, renormalize), "fp32")
    assert not [node for node in lowered.graph if node.domain == MS_DOMAIN]
    quantized = {value.const_value.dtype for value in lowered.graph.initializers.values()} & {ir.DataType.INT4, ir.DataType.INT8}
    assert quantized == {"fp32": set(), "int4": {ir.DataType.INT4}, "int8": {ir.DataType.INT8}, "mixed": {ir.DataType.INT4, ir.DataType.INT8}}[precision]
    assert np.abs(run_moe(lowered, x, router) - expected).max() <= 1e-5
    assert np.abs(run_moe(lowered, x[:1], router[:1]) - expected[:1]).max() <= 1e-5  # one token, as in decoding


def _lowered(artifact, role: str, precision: str, folder) -> OrtAppendedDecoder:
    entry = runtime.load(artifact).manifest.models[role]
    path = folder / f"{role}-{precision}.onnx"
    ir.save(lower(ir.load(artifact / entry.path), precision), path, external_data=path.name + ".data")
    return OrtAppendedDecoder(path, entry.num_layers, entry.num_kv_heads, entry.head_dim, precision)


def assert_lowering_matches(artifact, role: str, folder) -> None:
    """The role's model lowered for TensorRT (fp32) computes the CPU model's logits through prefill, decode,
    a verify block, a rollback and more tokens on top of it, within 1e-4."""
    cpu = getattr(runtime.load(artifact), role).new_cache(64)
    appended = _lowered(artifact, role, "fp32", folder).new_cache(64)
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, 200, 24)]
    steps = [("feed", tokens[:12]), ("feed", tokens[12:13]), ("feed", tokens[13:17]), ("keep", 15), ("feed", tokens[20:23])]
    for action, argument in steps:
        if action == "keep":
            cpu.keep(argument)
            appended.keep(argument)
            continue
        expected, got = cpu.feed(argument), appended.feed(argument)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4, action
    expected, got = cpu.feed(tokens[20:24], last=2), appended.feed(tokens[20:24], last=2)  # a verify block's k + 1
    assert got.shape == expected.shape == (2, expected.shape[1]) and np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("role", ["main", "draft"])
def test_lowered_decoder_matches_the_cpu_model_through_cache_and_rollback(tiny_artifact, tmp_path, role):
    assert_lowering_matches(tiny_artifact, role, tmp_path)


def test_fp16_lowering_stays_close(tiny_artifact, tmp_path):
    cpu = runtime.load(tiny_artifact).main.new_cache(64)
    appended = _lowered(tiny_artifact, "main", "fp16", tmp_path).new_cache(64)
    tokens = list(np.random.default_rng(1).integers(3, 200, 40))
    expected, got = cpu.feed(tokens), appended.feed(tokens)
    assert got.dtype == np.float32  # logits stay float32
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


def test_speculative_decoding_over_appended_caches_is_lossless(tiny_tensorrt_artifact):
    """The loop the TensorRT backend runs, on the engines' own lowered graphs (fp16): speculation changes no token."""
    manifest = runtime.load(tiny_tensorrt_artifact).manifest
    decoders = {
        role: OrtAppendedDecoder(tiny_tensorrt_artifact / entry.engine.onnx_path, entry.num_layers, entry.num_kv_heads, entry.head_dim, entry.engine.precision)
        for role, entry in manifest.models.items()
    }
    prompt = [5, 17, 42, 9, 77, 3]

    def generate(draft_length: int | None, lookup: bool = False) -> tuple[list[int], GenerationStats]:
        draft = None
        if lookup:
            draft = LookupDraft(manifest.models["main"].vocab_size)
        elif draft_length:
            draft = ModelDraft(decoders["draft"].new_cache(128))
        stats = GenerationStats()
        steps = decode(decoders["main"].new_cache(128), draft, prompt, 40, FixedDraftLength(draft_length or 1), SamplingParams(), set(), stats)
        return [token for step in steps for token in step], stats

    alone, _ = generate(None)
    assert len(alone) == 40
    assert generate(3)[0] == alone
    assert generate(5)[0] == alone
    looked_up, stats = generate(4, lookup=True)
    assert looked_up == alone and stats.proposed > 0
