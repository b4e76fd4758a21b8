"""Shared fixtures: a random-init tiny pair, and the shipped tiny-coder and small-coder pairs, each built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from compiler.pipeline import build  # noqa: E402
from compiler.recipe import load_recipe  # noqa: E402
from runtime.artifact import read_manifest  # noqa: E402
from runtime.decoder import Decoder  # noqa: E402
from tiny_models import make_pair, tiny_tokenizer, write_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED_RECIPE = REPO / "recipes" / "tiny-coder.yaml"
SHIPPED_PAIRS = ("tiny-coder", "small-coder")


def in_full_precision(model) -> None:
    """Set every MatMulNBits of `model` (an onnx.ModelProto) to accuracy level 0: ONNX Runtime then multiplies the
    dequantized weights by float activations, which is what transformers computes given those weights, where a
    recipe's level 4 (which the runtime's 8-bit products keep) rounds the activations to 8 bits too."""
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                attribute.i = 0


def full_precision_decoder(artifact, role: str, folder):
    """The artifact's `role` model on ONNX Runtime's node-by-node kernels with its 8-bit products in full
    precision (in_full_precision), written under `folder`."""
    model = onnx.load(artifact / role / "model.onnx")
    in_full_precision(model)
    (folder / role).mkdir(parents=True)
    onnx.save(model, folder / role / "model.onnx")
    return Decoder(folder, read_manifest(artifact).models[role], {f"{role}/model.onnx"}, threads=2, kernels="onnxruntime")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("pair")
    make_pair(root, tokenizer)
    write_recipe(root)
    return root


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_pair) -> Path:
    output = tmp_path_factory.mktemp("artifacts")
    return build(load_recipe(tiny_pair / "tiny.yaml"), output).artifact


@pytest.fixture(scope="session")
def shipped_cache(tmp_path_factory) -> Path:
    """One stage cache for every build of the shipped pair: recipes that share stages (export, calibration,
    a quantization) build them once per test session, as they would in one artifacts folder."""
    return tmp_path_factory.mktemp("shipped-cache")


@pytest.fixture(scope="session")
def shipped_artifact(tmp_path_factory, shipped_cache) -> Path:
    output = tmp_path_factory.mktemp("shipped")
    return build(load_recipe(SHIPPED_RECIPE), output, cache_root=shipped_cache).artifact


@pytest.fixture(scope="session")
def shipped_kv8_artifact(tmp_path_factory, shipped_cache) -> Path:
    """The shipped pair with an INT8 KV cache (recipes/tiny-coder-kv8.yaml)."""
    output = tmp_path_factory.mktemp("shipped-kv8")
    return build(load_recipe(REPO / "recipes" / "tiny-coder-kv8.yaml"), output, cache_root=shipped_cache).artifact


@pytest.fixture(scope="session")
def small_coder_artifact(tmp_path_factory) -> Path:
    return build(load_recipe(REPO / "recipes" / "small-coder.yaml"), tmp_path_factory.mktemp("small-coder")).artifact


@pytest.fixture(scope="session", params=SHIPPED_PAIRS)
def shipped_pair(request) -> tuple[Path, Path]:
    """Each shipped pair: (its checkpoints' folder, its artifact)."""
    artifact = request.getfixturevalue("shipped_artifact" if request.param == "tiny-coder" else "small_coder_artifact")
    return REPO / "recipes" / request.param, artifact


@pytest.fixture(scope="session")
def tiny_tensorrt_artifact(tmp_path_factory, tiny_pair) -> Path:
    """The tiny pair with TensorRT-RTX engines beside its CPU models."""
    recipe = write_recipe(tiny_pair, "tiny-tensorrt", "targets: [cpu, tensorrt]\n")
    return build(load_recipe(recipe), tmp_path_factory.mktemp("tensorrt")).artifact


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where TensorRT and an NVIDIA GPU are present; elsewhere they skip and say why."""
    from runtime.tensorrt_library import current_gpu

    if not any("gpu" in item.keywords for item in items):
        return
    gpu = current_gpu()
    if gpu is None:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (no CUDA device found on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
