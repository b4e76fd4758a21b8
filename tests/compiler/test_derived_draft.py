"""Drafts derived from the main model itself: its first layers with its final norm and head, or all of it
routed to fewer experts with its own (coarser) quantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import runtime
from compiler import corpus
from compiler.checkpoint import Checkpoint
from compiler.errors import CheckpointError
from compiler.pipeline import build
from compiler.recipe import load_recipe


def test_first_layers_of_the_main_model_make_a_lossless_draft(tiny_pair, tmp_path):
    recipe = tiny_pair / "derived.yaml"
    recipe.write_text(
        "name: derived\nmain:\n  checkpoint: main\ndraft:\n  checkpoint: main\n  layers: 1\n"
        "export:\n  max_sequence_length: 256\ncalibrate:\n  max_tokens: 512\nverify:\n  tokens: 256\n"
    )
    report = build(load_recipe(recipe), tmp_path)
    entry = report.manifest.models["draft"]
    assert (entry.architecture, entry.num_layers) == ("qwen3_moe", 1)
    assert report.manifest.inputs["draft"]["first_layers"] == "1"
    assert report.manifest.inputs["draft"]["config.json"] == report.manifest.inputs["main"]["config.json"]

    # The derived draft is exactly transformers' model cut after one layer.
    config = AutoConfig.from_pretrained(tiny_pair / "main", num_hidden_layers=1)
    reference = AutoModelForCausalLM.from_pretrained(tiny_pair / "main", config=config, dtype=torch.float32).eval()
    generator = runtime.load(report.artifact)
    ids = np.random.default_rng(0).integers(1, entry.vocab_size, size=10).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(generator.draft.new_cache().feed(ids) - expected).max() <= 1e-4
    _lossless(generator)


def _lossless(generator) -> None:
    for prompt in corpus.heldout_prompts(3):
        prompt_ids = generator.encode(prompt)
        alone = [t for step in generator.stream_ids(prompt_ids, max_new_tokens=24, speculative=False) for t in step]
        assert [t for step in generator.stream_ids(prompt_ids, max_new_tokens=24, draft_length=3) for t in step] == alone


def test_main_model_routed_to_one_expert_makes_a_draft_with_its_own_quantization(tiny_pair, tmp_path):
    recipe = tiny_pair / "top1.yaml"
    # The test model is random: its INT4 top-1 version agrees little with it, and a draft's accuracy only costs speed.
    recipe.write_text(
        "name: top1\nmain:\n  checkpoint: main\ndraft:\n  checkpoint: main\n  experts_per_token: 1\n"
        "export:\n  max_sequence_length: 256\ncalibrate:\n  max_tokens: 512\nverify:\n  tokens: 256\n  min_top1_agreement: 0.0\n"
    )
    fp32 = build(load_recipe(recipe), tmp_path / "fp32")
    assert fp32.manifest.inputs["draft"]["experts_per_token"] == "1"
    assert fp32.manifest.models["draft"].num_layers == fp32.manifest.models["main"].num_layers

    # In fp32 it is exactly transformers' model with num_experts_per_tok=1.
    config = AutoConfig.from_pretrained(tiny_pair / "main", num_experts_per_tok=1)
    reference = AutoModelForCausalLM.from_pretrained(tiny_pair / "main", config=config, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(1, fp32.manifest.models["draft"].vocab_size, size=10).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(runtime.load(fp32.artifact).draft.new_cache().feed(ids) - expected).max() <= 1e-4

    # The draft's own quantize settings apply to it alone.
    recipe.write_text(recipe.read_text().replace("experts_per_token: 1\n", "experts_per_token: 1\n  quantize:\n    weights: int4\n"))
    int4 = build(load_recipe(recipe), tmp_path / "int4")
    assert (int4.manifest.models["main"].precision, int4.manifest.models["draft"].precision) == ("fp32", "int4-rtn-b32")
    _lossless(runtime.load(int4.artifact))


def test_routing_to_more_experts_than_there_are_is_refused_naming_the_role(tiny_pair, tmp_path):
    with pytest.raises(CheckpointError, match="cannot route to 9 experts in a model with 8 experts per layer"):
        Checkpoint(tiny_pair / "main", experts_per_token=9)
    recipe = tiny_pair / "top9.yaml"
    recipe.write_text("name: top9\nmain:\n  checkpoint: main\ndraft:\n  checkpoint: main\n  experts_per_token: 9\n")
    with pytest.raises(CheckpointError, match=r"^draft model: .*main: cannot route to 9 experts"):  # the folder is the main model's
        build(load_recipe(recipe), tmp_path)


def test_more_layers_than_the_model_has_is_refused(tiny_pair):
    with pytest.raises(CheckpointError, match="cannot keep the first 5 layers of a model with 2"):
        Checkpoint(tiny_pair / "main", layers=5)
