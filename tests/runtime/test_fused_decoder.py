"""moecc.FusedDecoder (runtime/kernels/fused_decoder.c): a decoder's whole graph in one node computes what the
node-by-node kernels do (dense and MoE, with and without per-head query and key norms, a q/k/v bias, a shared
expert, experts cut into parts, a float or an int8 cache; a batch of uneven rows, verify blocks, rollbacks), and
stands aside with its reason from a graph it does not run."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import runtime
from compiler.pipeline import build
from compiler.recipe import load_recipe
from runtime.artifact import read_manifest
from runtime.decoder import BatchKvCache, Decoder, session_options
from runtime.kernels import fused_decoder, session
from runtime.kernels.build import library as kernel_library
from conftest import full_precision_decoder
from kernel_sessions import MARCHES
from tiny_models import VOCAB, save_model, write_recipe

TOLERANCE = 1e-4  # float32 sums in another order
INT8_CACHE_TOLERANCE = 1e-2  # ... and, through them, a cached key or value one level away (3.0e-3 measured)
SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512, eos_token_id=0)


@pytest.fixture(scope="module")
def dense_checkpoints(tmp_path_factory, tokenizer):
    """A Llama main model (no query or key norms, untied head) and a Qwen3 draft (norms, tied head, one KV head)."""
    root = tmp_path_factory.mktemp("dense-pair")
    save_model(LlamaForCausalLM(LlamaConfig(**SIZES, num_key_value_heads=2, intermediate_size=96)), tokenizer, root / "main", seed=5)
    save_model(Qwen3ForCausalLM(Qwen3Config(**SIZES, num_key_value_heads=1, head_dim=16, intermediate_size=64, tie_word_embeddings=True)), tokenizer, root / "draft", seed=6)
    return root


@pytest.fixture(scope="module")
def dense_pair(dense_checkpoints):
    return build(load_recipe(write_recipe(dense_checkpoints, name="dense-pair")), dense_checkpoints / "out").artifact


@pytest.fixture(scope="module")
def int8_draft_pair(dense_checkpoints):
    """The same pair with the draft's weights in 8-bit blocks of 32 (MatMulNBits), the main model's untouched."""
    recipe = write_recipe(dense_checkpoints, name="dense-int8-draft", draft="  quantize:\n    weights: int8\n")
    return build(load_recipe(recipe), dense_checkpoints / "out").artifact


@pytest.fixture(scope="module")
def int4_draft_pair(dense_checkpoints):
    """The same pair with the draft's weights in 4-bit blocks of 32, two levels a byte (MatMulNBits); the gate let
    through, since 4 bits of a random model's weights move its top token often."""
    loose_gate = "  min_top1_agreement: 0.0\n"  # under the recipe's verify block
    recipe = write_recipe(dense_checkpoints, name="dense-int4-draft", extra=loose_gate, draft="  quantize:\n    weights: int4\n")
    return build(load_recipe(recipe), dense_checkpoints / "out").artifact


def _both_ways(artifact):
    """The artifact loaded with moecc.FusedDecoder where it applies, and without it (the node-by-node kernels)."""
    fused = runtime.load(artifact, target="cpu", threads=2)
    with session.node_by_node():
        unfused = runtime.load(artifact, target="cpu", threads=2)
    return fused, unfused


@pytest.fixture(scope="module")
def fused_and_unfused(dense_pair):
    return _both_ways(dense_pair)


# (artifact fixture, role, the nodes left beside the kernel: those making the weights' panels, folded at load)
ONE_NODE_MODELS = {
    "dense Llama": ("dense_pair", "main", {"Reshape", "Transpose"}),
    "dense Qwen3": ("dense_pair", "draft", {"Reshape", "Transpose"}),
    # Query and key norms, no shared expert; the router's columns padded to a panel, fc2 transposed.
    "Qwen3-MoE": ("tiny_artifact", "main", {"Reshape", "Transpose", "Concat"}),
    # A q/k/v bias and a shared expert with its sigmoid gate; each expert cut in 2 parts by the lowering.
    "Qwen2-MoE": ("small_coder_artifact", "main", {"Reshape", "Transpose", "Concat"}),
    # An int8 cache with per-channel scales, as moecc.Attention keeps it.
    "Qwen3-MoE, int8 cache": ("shipped_kv8_artifact", "main", {"Reshape", "Transpose", "Concat"}),
    "dense Qwen3, int8 cache": ("shipped_kv8_artifact", "draft", {"Reshape", "Transpose"}),
}


