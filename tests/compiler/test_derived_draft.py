"""A draft derived from the main model itself: its first layers with its final norm and head."""

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

    for prompt in corpus.heldout_prompts(3):
        prompt_ids = generator.encode(prompt)
        alone = [t for step in generator.stream_ids(prompt_ids, max_new_tokens=24, speculative=False) for t in step]
        assert [t for step in generator.stream_ids(prompt_ids, max_new_tokens=24, draft_length=3) for t in step] == alone


def test_more_layers_than_the_model_has_is_refused(tiny_pair):
    with pytest.raises(CheckpointError, match="cannot keep the first 5 layers of a model with 2"):
        Checkpoint(tiny_pair / "main", layers=5)
