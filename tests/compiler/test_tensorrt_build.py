"""The tensorrt target: real engines built by TensorRT-RTX on this machine, their identity, and refusals before deserialization."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx_ir as ir
import pytest

import runtime
from compiler.cli import main as cli
from compiler.errors import BuildError
from compiler.pipeline import build
from compiler.recipe import load_recipe
from compiler.stages import build_engine
from conftest import REPO
from runtime import tensorrt_library
from runtime.artifact import MANIFEST_NAME
from runtime.decoder import check_external_data
from runtime.tensorrt_backend import EngineRefused, check_engine
from tiny_models import write_recipe


def test_engines_are_built_and_recorded(tiny_tensorrt_artifact):
    manifest = runtime.load(tiny_tensorrt_artifact, target="cpu").manifest
    library = tensorrt_library.load()
    for role, entry in manifest.models.items():
        engine = entry.engine
        assert (engine.flavour, engine.version) == (library.flavour, library.version)
        assert engine.compute_capabilities == ["sm86", "sm89"] and engine.precision == "fp16"
        assert [p.name for p in engine.profiles] == ["prefill", "decode", "verify"]
        verify = engine.profiles[2]
        assert verify.tokens == (2, manifest.generation.max_draft_length + 1, manifest.generation.max_draft_length + 1)
        assert engine.profiles[1].past[2] == entry.max_sequence_length - 1
        assert engine.size == manifest.files[engine.path].size > 100_000
        layers = (tiny_tensorrt_artifact / engine.layers_path).read_text().splitlines()
        assert any(line.startswith("ATTENTION_OUTPUT") for line in layers), role
        lowered = ir.load(tiny_tensorrt_artifact / engine.onnx_path)
        assert {node.domain for node in lowered.graph} == {""}  # standard ops only
        check_external_data(tiny_tensorrt_artifact, engine.onnx_path, set(manifest.files))  # its weights stay inside the artifact


def test_builder_options_come_from_the_recipe(tiny_pair, tiny_tensorrt_artifact, tmp_path):
    options = "targets: [cpu, tensorrt]\ntensorrt:\n  weight_streaming: true\n  max_batch_size: 4\n  prefill_tokens: 64\n  compute_capabilities: [sm89]\n"
    streamed = build(load_recipe(write_recipe(tiny_pair, "tiny-streamed", options)), tmp_path).manifest.models["main"].engine
    full = runtime.load(tiny_tensorrt_artifact, target="cpu").manifest.models["main"].engine
    assert streamed.builder_flags == ["WEIGHT_STREAMING"] and full.builder_flags == []
    assert streamed.compute_capabilities == ["sm89"]
    assert all(profile.batch == (1, 1, 4) for profile in streamed.profiles)
    assert streamed.profiles[0].tokens == (1, 32, 64)


def test_weight_stripping_without_a_gpu_says_what_to_do(tiny_pair, tmp_path):
    if tensorrt_library.current_gpu() is not None:
        pytest.skip("this machine has a GPU: stripped engines build here")
    recipe = write_recipe(tiny_pair, "tiny-stripped", "targets: [cpu, tensorrt]\ntensorrt:\n  strip_weights: true\n")
    with pytest.raises(BuildError, match=r"strip_weights needs a GPU at build time.*set tensorrt.strip_weights: false"):
        build(load_recipe(recipe), tmp_path)


def test_inspect_lists_each_engine(tiny_tensorrt_artifact, capsys):
    assert cli(["inspect", str(tiny_tensorrt_artifact), "--json", "--layers"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for role in ("main", "draft"):
        engine = summary["engines"][role]
        assert engine["layers"] == len(engine["layer_list"]) > 50
        assert engine["check"]["passed"] and engine["size"] > 0
    assert cli(["inspect", str(tiny_tensorrt_artifact)]) == 0
    text = capsys.readouterr().out
    assert "TensorRT engines" in text and "sm86, sm89" in text and "decode 1-1 tokens" in text


def test_a_parser_failure_names_the_node(tiny_tensorrt_artifact, tmp_path):
    entry = runtime.load(tiny_tensorrt_artifact, target="cpu").manifest.models["draft"]
    model = ir.load(tiny_tensorrt_artifact / entry.engine.onnx_path)
    ids = next(value for value in model.graph.inputs if value.name == "input_ids")
    model.graph.append(ir.node("NoSuchOp", [ids], domain="com.example", name="the_odd_one"))
    model.opset_imports["com.example"] = 1
    lowered = tmp_path / "lowered"
    lowered.mkdir()
    ir.save(model, lowered / "model.onnx", external_data="model.onnx.data")
    config = build_engine.BuildEngineConfig(
        flavour="tensorrt_rtx", version="any", compute_capabilities=["sm86"], precision="fp16", profiles=entry.engine.profiles,
        weight_streaming=False, strip_weights=False,
    )
    with pytest.raises(BuildError, match=r"refused node the_odd_one \(NoSuchOp\)"):
        build_engine.run(None, config, tmp_path, lowered_dir=lowered)


def test_a_failed_engine_build_leaves_no_artifact(tiny_pair, tmp_path):
    recipe = write_recipe(tiny_pair, "tiny-hopper", "targets: [cpu, tensorrt]\ntensorrt:\n  compute_capabilities: [sm90]\n")
    with pytest.raises(runtime.MoeccError, match=r"cannot build for compute capability 'sm90'; it supports sm75, sm80"):
        build(load_recipe(recipe), tmp_path / "out")
    assert not (tmp_path / "out" / "tiny-hopper").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != ".cache"]


@pytest.fixture
def engine_copy(tiny_tensorrt_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_tensorrt_artifact, copy)
    return copy


def _edit_manifest(artifact, edit) -> None:
    path = artifact / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_an_engine_from_another_tensorrt_version_is_refused(engine_copy):
    def older(manifest):
        manifest["models"]["main"]["engine"]["version"] = "1.0.0.1"

    _edit_manifest(engine_copy, older)
    with pytest.raises(EngineRefused, match=r"built with TensorRT-RTX 1\.0\.0\.1; this machine has TensorRT-RTX 1\.\d+.*rebuild"):
        runtime.load(engine_copy, target="tensorrt")


def test_an_engine_for_other_gpus_is_refused_before_it_is_read(tiny_tensorrt_artifact):
    engine = runtime.load(tiny_tensorrt_artifact, target="cpu").manifest.models["main"].engine
    ampere = tensorrt_library.Gpu("NVIDIA A100", "sm80")
    with pytest.raises(EngineRefused, match=r"built for sm86, sm89; this GPU \(NVIDIA A100\) is sm80"):
        check_engine(tiny_tensorrt_artifact / "no-such-file", engine, gpu=ampere)  # refused before the file is opened


def test_an_engine_without_a_gpu_is_refused(tiny_tensorrt_artifact):
    if tensorrt_library.current_gpu() is not None:
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineRefused, match=r"no NVIDIA GPU on this machine; the engine runs on sm86, sm89.*target='cpu'"):
        runtime.load(tiny_tensorrt_artifact, target="tensorrt")
    assert runtime.load(tiny_tensorrt_artifact).target == "cpu"  # auto falls back to the CPU models


@pytest.mark.parametrize("name", ["main/tensorrt/model.engine", "main/tensorrt/model.onnx.data", "draft/tensorrt/layers.txt"])
def test_a_tampered_engine_is_refused_before_deserialization(engine_copy, name, capsys):
    path = engine_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(runtime.ArtifactError, match=rf"{re.escape(name)}: sha256 does not match the manifest"):
        runtime.load(engine_copy, target="tensorrt")
    assert cli(["verify", str(engine_copy), "--json"]) == 1
    assert "sha256 does not match" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.gpu
def test_engines_decode_losslessly_on_a_gpu(tiny_tensorrt_artifact):
    """Runs only with an NVIDIA GPU of a listed compute capability: speculation on the engines changes no token,
    and the fp16 engines mostly agree with the CPU models."""
    engines, cpu = runtime.load(tiny_tensorrt_artifact, target="tensorrt"), runtime.load(tiny_tensorrt_artifact, target="cpu")
    prompt = [5, 17, 42, 9, 77, 3]
    alone = [t for step in engines.stream_ids(prompt, max_new_tokens=32, speculative=False, stop_tokens=set()) for t in step]
    speculative = [t for step in engines.stream_ids(prompt, max_new_tokens=32, draft_length=3, stop_tokens=set()) for t in step]
    assert speculative == alone
    reference = [t for step in cpu.stream_ids(prompt, max_new_tokens=32, speculative=False, stop_tokens=set()) for t in step]
    assert np.mean(np.asarray(alone[:8]) == np.asarray(reference[:8])) >= 0.75


SHIPPED_ENGINE_RECIPES = {"tiny-coder-tensorrt": "fp32", "tiny-coder-tensorrt-int8": "int8-gptq-b32-a8-percentile", "tiny-coder-tensorrt-int4": "int4-gptq-b32"}


@pytest.fixture(scope="module")
def shipped_engines(tmp_path_factory, shipped_cache):
    """The shipped pair's engines in fp16, INT8 (QDQ) and INT4 weight-only."""
    output = tmp_path_factory.mktemp("shipped-engines")
    return {name: build(load_recipe(REPO / "recipes" / f"{name}.yaml"), output, cache_root=shipped_cache).artifact for name in SHIPPED_ENGINE_RECIPES}


