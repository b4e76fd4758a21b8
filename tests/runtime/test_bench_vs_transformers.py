"""scripts/bench_vs_transformers.py compares an artifact with the checkpoints its recipe names: only with
those the artifact was built from, its assistant the draft the artifact runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import runtime
from compiler import corpus
from compiler.pipeline import check_built_from
from compiler.recipe import load_recipe
from conftest import REPO, SHIPPED_RECIPE, full_precision_decoder
from runtime.artifact import verify_artifact
from runtime.errors import MoeccError
from script_modules import load_script

bench_vs_transformers = load_script("bench_vs_transformers")


def test_an_artifact_built_from_other_checkpoints_is_refused(shipped_artifact):
    """(compiler.pipeline.check_built_from, which scripts/bench_vs_genai.py calls too)"""
    assert check_built_from(shipped_artifact, load_recipe(SHIPPED_RECIPE)) == verify_artifact(shipped_artifact)  # its own recipe
    with pytest.raises(MoeccError, match=r"was not built from .*small-coder.yaml's main checkpoint .*moecc build"):
        check_built_from(shipped_artifact, load_recipe(REPO / "recipes" / "small-coder.yaml"))
    with pytest.raises(MoeccError, match="no such artifact directory"):  # refused before anything is opened
        check_built_from(shipped_artifact.parent / "no-such-artifact", load_recipe(SHIPPED_RECIPE))


def test_the_assistant_is_the_draft_the_runtime_runs(small_coder_artifact, shipped_artifact, tmp_path):
    """small-coder's INT8 draft: transformers' assistant takes its dequantized weights and computes the artifact's
    draft in full precision (the runtime's rounds its activations to 8 bits too, as the artifact asks); a float
    draft stays as its checkpoint has it."""
    generator = runtime.load(small_coder_artifact)
    draft = AutoModelForCausalLM.from_pretrained(REPO / "recipes" / "small-coder" / "draft", dtype=torch.float32).eval()
    assert bench_vs_transformers.assistant_weights(draft, generator, small_coder_artifact) == "the artifact's, int8-rtn-b32 dequantized"
    ids = generator.encode(corpus.heldout_prompts(1)[0])[:64]
    with torch.no_grad():
        theirs = draft(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(full_precision_decoder(small_coder_artifact, "draft", tmp_path).new_cache().feed(ids) - theirs).max() <= 1e-4
    assert bench_vs_transformers.assistant_weights(None, runtime.load(shipped_artifact), shipped_artifact) == "the checkpoint's"
