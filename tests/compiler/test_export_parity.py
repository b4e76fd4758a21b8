"""Parity: ONNX Runtime logits of the exported models match transformers' own forward pass (fp32, 1e-4).

A model whose products the recipe quantized is held to transformers given the same weights, dequantized
(compiler.reference_weights), through the runtime and through ONNX Runtime at MatMulNBits's accuracy level 0.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

import runtime
from compiler.pipeline import build
from compiler.recipe import load_recipe
from compiler.reference_weights import take_exported_weights
from conftest import REPO, full_precision_decoder, in_full_precision

TOLERANCE = 1e-4


def _reference(folder, exported: onnx.ModelProto | None = None):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if exported is not None:
        take_exported_weights(model, exported)
    return model


def _check_cached_decoding(decoder, folder, vocab, exported=None):
    """Prefill, then several decode steps (one token, then a k+1 block as in verification) through the runtime's KV cache."""
    model = _reference(folder, exported)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=12).tolist()
    cache = decoder.new_cache()
    worst = 0.0
    with torch.no_grad():
        reference = model(torch.tensor([ids]), use_cache=True)
        worst = max(worst, np.abs(cache.feed(ids) - reference.logits[0].numpy()).max())
        past = reference.cache
        for step in ([5], [7], [9, 11, 13, 15], [17]):
            reference = model(torch.tensor([step]), cache=past, use_cache=True)
            past = reference.cache
            worst = max(worst, np.abs(cache.feed(step) - reference.logits[0].numpy()).max())
        # roll back two tokens and feed others: the result must equal a fresh run over the kept prefix
        cache.keep(len(cache) - 2)
        kept = cache.ids + [19, 21]
        fresh = model(torch.tensor([kept])).logits[0, -2:].numpy()
        worst = max(worst, np.abs(cache.feed([19, 21]) - fresh).max())
    assert worst <= TOLERANCE, f"{role}: max abs diff {worst:.2e} > {TOLERANCE}"