@pytest.mark.parametrize("model", ONE_NODE_MODELS)
def test_a_decoder_runs_as_one_node_with_the_graphs_results(request, model):
    fixture, role, beside = ONE_NODE_MODELS[model]
    artifact = request.getfixturevalue(fixture)
    fused, unfused = (getattr(generator, role) for generator in _both_ways(artifact))
    assert fused.kernels == ("moecc.FusedDecoder",) and "moecc.FusedDecoder" not in unfused.kernels
    graph = onnx.load(artifact / role / "model.onnx", load_external_data=False)
    session.use_kernels(artifact / role / "model.onnx", graph, fused.entry.head_dim, session_options({}), "auto")
    int8_cache = fused.entry.kv_cache == "int8"
    assert {node.op_type for node in graph.graph.node} == {"FusedDecoderInt8Cache" if int8_cache else "FusedDecoder"} | beside
    # An int8 cache: a key or value that float sums in another order put on the other side of a rounding step
    # lands one level away, which moves the logits more than the sums' order does.
    tolerance = INT8_CACHE_TOLERANCE if int8_cache else TOLERANCE
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, fused.entry.vocab_size, size=n).tolist() for n in (19, 4, 11)]
    ours, theirs = (BatchKvCache(decoder, 3, 64) for decoder in (fused, unfused))
    np.testing.assert_allclose(ours.prefill(prompts), theirs.prefill(prompts), atol=tolerance, rtol=0)
    # Rows of uneven new tokens, one row idle; then a rollback and the same positions fed other tokens.
    for step in ({0: [5, 6, 7], 2: [9]}, {0: [1], 1: [2, 3, 4, 5, 6], 2: [7, 8]}):
        for got, expected in zip(ours.feed(step).values(), theirs.feed(step).values()):
            np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)
    for cache in (ours, theirs):
        cache.keep(1, 5)
    np.testing.assert_allclose(ours.feed({1: [30, 31]})[1], theirs.feed({1: [30, 31]})[1], atol=tolerance, rtol=0)
    single = [fused.new_cache(64), unfused.new_cache(64)]
    logits = [cache.feed(prompts[0], last=1) for cache in single]
    for token in (12, 13, 14):
        logits = [cache.feed([token]) for cache in single]
        np.testing.assert_allclose(*logits, atol=tolerance, rtol=0)
    if int8_cache:  # the kernel stores the levels moecc.Attention stores: now and then one step apart
        filled = len(single[0].ids)
        for layer_cache, reference in zip(single[0].buffers.state.kv.values(), single[1].buffers.state.kv.values()):
            steps = np.abs(layer_cache.numpy()[:, :, :filled].astype(np.int16) - reference.numpy()[:, :, :filled])
            assert steps.max() <= 1 and steps.mean() < 0.01, (steps.max(), steps.mean())


@pytest.mark.parametrize("model", ["dense Qwen3", "Qwen3-MoE", "Qwen2-MoE", "Qwen3-MoE, int8 cache", "dense Qwen3, int8 cache"])
def test_a_call_of_up_to_33_tokens_scores_each_as_its_decode_step(request, model):
    """Bit for bit, as lossless speculation needs of a verify of up to 32 proposals: a small model's calls of up to
    16 tokens on the calling thread and longer ones on the session's threads, a large model's all on its threads."""
    fixture, role, _ = ONE_NODE_MODELS[model]
    decoder = getattr(runtime.load(request.getfixturevalue(fixture), target="cpu", threads=2), role)
    assert decoder.kernels == ("moecc.FusedDecoder",)
    tokens = np.random.default_rng(11).integers(1, decoder.entry.vocab_size, size=40 + 33).tolist()
    cache = decoder.new_cache(128)
    cache.feed(tokens[:40], last=1)
    one_by_one = np.concatenate([cache.feed([token]) for token in tokens[40:]])
    for count in (2, 5, 16, 17, 33):
        cache.keep(40)
        assert np.array_equal(cache.feed(tokens[40 : 40 + count]), one_by_one[:count]), f"{count} tokens in one call"


