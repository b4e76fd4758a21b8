"""Every kind of tampering is refused by runtime.load and by `moecc verify`, with a named error, before any model is deserialized."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtime
from compiler import cli, partition_files
from runtime.artifact import sha256_of


@pytest.fixture
def artifact(tiny_artifact, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_artifact, copy)
    return copy


def _flip(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))


def _manifest(artifact: Path, change) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    change(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def _outside_copy(path: Path) -> Path:
    """A file with the same bytes outside the artifact (so only the link itself is wrong)."""
    copy = path.parent.parent.parent / f"outside-{path.name}"
    shutil.copyfile(path, copy)
    return copy


def _symlink(artifact: Path, name: str) -> None:
    target = _outside_copy(artifact / name)
    (artifact / name).unlink()
    (artifact / name).symlink_to(target)


def _hardlink(artifact: Path, name: str) -> None:
    target = _outside_copy(artifact / name)
    (artifact / name).unlink()
    os.link(target, artifact / name)


def _relisted(artifact: Path, name: str) -> None:
    """Record a changed file's digest in the manifest, as an attacker who can write the whole folder would."""
    path = artifact / name
    _manifest(artifact, lambda m: m["files"].__setitem__(name, {"sha256": sha256_of(path), "size": path.stat().st_size}))


def _external_data_at(artifact: Path, location: str) -> None:
    model = artifact / "main" / "model.onnx"
    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(model))
    _relisted(artifact, "main/model.onnx")


TAMPERING = {
    "flipped byte in main/model.onnx": (lambda a: _flip(a / "main" / "model.onnx"), r"main/model\.onnx: sha256 does not match"),
    "flipped byte in main/model.onnx.data": (lambda a: _flip(a / "main" / "model.onnx.data"), r"main/model\.onnx\.data: sha256 does not match"),
    "flipped byte in draft/model.onnx.data": (lambda a: _flip(a / "draft" / "model.onnx.data"), r"draft/model\.onnx\.data: sha256 does not match"),
    "flipped byte in tokenizer.json": (lambda a: _flip(a / "tokenizer.json"), r"tokenizer\.json: sha256 does not match"),
    "altered digest in manifest.json": (
        lambda a: _manifest(a, lambda m: m["files"]["main/model.onnx"].__setitem__("sha256", "f" * 64)), r"main/model\.onnx: sha256 does not match"
    ),
    "truncated manifest.json": (lambda a: (a / "manifest.json").write_bytes((a / "manifest.json").read_bytes()[:-40]), "unreadable manifest"),
    "deleted file": (lambda a: (a / "draft" / "model.onnx").unlink(), r"file draft/model\.onnx listed in the manifest is missing"),
    "added file": (lambda a: (a / "main" / "payload.bin").write_bytes(b"x"), r"main/payload\.bin is not listed"),
    "file replaced by a symlink": (lambda a: _symlink(a, "main/model.onnx.data"), "symbolic links are not allowed"),
    "file replaced by a hard link": (lambda a: _hardlink(a, "main/model.onnx.data"), "hard links are not allowed"),
    "manifest path leaving the folder": (
        lambda a: _manifest(a, lambda m: m["files"].__setitem__("../outside.bin", {"sha256": "0" * 64, "size": 1})), "path outside the artifact"
    ),
    "model path leaving the folder": (lambda a: _manifest(a, lambda m: m["models"]["main"].__setitem__("path", "../main/model.onnx")), "path outside the artifact"),
    "external data climbing out with ..": (lambda a: _external_data_at(a, "../../secret.bin"), "outside the artifact"),
    "external data at an absolute path": (lambda a: _external_data_at(a, "/etc/passwd"), "outside the artifact"),
}


@pytest.mark.parametrize("tamper", TAMPERING)
def test_tampering_is_refused_before_anything_is_deserialized(artifact, tamper, monkeypatch, capsys):
    change, message = TAMPERING[tamper]
    change(artifact)

    def deserialize(*args, **kwargs):
        raise AssertionError("a model was deserialized")

    monkeypatch.setattr(onnxruntime, "InferenceSession", deserialize)
    with pytest.raises(runtime.ArtifactError, match=message):
        runtime.load(artifact, target="cpu")
    assert cli.main(["verify", str(artifact)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "Traceback" not in error
    assert json.loads(_verify_json(artifact, capsys))["ok"] is False


def _verify_json(artifact: Path, capsys) -> str:
    cli.main(["verify", str(artifact), "--json"])
    return capsys.readouterr().out


def test_verify_recomputes_the_gates_from_their_figures(artifact, capsys):
    assert json.loads(_verify_json(artifact, capsys))["gates"] == 2
    # An edited manifest that still says "passed" with figures beyond the gate is caught.
    _manifest(artifact, lambda m: next(r for r in m["stages"] if r["stage"] == "verify" and r["model"] == "main")["result"].__setitem__("perplexity_increase", 0.5))
    report = json.loads(_verify_json(artifact, capsys))
    assert not report["ok"] and "main model, verify stage: perplexity +50.00% exceeds the gate's +5.00%" in report["error"]


def _model_with_external_data(folder: Path, location: str) -> None:
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    size = len(weight.raw_data)
    weight.ClearField("raw_data")
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    weight.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight],
    )
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))


@pytest.mark.parametrize("link", ["dotdot", "absolute", "symlink", "hardlink"])
def test_saving_never_follows_external_data_out_of_its_folders(tmp_path, link):
    """The partitioned save reads a stage's model and writes the artifact's: an escaping source is refused, a target that is
    not a fresh folder is refused, and the file outside is neither read into the artifact nor written."""
    outside = tmp_path / "outside.data"
    outside.write_bytes(np.full((64, 64), 7, np.float32).tobytes())
    before = outside.read_bytes()
    source, target = tmp_path / "stage", tmp_path / "artifact"
    if link in ("dotdot", "absolute"):
        _model_with_external_data(source, "../outside.data" if link == "dotdot" else str(outside))
        target.mkdir()
        with pytest.raises(onnx.checker.ValidationError, match="outside|absolute"):
            partition_files.save_partitioned(source, target)
    else:
        _model_with_external_data(source, "model.onnx.data")
        (source / "model.onnx.data").write_bytes(before)
        target.mkdir()
        # a data file already in the target that leads outside: writing through it would overwrite `outside`
        (target / "model.onnx.data").symlink_to(outside) if link == "symlink" else os.link(outside, target / "model.onnx.data")
        with pytest.raises(FileExistsError, match="not empty"):
            partition_files.save_partitioned(source, target)
    assert outside.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "outside.data", "stage"]