def _check_batched_prefill(artifact, role, folder, vocab, exported=None, scratch=None):
    """Two sequences in one call (dynamic batch), against transformers on the same batch."""
    model = _reference(folder, exported)
    path = artifact / role / "model.onnx"
    if exported is not None:  # ONNX Runtime's kernels in full precision, as the runtime's own
        in_full_precision(exported)
        path = scratch / "model.onnx"
        onnx.save(exported, str(path), save_as_external_data=True, location="model.onnx.data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(1, vocab, size=(2, 9))
    feeds = {"input_ids": ids, "seqlens_k": np.full(2, 8, np.int32), "total_sequence_length": np.array(9, np.int32), "query_seqlens": np.full(2, 9, np.int32),
             "logit_positions": np.tile(np.arange(9), (2, 1))[..., None]}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((2, value.shape[1], 0, value.shape[3]), np.float32)
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(logits - expected).max() <= TOLERANCE


@pytest.mark.parametrize("role", ["main", "draft"])
def test_tiny_random_pair_matches_transformers(tiny_artifact, tiny_pair, role):
    generator = runtime.load(tiny_artifact)
    vocab = generator.manifest.models[role].vocab_size
    _check_cached_decoding(getattr(generator, role), tiny_pair / role, vocab)
    _check_batched_prefill(tiny_artifact, role, tiny_pair / role, vocab)


@pytest.mark.parametrize("role", ["main", "draft"])
def test_shipped_pairs_match_transformers(shipped_pair, role, tmp_path):
    """small-coder's INT8 draft against transformers given its dequantized weights, through the runtime's KV cache
    on ONNX Runtime's kernels in full precision: the runtime's own 8-bit products round the activations too, as
    the artifact's accuracy level 4 asks (tests/runtime/test_fused_decoder.py holds them to ONNX Runtime's)."""
    checkpoints, artifact = shipped_pair
    generator = runtime.load(artifact)
    quantized = generator.manifest.models[role].precision != "fp32"
    exported = onnx.load(str(artifact / role / "model.onnx")) if quantized else None
    vocab = generator.manifest.models[role].vocab_size
    decoder = full_precision_decoder(artifact, role, tmp_path / "full") if quantized else getattr(generator, role)
    _check_cached_decoding(decoder, checkpoints / role, vocab, exported)
    _check_batched_prefill(artifact, role, checkpoints / role, vocab, exported, tmp_path)


def test_every_expert_is_in_the_graph(tiny_artifact):
    """The MoE nodes carry all experts' weights whatever the input routes to."""
    import onnx

    proto = onnx.load(str(tiny_artifact / "main" / "model.onnx"), load_external_data=False)
    moe_nodes = [node for node in proto.graph.node if node.op_type == "MoE"]
    shapes = {init.name: list(init.dims) for init in proto.graph.initializer}
    assert len(moe_nodes) == 2
    for node in moe_nodes:  # 8 experts, each split in 2 sub-experts for the CPU kernel's threads (cpu.expert_parts)
        assert shapes[node.input[2]][0] == 16 and shapes[node.input[4]][0] == 16


def test_expert_unrouted_by_calibration_input_is_exported_and_correct(tiny_artifact, tiny_pair):
    """Export does not trace inputs: an expert no calibration-style token reached still computes correctly later."""
    model = _reference(tiny_pair / "main")
    top_k = model.config.num_experts_per_tok

    def routed(ids):  # layer 0's chosen experts for each token
        with torch.no_grad():
            logits = model(torch.tensor([ids]), output_router_logits=True).router_logits[0]
        return set(torch.topk(logits, top_k, dim=-1).indices.flatten().tolist())

    calibration = [5, 17, 33]
    unrouted = set(range(model.config.num_experts)) - routed(calibration)
    assert unrouted, "the calibration input should leave some expert without tokens"
    later = next(
        [token] + calibration for token in range(1, 320) if routed([token] + calibration) & unrouted
    )  # an input whose routing reaches one of them
    cache = runtime.load(tiny_artifact).main.new_cache()
    with torch.no_grad():
        expected = model(torch.tensor([later])).logits[0].numpy()
    assert np.abs(cache.feed(later) - expected).max() <= TOLERANCE


def test_shipped_main_greedy_continuations_match_transformers(shipped_pair):
    from compiler import corpus

    checkpoints, artifact = shipped_pair
    generator = runtime.load(artifact)
    model = _reference(checkpoints / "main")
    for prompt in corpus.heldout_prompts(3):
        ids = generator.encode(prompt)
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        ours = [t for step in generator.stream_ids(ids, max_new_tokens=32, speculative=False, stop_tokens=set()) for t in step]
        assert ours == expected[0, len(ids) :].tolist()


def test_int4_draft_matches_transformers_given_its_weights(tmp_path, shipped_cache):
    """4-bit blocks (GPTQ, packed two to a byte) put back as the 8-bit ones are; ONNX Runtime at accuracy level 0
    (the recipe's level 4 also rounds the activations to 8 bits)."""
    artifact = build(load_recipe(REPO / "recipes" / "tiny-coder-int4-draft.yaml"), tmp_path / "built", cache_root=shipped_cache).artifact
    exported = onnx.load(str(artifact / "draft" / "model.onnx"))
    assert {a.i for node in exported.graph.node if node.op_type == "MatMulNBits" for a in node.attribute if a.name == "bits"} == {4}
    vocab = runtime.load(artifact).manifest.models["draft"].vocab_size
    _check_batched_prefill(artifact, "draft", REPO / "recipes" / "tiny-coder" / "draft", vocab, exported, tmp_path)


def test_weights_that_cannot_be_put_back_are_refused_by_name():
    """Quantized experts (QMoE) are not dense products: the reference would silently keep them float."""
    graph = onnx.helper.make_graph([onnx.helper.make_node("QMoE", ["x"], ["y"], domain="com.microsoft")], "g", [], [])
    with pytest.raises(ValueError, match="QMoE nodes: only MatMulNBits"):
        take_exported_weights(None, onnx.helper.make_model(graph))