@pytest.mark.parametrize("model", ["dense Llama", "dense Qwen3", "Qwen3-MoE", "Qwen2-MoE", "Qwen3-MoE, int8 cache"])
def test_a_call_returning_some_positions_gives_the_logits_and_cache_of_one_returning_all(request, model):
    """The last layer runs only the rows whose logits the call returns through its attention (their blocks of
    tokens) and what follows: their logits keep their bits, rows asking for fewer than others (their last position
    repeated) included, and every token's keys and values are cached as by a call returning them all; a prompt's
    blocks on the session's threads, a small model's short call on the calling one, and a step after a cache long
    enough to be read in parts."""
    fixture, role, _ = ONE_NODE_MODELS[model]
    decoder = getattr(runtime.load(request.getfixturevalue(fixture), target="cpu", threads=2), role)
    rng = np.random.default_rng(12)
    long_cache = min(600, decoder.entry.max_sequence_length - 40)  # in parts where the model's key/value heads read 600 rows in parts
    for cached, lengths, last in ((0, [37, 20, 29], [5, 1, 12]), (0, [9], [2]), (long_cache, [20], [1])):
        every, some = (decoder.bind(len(lengths), decoder.entry.max_sequence_length) for _ in range(2))
        if cached:
            prefix = [rng.integers(1, decoder.entry.vocab_size, size=cached).tolist() for _ in lengths]
            for binding in (every, some):
                binding.run(prefix, [0] * len(lengths), [1] * len(lengths))
        prompts = [rng.integers(1, decoder.entry.vocab_size, size=n).tolist() for n in lengths]
        returned, everything = some.run(prompts, [cached] * len(prompts), last), every.run(prompts, [cached] * len(prompts), lengths)
        for row, (length, wanted) in enumerate(zip(lengths, last)):
            assert np.array_equal(returned[row, :wanted], everything[row, length - wanted : length]), f"row {row} of {lengths} after {cached}"
        for layer_cache, reference in zip(some.state.kv.values(), every.state.kv.values()):
            assert np.array_equal(layer_cache.numpy(), reference.numpy())


def test_the_pair_decodes_alike_fused_or_not(fused_and_unfused):
    fused, unfused = fused_and_unfused
    prompt = np.random.default_rng(4).integers(1, VOCAB, size=9).tolist()
    for speculative in (False, True):
        ours = [t for step in fused.stream_ids(prompt, max_new_tokens=32, speculative=speculative, stop_tokens=set()) for t in step]
        assert ours == [t for step in unfused.stream_ids(prompt, max_new_tokens=32, speculative=speculative, stop_tokens=set()) for t in step]


@pytest.mark.parametrize("role", ["main", "draft"])
def test_greedy_proposals_chained_in_one_call_are_those_of_one_call_each(fused_and_unfused, role):
    """The kernel's chain (past MAX_CHAIN too, in two calls) proposes the argmax tokens of calls made one by
    one, and leaves the cache as they do: each proposal but the last cached, the next call's logits alike."""
    fused, unfused = (getattr(generator, role) for generator in fused_and_unfused)
    assert fused.chains_greedily and not unfused.chains_greedily
    prompt = np.random.default_rng(8).integers(1, VOCAB, size=13).tolist()
    ours, theirs = fused.new_cache(128), unfused.new_cache(128)
    for count in (1, 5, fused_decoder.MAX_CHAIN + 7):
        chained, one_by_one = ours.greedy_chain(prompt, count), theirs.greedy_chain(prompt, count)
        assert chained == one_by_one and len(chained) == count and ours.ids == theirs.ids == prompt + chained[:-1]
        np.testing.assert_allclose(ours.feed(chained[-1:]), theirs.feed(chained[-1:]), atol=TOLERANCE, rtol=0)
        for cache in (ours, theirs):
            cache.keep(0)
    with pytest.raises(ValueError, match="exceeds the KV cache capacity"):
        ours.greedy_chain(prompt, 128)
    with pytest.raises(Exception, match="greedy steps run from 0 to max_chain, on a batch of one row"):
        BatchKvCache(fused, 2, 64).buffers.run([[1], [2]], [0, 0], [1, 1], greedy_steps=2)


