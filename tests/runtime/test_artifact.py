"""Artifact checks run before any model is deserialized: tampering, escapes and half-written folders are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import runtime
from runtime.artifact import verify_artifact


@pytest.fixture
def artifact(tiny_artifact, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_artifact, copy)
    return copy


def _edit_manifest(artifact, change):
    manifest = json.loads((artifact / "manifest.json").read_text())
    change(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def test_intact_artifact_verifies(artifact):
    assert verify_artifact(artifact).name == "tiny"


def test_flipped_byte_is_refused_by_cli_in_one_line(artifact):
    data = artifact / "main" / "model.onnx.data"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x01
    data.write_bytes(bytes(content))
    with pytest.raises(runtime.ArtifactError, match=r"model\.onnx\.data: sha256 does not match"):
        runtime.load(artifact)
    result = subprocess.run([sys.executable, "-m", "compiler.cli", "generate", str(artifact), "--prompt", "x"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "sha256 does not match the manifest" in result.stderr and "rebuild" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0


def test_truncated_file_is_refused(artifact):
    model = artifact / "draft" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(runtime.ArtifactError, match="truncated or altered"):
        runtime.load(artifact)


def test_missing_manifest_means_unfinished(artifact):
    (artifact / "manifest.json").unlink()
    with pytest.raises(runtime.ArtifactError, match="not a finished artifact"):
        runtime.load(artifact)


@pytest.mark.parametrize("bad_path", ["../outside.bin", "/etc/passwd", "main/../../x"])
def test_paths_outside_the_artifact_are_refused(artifact, bad_path):
    _edit_manifest(artifact, lambda m: m["files"].__setitem__(bad_path, {"sha256": "0" * 64, "size": 1}))
    with pytest.raises(runtime.ArtifactError, match="path outside the artifact"):
        runtime.load(artifact)


def test_unknown_schema_version(artifact):
    _edit_manifest(artifact, lambda m: m.__setitem__("schema_version", 99))
    with pytest.raises(runtime.ArtifactError, match="schema version 99"):
        runtime.load(artifact)


def test_session_option_outside_the_allowed_set_is_refused(artifact):
    _edit_manifest(artifact, lambda m: m["models"]["main"].__setitem__("session_options", {"session.load_model_format": "ORT"}))
    with pytest.raises(runtime.ArtifactError, match="session option session.load_model_format='ORT' is not one moecc applies"):
        runtime.load(artifact)


def test_runtime_does_not_import_torch_transformers_or_compiler(tiny_artifact):
    code = (
        "import sys, runtime; g = runtime.load(sys.argv[1]); g.generate('def f(', max_new_tokens=4);"
        "bad = [m for m in ('torch', 'transformers', 'compiler') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tiny_artifact)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
