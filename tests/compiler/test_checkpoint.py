"""Checkpoint validation: each kind of bad checkpoint is refused with a message that names the problem."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from compiler.checkpoint import Checkpoint
from compiler.errors import CheckpointError
from compiler.stages import load


@pytest.fixture
def main_copy(tiny_pair, tmp_path):
    folder = tmp_path / "main"
    shutil.copytree(tiny_pair / "main", folder)
    return folder


def _rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_valid_checkpoint_loads(main_copy):
    result = load.run(Checkpoint(main_copy), load.LoadConfig())
    assert result.architecture == "qwen3_moe"
    assert result.tensors == len(Checkpoint(main_copy).tensors)


def test_missing_tensor_is_named(main_copy):
    _rewrite(main_copy, lambda t: t.pop("model.layers.1.mlp.experts.7.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.7\.up_proj\.weight"):
        Checkpoint(main_copy).validate()


def test_wrong_shape_is_named(main_copy):
    _rewrite(main_copy, lambda t: t.update({"model.norm.weight": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has shape \[3\], expected \[64\]"):
        Checkpoint(main_copy).validate()


@pytest.mark.parametrize(
    "name, value",
    [("model.layers.0.self_attn.k_proj.weight", np.nan), ("model.layers.1.mlp.experts.2.down_proj.weight", np.inf)],
)
def test_nan_or_inf_tensor_is_named(main_copy, name, value):
    def poison(tensors):
        tensors[name][0, 0] = value

    _rewrite(main_copy, poison)
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(name)} holds NaN or Inf"):
        load.run(Checkpoint(main_copy), load.LoadConfig())


def test_truncated_file_is_refused(main_copy):
    weights = main_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file.*truncated"):
        Checkpoint(main_copy)


def test_unknown_architecture_lists_supported(main_copy):
    config = json.loads((main_copy / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (main_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unsupported architecture \['GPTNeoXForCausalLM'\]; supported: LlamaForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM"):
        Checkpoint(main_copy)


def test_config_without_architectures_is_read_by_model_type(main_copy):
    config = json.loads((main_copy / "config.json").read_text())
    del config["architectures"]  # as Qwen3MoeConfig(...).save_pretrained writes it
    (main_copy / "config.json").write_text(json.dumps(config))
    assert Checkpoint(main_copy).arch.hf_class == "Qwen3MoeForCausalLM"
    config["model_type"] = "gpt_neox"
    (main_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unsupported architecture 'gpt_neox'; supported: LlamaForCausalLM"):
        Checkpoint(main_copy)


def test_pickle_weights_are_refused(main_copy):
    (main_copy / "model.safetensors").rename(main_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle \.bin files"):
        Checkpoint(main_copy)


def test_missing_config(main_copy):
    (main_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        Checkpoint(main_copy)


def test_unsupported_rope_scaling_is_named(main_copy):
    config = json.loads((main_copy / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (main_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"RoPE scaling 'yarn' is not supported yet; supported: default, linear, llama3"):
        Checkpoint(main_copy)


def test_integer_tensor_is_refused(main_copy):
    _rewrite(main_copy, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has dtype I32; supported: F32, F16, BF16"):
        Checkpoint(main_copy).validate()


def test_dense_layers_between_moe_layers_are_refused(main_copy):
    config = json.loads((main_copy / "config.json").read_text())
    config["mlp_only_layers"] = [1]
    (main_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp_only_layers"):
        Checkpoint(main_copy)