@pytest.mark.parametrize("role", ["main", "draft"])
def test_a_greedy_verify_reads_the_kernels_argmax_of_each_position(fused_and_unfused, role):
    """Up to MAX_CHAIN positions the kernel writes each one's argmax beside the logits, which a greedy judge reads
    instead of the logits; a longer block's come from its logits."""
    fused = getattr(fused_and_unfused[0], role)
    rng = np.random.default_rng(9)
    prompt = rng.integers(1, VOCAB, size=13).tolist()
    cache = fused.new_cache(128)
    cache.feed(prompt, last=1)
    for count in (1, 9, fused_decoder.MAX_CHAIN, fused_decoder.MAX_CHAIN + 1):
        block = rng.integers(1, VOCAB, size=count).tolist()
        chosen = cache.greedy_tokens(block, last=count)
        written = cache.buffers.chained[0, : min(count, fused_decoder.MAX_CHAIN)].tolist()
        assert cache.ids == prompt + block
        cache.keep(len(prompt))
        assert chosen == cache.feed(block).argmax(axis=-1).tolist()
        if count <= fused_decoder.MAX_CHAIN:
            assert written == chosen
        cache.keep(len(prompt))


# Tokens whose head rows are the largest and the smallest multiple of one vector: the first of each shares its lane
# with the second in passes of 16 and of 8, the third lies in lane 0 of both (a lower lane than the first's), and
# the rest in other lanes and at the vocabulary's end.
TIED_TOP, TIED_BOTTOM = [37, 53, 64, 200, VOCAB - 1], [5, 21, 160, 150, VOCAB - 2]


@pytest.fixture(scope="module")
def tied_head_pair(dense_checkpoints, tmp_path_factory):
    """The dense pair with its main model's head rows made multiples of one vector: each logit is its token's
    multiple times one number, so the top logit always comes tied, at TIED_TOP's tokens where that number is
    positive and at TIED_BOTTOM's where it is negative."""
    root = tmp_path_factory.mktemp("tied-head")
    for role in ("main", "draft"):
        shutil.copytree(dense_checkpoints / role, root / role)
    model = LlamaForCausalLM.from_pretrained(root / "main")
    rng = np.random.default_rng(11)
    multiples = rng.uniform(-2.0, 2.0, VOCAB)
    multiples[TIED_TOP], multiples[TIED_BOTTOM] = 3.0, -3.0
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.from_numpy(np.outer(multiples, rng.normal(0.0, 0.2, SIZES["hidden_size"])).astype(np.float32)))
    model.save_pretrained(root / "main", safe_serialization=True)
    return build(load_recipe(write_recipe(root, name="tied-head")), root / "out").artifact


