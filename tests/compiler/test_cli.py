"""The command line: build, inspect and generate with --json, as CI would call them."""

from __future__ import annotations

import json
import subprocess
import sys


def _moecc(*args):
    result = subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def test_build_inspect_generate_json(tiny_pair, tmp_path):
    code, out, err = _moecc("build", str(tiny_pair / "tiny.yaml"), "--output", str(tmp_path), "--json")
    assert code == 0, err
    built = json.loads(out)
    assert built["ok"] and built["models"]["main"]["architecture"] == "qwen3_moe"

    code, out, err = _moecc("inspect", built["artifact"], "--json")
    assert code == 0, err
    inspected = json.loads(out)
    assert inspected["models"]["draft"]["precision"] == "fp32"
    assert inspected["total_bytes"] == built["total_bytes"]
    assert [s["stage"] for s in inspected["stages"]] == ["load", "export", "calibrate", "quantize", "verify"] * 2

    code, out, err = _moecc("generate", built["artifact"], "--prompt", "def f(x):", "--max-new-tokens", "12", "--json")
    assert code == 0, err
    generated = json.loads(out)
    assert len(generated["token_ids"]) == generated["stats"]["new_tokens"] <= 12
    assert {"tokens_per_second", "acceptance_rate", "mean_accepted_length"} <= set(generated["stats"])


def test_human_output_ends_with_a_summary(tiny_pair, tmp_path):
    code, out, err = _moecc("build", str(tiny_pair / "tiny.yaml"), "--output", str(tmp_path))
    assert code == 0, err
    assert "built tiny" in out and "stages" in out and "artifact:" in out
    code, out, err = _moecc("generate", str(tmp_path / "tiny"), "--prompt", "import os", "--max-new-tokens", "8")
    assert code == 0, err
    assert out.startswith("import os") and "tokens/s" in err and "acceptance" in err


def test_missing_artifact_is_a_clear_error(tmp_path):
    code, out, err = _moecc("inspect", str(tmp_path / "nothing"), "--json")
    assert code == 1
    assert json.loads(out) == {"ok": False, "error": f"{tmp_path / 'nothing'}: no such artifact directory (rebuild it with `moecc build RECIPE`)"}
