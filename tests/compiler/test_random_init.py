"""Random-init checkpoints from a config: complete, deterministic, reused, and built like any other."""

from __future__ import annotations

import hashlib
import json
import shutil

from compiler import random_init
from compiler.architectures import expected_tensors
from compiler.checkpoint import Checkpoint
from compiler.pipeline import build
from compiler.recipe import load_recipe


def _config_only(tiny_pair, root):
    for role in ("main", "draft"):
        (root / role).mkdir(parents=True)
        for name in random_init.COPIED:
            shutil.copyfile(tiny_pair / role / name, root / role / name)


def test_generated_checkpoint_is_complete_deterministic_and_reused(tiny_pair, tmp_path):
    _config_only(tiny_pair, tmp_path / "config")
    first = random_init.materialize(tmp_path / "config" / "main", 3, tmp_path / "cache")
    checkpoint = Checkpoint(first)
    assert set(checkpoint.tensors) == set(expected_tensors(checkpoint.arch, checkpoint.dims))
    assert checkpoint.read("model.norm.weight").tolist() == [1.0] * checkpoint.dims.hidden_size
    assert abs(float(checkpoint.read("model.layers.0.self_attn.q_proj.weight").std()) - 0.02) < 0.002

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    again = random_init.materialize(tmp_path / "config" / "main", 3, tmp_path / "other-cache")
    assert digest(first) == digest(again)
    assert random_init.materialize(tmp_path / "config" / "main", 3, tmp_path / "cache") == first
    assert random_init.materialize(tmp_path / "config" / "main", 4, tmp_path / "cache") != first


def test_recipe_with_random_weights_builds(tiny_pair, tmp_path):
    _config_only(tiny_pair, tmp_path)
    recipe = tmp_path / "random.yaml"
    recipe.write_text(
        "name: random\nmain:\n  checkpoint: main\n  random_init_seed: 0\ndraft:\n  checkpoint: draft\n  random_init_seed: 1\n"
        "export:\n  max_sequence_length: 128\ncalibrate:\n  max_tokens: 256\nverify:\n  tokens: 128\n"
    )
    report = build(load_recipe(recipe), tmp_path / "out")
    assert json.loads((report.artifact / "manifest.json").read_text())["models"]["main"]["architecture"] == "qwen3_moe"
    assert not any((tmp_path / "main").glob("*.safetensors"))  # generated in the cache, not next to the config