@pytest.mark.parametrize("march", MARCHES)  # AVX-512's passes of 16, AVX2's of 8, the plain loops' two passes
def test_tied_top_logits_give_the_first_of_their_tokens(tied_head_pair, monkeypatch, march):
    """The kernel's argmax is numpy's where the top logit is tied: the first of the tied tokens, in a greedy
    chain and in a verify's argmax of each position."""
    monkeypatch.setattr(session, "library", lambda: kernel_library(march))
    main = runtime.load(tied_head_pair, target="cpu", threads=2).main
    assert main.chains_greedily
    cache = main.new_cache(128)
    prompt = np.random.default_rng(12).integers(1, VOCAB, size=13).tolist()

    def firsts(logits: np.ndarray) -> list[int]:
        for row in logits:  # the ties are exact, whichever way the sums ran
            assert len({*row[TIED_TOP].tolist()}) == 1 and len({*row[TIED_BOTTOM].tolist()}) == 1
        return [TIED_TOP[0] if row[TIED_TOP[0]] > 0 else TIED_BOTTOM[0] for row in logits]

    chain = cache.greedy_chain(prompt, 6)
    cache.keep(0)
    assert chain == firsts(cache.feed(prompt + chain[:-1])[len(prompt) - 1 :])
    cache.keep(len(prompt))
    block = np.random.default_rng(13).integers(1, VOCAB, size=24).tolist()
    chosen = cache.greedy_tokens(block, last=len(block))
    cache.keep(len(prompt))
    logits = cache.feed(block)
    assert chosen == firsts(logits) == logits.argmax(axis=-1).tolist()
    assert {TIED_TOP[0], TIED_BOTTOM[0]} <= set(chosen + chain)  # both signs met


@pytest.mark.parametrize("march", MARCHES)  # AVX2's byte-pair products, and the plain loops of a machine without them
@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_draft_runs_as_one_node_with_integer_products(request, bits, tmp_path, monkeypatch, march):
    """MatMulNBits's 8-bit blocks of 32 at accuracy level 4 (4-bit ones widened to 8 bits at load) reach the kernel
    relaid in quads, and it computes what that level lets ONNX Runtime compute (each row of activations rounded to
    8 bits per block, integer sums, then both scales): ONNX Runtime's own nodes' logits within float rounding, for
    prompts (two rows a pass) and verify blocks, and the same greedy chains. The full-precision products (level 0)
    differ by far more."""
    pair = request.getfixturevalue(f"int{bits}_draft_pair")
    monkeypatch.setattr(session, "library", lambda: kernel_library(march))
    generator = runtime.load(pair, target="cpu", threads=2)
    fused, manifest = generator.draft, generator.manifest
    assert fused.kernels == ("moecc.FusedDecoder",) and fused.chains_greedily
    graph = onnx.load(pair / "draft" / "model.onnx", load_external_data=False)
    assert {node.op_type for node in graph.graph.node} >= {"MatMulNBits"}
    reference = Decoder(pair, manifest.models["draft"], set(manifest.files), threads=2, kernels="onnxruntime")
    rng = np.random.default_rng(9)
    prompts = [rng.integers(1, VOCAB, size=n).tolist() for n in (19, 4, 11)]
    ours, theirs, full = (BatchKvCache(decoder, 3, 64) for decoder in (fused, reference, full_precision_decoder(pair, "draft", tmp_path)))
    logits = ours.prefill(prompts)
    np.testing.assert_allclose(logits, theirs.prefill(prompts), atol=TOLERANCE, rtol=0)
    assert np.abs(logits - full.prefill(prompts)).max() > 100 * TOLERANCE
    step = {0: [5, 6, 7], 1: [2], 2: [9, 10]}
    for got, expected in zip(ours.feed(step).values(), theirs.feed(step).values()):
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    chained, one_by_one = fused.new_cache(64), reference.new_cache(64)
    assert chained.greedy_chain(prompts[0], 9) == one_by_one.greedy_chain(prompts[0], 9)


