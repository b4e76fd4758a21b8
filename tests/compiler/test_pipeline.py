"""The pipeline: manifest contents, stage caching, atomic publish, and a killed build that resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import runtime
from compiler.pipeline import build
from compiler.recipe import load_recipe
from runtime.artifact import sha256_of
from tiny_models import write_recipe

TESTS = Path(__file__).resolve().parent.parent


def test_manifest_lists_every_file_with_digest_and_size(tiny_artifact, tiny_pair):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    on_disk = {p.relative_to(tiny_artifact).as_posix() for p in tiny_artifact.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk == {
        "main/model.onnx", "main/model.onnx.data", "draft/model.onnx", "draft/model.onnx.data", "tokenizer.json"
    }
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_of(tiny_artifact / name)
        assert entry["size"] == (tiny_artifact / name).stat().st_size
    assert manifest["recipe_sha256"] == load_recipe(tiny_pair / "tiny.yaml").sha256
    assert manifest["inputs"]["main"]["model.safetensors"] == sha256_of(tiny_pair / "main" / "model.safetensors")
    assert {"onnx", "onnxruntime", "onnx-ir", "python"} <= set(manifest["tools"])
    assert [(s["model"], s["stage"]) for s in manifest["stages"]] == [
        (model, stage) for model in ("main", "draft") for stage in ("load", "export", "calibrate", "partition", "quantize_experts", "quantize", "lower", "verify")
    ]
    assert all(s["seconds"] >= 0 and s["result"] for s in manifest["stages"])
    assert manifest["generation"]["eos_token_id"] == 0


def test_rebuild_is_cached_and_a_changed_export_setting_reruns_only_export(tiny_pair, tmp_path):
    output = tmp_path / "out"
    first = build(load_recipe(tiny_pair / "tiny.yaml"), output)
    assert not any(record.cached for record in first.manifest.stages)
    second = build(load_recipe(tiny_pair / "tiny.yaml"), output)
    assert all(record.cached for record in second.manifest.stages)
    assert second.manifest.files == first.manifest.files

    changed = tiny_pair / "changed.yaml"
    changed.write_text((tiny_pair / "tiny.yaml").read_text().replace("max_sequence_length: 256", "max_sequence_length: 128").replace("name: tiny", "name: changed"))
    third = build(load_recipe(changed), output)
    assert {(r.stage, r.cached) for r in third.manifest.stages} == {("load", True), ("export", False), ("calibrate", False), ("partition", False), ("quantize_experts", False), ("quantize", False), ("lower", False), ("verify", False)}
    assert third.manifest.models["main"].max_sequence_length == 128


def test_tampered_cache_entry_is_rebuilt(tiny_pair, tmp_path):
    output = tmp_path / "out"
    build(load_recipe(tiny_pair / "tiny.yaml"), output)
    data = next((output / ".cache" / "export").glob("*/model.onnx.data"))
    content = bytearray(data.read_bytes())
    content[100] ^= 0xFF
    data.write_bytes(bytes(content))
    report = build(load_recipe(tiny_pair / "tiny.yaml"), output)
    assert not all(record.cached for record in report.manifest.stages if record.stage == "export")
    runtime.load(report.artifact)  # the digests in the new artifact check out


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


# In order, each run resuming the last: killed in the middle of writing the exported weights, then after each
# stage of the main model, after the draft's last stage (everything built, nothing published), in the middle of
# copying the weights into the artifact, and finally left to finish.
KILL_POINTS = [
    "export-data", *(f"after:main:{stage}" for stage in ("export", "calibrate", "partition", "quantize_experts", "quantize", "lower", "verify")),
    "after:draft:verify", "publish-data", "never",
]


def test_killed_builds_leave_nothing_that_loads_and_each_rerun_resumes(tiny_pair, tmp_path):
    output = tmp_path / "out"
    finished: set[tuple[str, str]] = set()
    for point in KILL_POINTS:
        log = tmp_path / f"{point}.log"
        log.touch()
        process = subprocess.run(
            [sys.executable, str(TESTS / "killed_build.py"), str(tiny_pair / "tiny.yaml"), str(output), str(log), point], capture_output=True, text=True, timeout=300
        )
        assert process.returncode == (0 if point == "never" else -signal.SIGKILL), process.stderr
        records = [json.loads(line) for line in log.read_text().splitlines()]
        resumed = [r for r in records if (r["model"], r["stage"]) in finished]
        assert all(r["cached"] for r in resumed), (point, resumed)  # what earlier runs finished is not done again
        assert len(resumed) == len(finished), point
        finished |= {(r["model"], r["stage"]) for r in records}
        if point != "never":
            for folder in (p for p in output.iterdir() if p.is_dir() and p.name != ".cache"):
                with pytest.raises(runtime.ArtifactError):
                    runtime.load(folder)
    assert all(r["cached"] for r in records)
    runtime.load(output / "tiny").generate("def f(", max_new_tokens=4)
    abandoned = [p for p in output.rglob(".*") if p.name != ".cache" and p.is_dir()]
    assert abandoned == []  # the killed runs' staging and work folders were removed by the runs after them


@pytest.mark.parametrize(
    "extra, message",
    [
        ("export:\n  precison: fp32\n", "unknown key 'export.precison'"),
        ("generation:\n  draft_length: many\n", "field 'generation.draft_length'"),
        ("export: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ],
)
def test_bad_recipe_cli_gives_one_line_and_writes_nothing(tiny_pair, tmp_path, extra, message):
    recipe = write_recipe(tiny_pair, name="bad", extra=extra)
    output = tmp_path / "out"
    result = _cli("build", str(recipe), "--output", str(output))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert not output.exists() or not any(p.name == "bad" for p in output.iterdir())


def test_bad_checkpoint_cli_names_tensor(tiny_pair, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    root = tmp_path / "pair"
    shutil.copytree(tiny_pair, root, ignore=shutil.ignore_patterns("*.yaml"))
    tensors = load_file(root / "main" / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, root / "main" / "model.safetensors")
    result = _cli("build", str(write_recipe(root)), "--output", str(tmp_path / "out"), "--json")
    assert result.returncode != 0
    assert "missing tensor model.layers.0.self_attn.q_proj.weight" in json.loads(result.stdout)["error"]
    assert not (tmp_path / "out" / "tiny").exists()


def test_builds_are_reproducible(tiny_pair, tmp_path):
    """The same recipe and inputs built twice, each with a fresh cache, give byte-identical files and the same cache keys."""
    extra = "partition:\n  partitions: 2\nquantize:\n  weights: int4\n  method: gptq\n  block_size: 16\nverify:\n  tokens: 512\n  max_perplexity_increase: 10.0\n  min_top1_agreement: 0.0\n"
    recipe = write_recipe(tiny_pair, "reproducible", extra)
    first, second = (build(load_recipe(recipe), tmp_path / run) for run in ("first", "second"))
    assert first.manifest.files == second.manifest.files
    assert [r.cache_key for r in first.manifest.stages] == [r.cache_key for r in second.manifest.stages]
    assert not any(r.cached for r in second.manifest.stages)  # built again, not taken from the first build's cache


def test_changed_weights_or_code_invalidate_every_stage_after_them(tiny_pair, tmp_path, monkeypatch):
    import shutil

    from safetensors.numpy import load_file, save_file

    from compiler import pipeline

    root = tmp_path / "pair"
    shutil.copytree(tiny_pair, root, ignore=shutil.ignore_patterns("*.yaml"))
    recipe, output = write_recipe(root), tmp_path / "out"
    build(load_recipe(recipe), output)
    tensors = load_file(root / "main" / "model.safetensors")
    tensors["model.layers.1.mlp.experts.3.down_proj.weight"][0, 0] += 0.5
    save_file(tensors, root / "main" / "model.safetensors")
    rebuilt = build(load_recipe(recipe), output).manifest.stages
    assert {(r.model, r.cached) for r in rebuilt} == {("main", False), ("draft", True)}  # calibration included
    monkeypatch.setattr(pipeline, "source_digest", lambda: "0" * 64)  # as if a stage's code had changed
    assert not any(r.cached for r in build(load_recipe(recipe), output).manifest.stages)