@pytest.mark.parametrize("name", list(SHIPPED_ENGINE_RECIPES))
def test_shipped_pair_engines(shipped_engines, name):
    artifact = shipped_engines[name]
    manifest = runtime.load(artifact, target="cpu").manifest
    assert manifest.models["main"].precision == SHIPPED_ENGINE_RECIPES[name]
    for role, entry in manifest.models.items():
        assert entry.engine is not None and entry.engine.size > 1_000_000, role
        lowered = ir.load(artifact / entry.engine.onnx_path)
        weights = {value.const_value.dtype for value in lowered.graph.initializers.values()}
        quantized = {"tiny-coder-tensorrt": set(), "tiny-coder-tensorrt-int8": {ir.DataType.INT8}, "tiny-coder-tensorrt-int4": {ir.DataType.INT4}}[name]
        assert weights & {ir.DataType.INT4, ir.DataType.INT8} == quantized, role
        assert ir.DataType.FLOAT16 in weights and ir.DataType.FLOAT not in weights, role
        ops = {node.op_type for node in lowered.graph}
        if name.endswith("int8"):
            assert "QuantizeLinear" in ops  # activations too: W8A8
    check = next(r.result["check"] for r in manifest.stages if r.model == "main" and r.stage == "lower_tensorrt")
    assert check["passed"] and check["top1_agreement"] >= 0.9