def test_8_bit_weights_it_does_not_run_keep_the_node_by_node_kernels(int8_draft_pair):
    """2-bit blocks, 8-bit products in full precision (accuracy level 0), or 8-bit products beside a float one are
    not what the kernel computes: it says so."""
    draft = onnx.load(int8_draft_pair / "draft" / "model.onnx", load_external_data=False)
    assert fused_decoder.why_not(draft, 16) is None
    two_bit = onnx.ModelProto.FromString(draft.SerializeToString())
    products = [node for node in two_bit.graph.node if node.op_type == "MatMulNBits"]
    next(attribute for attribute in products[0].attribute if attribute.name == "bits").i = 2
    assert "not 8- or 4-bit blocks of 32" in fused_decoder.why_not(two_bit, 16)
    float_products = onnx.ModelProto.FromString(draft.SerializeToString())
    products = [node for node in float_products.graph.node if node.op_type == "MatMulNBits"]
    next(attribute for attribute in products[-1].attribute if attribute.name == "accuracy_level").i = 0
    assert "accuracy_level is not 4" in fused_decoder.why_not(float_products, 16)
    mixed = onnx.ModelProto.FromString(draft.SerializeToString())
    head = next(node for node in mixed.graph.node if node.output[0] == "logits")
    inner, columns = (next(attribute.i for attribute in head.attribute if attribute.name == name) for name in ("K", "N"))
    mixed.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((inner, columns), np.float32), "float_head"))
    head.CopyFrom(onnx.helper.make_node("MatMul", [head.input[0], "float_head"], ["logits"], name=head.name))
    assert "some products' weights are 8-bit and some float" in fused_decoder.why_not(mixed, 16)


def test_a_token_outside_the_vocabulary_is_refused_by_name(fused_and_unfused):
    draft = fused_and_unfused[0].draft
    feeds = {"input_ids": np.array([[VOCAB]]), "seqlens_k": np.zeros(1, np.int32), "total_sequence_length": np.array(1, np.int32),
             "query_seqlens": np.ones(1, np.int32), "logit_positions": np.zeros((1, 1, 1), np.int64), "greedy_steps": np.array(0)}  # fmt: skip
    for value in draft.session.get_inputs():
        if value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros((1, draft.entry.num_kv_heads, 8, draft.entry.head_dim), np.float32)
    with pytest.raises(Exception, match="moecc.FusedDecoder: a token id is outside the vocabulary"):
        draft.session.run(None, feeds)


FITS = "an MoE needs experts, expert_parts and k that fit each other"
FLAG = "qk_norm, quantized, qkv_bias and shared_expert are 0 or 1"


@pytest.mark.parametrize("attribute, value, message", [("k", 100, FITS), ("expert_parts", 0, FITS), ("shared_expert", 2, FLAG), ("qk_norm", -1, FLAG)])
def test_an_moe_node_whose_attributes_do_not_fit_is_refused_at_load(tiny_artifact, attribute, value, message):
    """The kernel checks its attributes when the session is made, before any call: k beyond the experts' parts, no
    parts, a flag that is neither 0 nor 1 (which would shift where the kernel reads the router's columns)."""
    path = tiny_artifact / "main" / "model.onnx"
    graph, options = onnx.load(path, load_external_data=False), session_options({})
    assert session.use_kernels(path, graph, 16, options, "moecc") == ("moecc.FusedDecoder",)
    node = next(node for node in graph.graph.node if node.op_type == "FusedDecoder")
    next(entry for entry in node.attribute if entry.name == attribute).i = value
    options.add_session_config_entry(session.EXTERNAL_FOLDER, str(path.parent))
    with pytest.raises(Exception, match=f"moecc.FusedDecoder: {message}"):
        ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_it_stands_aside_from_graphs_it_does_not_run(dense_pair, tiny_artifact):
    """A quantized MoE, an MoE node moecc.MoE does not run, a quantized router, widths matmul.c's panels cannot take,
    an int8 cache without its scales and a graph with a node more each keep the node-by-node kernels, with the reason."""
    moe = onnx.load(tiny_artifact / "main" / "model.onnx", load_external_data=False)
    assert fused_decoder.why_not(moe, 16) is None
    quantized = onnx.ModelProto.FromString(moe.SerializeToString())
    next(node for node in quantized.graph.node if node.op_type == "MoE").op_type = "QMoE"
    assert "not a decoder moecc.FusedDecoder runs: it has QMoE nodes" in fused_decoder.why_not(quantized, 16)
    sparse = onnx.ModelProto.FromString(moe.SerializeToString())
    next(node for node in sparse.graph.node if node.op_type == "MoE").attribute.append(onnx.helper.make_attribute("use_sparse_mixer", 1))
    assert "sets use_sparse_mixer=1" in fused_decoder.why_not(sparse, 16)
    quantized_router = onnx.ModelProto.FromString(moe.SerializeToString())  # a recipe's `classes: {router: int8}`
    router = next(node for node in quantized_router.graph.node if node.op_type == "MatMul" and ".mlp.gate." in node.input[1])
    inner, columns = next(tensor.dims for tensor in quantized_router.graph.initializer if tensor.name == router.input[1])
    blocks, scales = np.full((columns, inner // 32, 32), 128, np.uint8), np.ones(columns * inner // 32, np.float32)
    quantized_router.graph.initializer.extend([onnx.numpy_helper.from_array(blocks, "router.blocks"), onnx.numpy_helper.from_array(scales, "router.scales")])
    router.CopyFrom(onnx.helper.make_node("MatMulNBits", [router.input[0], "router.blocks", "router.scales"], router.output, name=router.name,
                                          domain="com.microsoft", K=inner, N=columns, bits=8, block_size=32, accuracy_level=4))  # fmt: skip
    assert "a quantized router or shared expert's gate" in fused_decoder.why_not(quantized_router, 16)
    narrow = onnx.load(tiny_artifact / "draft" / "model.onnx", load_external_data=False)  # hidden size 48, 3 + 2 heads of 16
    assert "widths not a multiple of 32: hidden size 48, q, k and v 80" in fused_decoder.why_not(narrow, 16)
    draft = onnx.load(dense_pair / "draft" / "model.onnx", load_external_data=False)
    assert fused_decoder.why_not(draft, 16) is None
    extra = onnx.ModelProto.FromString(draft.SerializeToString())
    logits = next(node for node in extra.graph.node if "logits" in node.output)
    logits.output[0] = "raw_logits"
    extra.graph.node.append(onnx.helper.make_node("Tanh", ["raw_logits"], ["logits"]))
    assert "it has Tanh nodes" in fused_decoder.why_not(extra, 16)
    extra.graph.node[-1].op_type = "Sigmoid"  # known op types, one node too many
    assert "comes from Sigmoid, not MatMul" in fused_decoder.why_not(extra, 16)
    int8 = onnx.ModelProto.FromString(draft.SerializeToString())
    for value in int8.graph.input:
        if value.name.startswith("past_key_values"):
            value.type.tensor_type.elem_type = onnx.TensorProto.INT8
    assert "an int8 cache without per-channel scales" in fused_decoder.why_not(int8, 16)


def test_an_int8_cache_it_does_not_run_keeps_the_node_by_node_kernels(shipped_kv8_artifact):
    """Scales of another shape, layers whose caches differ in type and a layer's keys and values in types of their own
    keep the node-by-node kernels, with the reason."""
    entry = read_manifest(shipped_kv8_artifact).models["draft"]
    draft = onnx.load(shipped_kv8_artifact / "draft" / "model.onnx", load_external_data=False)
    assert fused_decoder.why_not(draft, entry.head_dim) is None
    flat = onnx.ModelProto.FromString(draft.SerializeToString())
    scale = next(tensor for tensor in flat.graph.initializer if tensor.name == "model.layers.0.self_attn.key_cache_scale")
    count = int(np.prod(scale.dims))
    del scale.dims[:]
    scale.dims.append(count)  # [KVH * D], not [1, KVH, 1, D]
    assert "model.layers.0.self_attn.key_cache_scale is not a float32 constant of shape" in fused_decoder.why_not(flat, entry.head_dim)
    mixed = onnx.ModelProto.FromString(draft.SerializeToString())
    for value in mixed.graph.input:  # the last layer's cache in float, the others' int8
        if value.name.startswith(f"past_key_values.{entry.num_layers - 1}."):
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    assert "the layers differ in heads, scale, MLP width, query and key norms, biases, experts, caches" in fused_decoder.why_not(mixed, entry.head_dim)
    halves = onnx.ModelProto.FromString(draft.SerializeToString())
    next(value for value in halves.graph.input if value.name == "past_key_values.0.value").type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    assert "its past keys and values differ in type" in fused_decoder.why_not(halves, entry.head_dim)
