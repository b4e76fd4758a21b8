"""The command line: build, inspect and generate with --json, as CI would call them."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from runtime.artifact import read_manifest


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
    main = inspected["models"]["main"]
    assert main["kv_cache"] == "fp32" and main["kv_cache_bytes_per_token"] == main["num_layers"] * 2 * main["num_kv_heads"] * main["head_dim"] * 4
    assert inspected["total_bytes"] == built["total_bytes"]
    assert [s["stage"] for s in inspected["stages"]] == ["load", "export", "calibrate", "partition", "quantize_experts", "quantize", "lower", "verify"] * 2
    assert inspected["lowering"]["main"]["expert_parts"] == 2 and len(inspected["lowering"]["main"]["split_nodes"]) == 2
    assert "draft" not in inspected["lowering"]  # a dense model has no experts to split

    code, out, err = _moecc("generate", built["artifact"], "--prompt", "def f(x):", "--max-new-tokens", "12", "--json")
    assert code == 0, err
    generated = json.loads(out)
    assert len(generated["token_ids"]) == generated["stats"]["new_tokens"] <= 12
    assert {"tokens_per_second", "acceptance_rate", "mean_accepted_length"} <= set(generated["stats"])
    code, out, err = _moecc("generate", built["artifact"], "--prompt", "def f(x):", "--max-new-tokens", "12", "--json", "--proposer", "prompt-lookup")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == generated["token_ids"]  # greedy: the main model's tokens, whoever proposes


def test_human_output_ends_with_a_summary(tiny_pair, tmp_path):
    code, out, err = _moecc("build", str(tiny_pair / "tiny.yaml"), "--output", str(tmp_path))
    assert code == 0, err
    assert "built tiny" in out and "stages" in out and "artifact:" in out
    code, out, err = _moecc("generate", str(tmp_path / "tiny"), "--prompt", "import os", "--max-new-tokens", "8")
    assert code == 0, err
    assert out.startswith("import os") and "tokens/s" in err and "acceptance" in err
    code, out, err = _moecc("generate", str(tmp_path / "tiny"), "--prompt", "import os", "--max-new-tokens", "8", "--no-speculative")
    assert code == 0, err
    assert "main model only" in err and "main-model calls" in err and "acceptance" not in err


def test_missing_artifact_is_a_clear_error(tmp_path):
    code, out, err = _moecc("inspect", str(tmp_path / "nothing"), "--json")
    assert code == 1
    assert json.loads(out) == {"ok": False, "error": f"{tmp_path / 'nothing'}: no such artifact directory (rebuild it with `moecc build RECIPE`)"}


def test_bench_writes_table_json_and_chart(tiny_artifact, tmp_path):
    report_path = tmp_path / "bench.json"
    code, out, err = _moecc(
        "bench", str(tiny_artifact), "--prompt-tokens", "16", "40", "--new-tokens", "12", "--runs", "2", "--batch-sizes", "1", "3",
        "--json-out", str(report_path), "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads(report_path.read_text()) | {"ok": True, "json": str(report_path), "chart": str(report_path.with_suffix(".png"))}
    assert report_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    modes = [(case["mode"], case["prompt_tokens"]) for case in report["cases"]]
    single = ("main only", "speculative k=4", "speculative auto", "prompt lookup", "lookup then draft")
    assert modes == [(m, p) for p in (16, 40) for m in (*single, *(f"{mode}, batch 3" for mode in single))]
    for case in report["cases"]:
        decode = case["decode_tokens_per_second"]
        assert case["runs"] == 2 and case["new_tokens"] == 12 and case["batch_size"] == (3 if "batch" in case["mode"] else 1)
        assert 0 < decode["low"] <= decode["median"] <= decode["high"]
        assert case["prefill_tokens_per_second"]["median"] > 0
        if not case["mode"].startswith(("speculative auto", "prompt lookup", "lookup then draft")):  # auto may settle on the main model alone, a lookup find nothing
            assert (case["mean_draft_length"] == 0) == case["mode"].startswith("main only")
    assert report["peak_rss_bytes"] > 50 * 2**20
    for case in report["cases"]:  # every case calls the main model; only proposals take draft time
        assert case["verify_milliseconds"] > 0 and (case["draft_milliseconds"] > 0) == (case["mean_draft_length"] > 0)
    costs = {(cost["mode"], cost["prompt_tokens"]): cost for cost in report["speculation"]}
    assert {"speculative k=4"} <= {mode for mode, _ in costs} <= set(single[1:])  # batch 1 against main only
    for (mode, prompt), cost in costs.items():
        case = next(case for case in report["cases"] if (case["mode"], case["prompt_tokens"]) == (mode, prompt))
        assert cost["tokens_per_verify"] == case["mean_accepted_length"] and cost["free_draft_bound"] == pytest.approx(cost["tokens_per_verify"] / cost["verify_cost"])
    entry = read_manifest(tiny_artifact).models["main"]
    per_position = entry.num_layers * 2 * entry.num_kv_heads * entry.head_dim * 4  # fp32 keys and values
    assert report["main_only_kv_bytes_per_token"] == {"16": int(per_position * (16 + 5.5)), "40": int(per_position * (40 + 5.5))}
    for prompt, fraction in report["main_only_bandwidth_fraction"].items():
        weights_and_kv = report["main_active_weight_bytes_per_token"] + report["main_only_kv_bytes_per_token"][prompt]
        assert report["main_only_bandwidth_fraction_with_kv"][prompt] == pytest.approx(fraction * weights_and_kv / report["main_active_weight_bytes_per_token"])
    reads = {prompt: report["main_active_weight_bytes_per_token"] + kv for prompt, kv in report["main_only_kv_bytes_per_token"].items()}
    growth = report["main_only_cost_growth"]
    assert (growth["from"], growth["to"]) == (16, 40) and growth["bytes_growth"] == round(reads["40"] / reads["16"] - 1, 4) > 0
    single_runs = {case["prompt_tokens"]: case["decode_by_run"] for case in report["cases"] if case["mode"] == "main only"}
    by_round = sorted(short / long - 1 for short, long in zip(single_runs[16], single_runs[40]))  # paired within each round
    assert growth["growth_by_round"] == {"median": round(statistics.median(by_round), 4), "low": round(by_round[0], 4), "high": round(by_round[-1], 4)}

    code, out, _ = _moecc("bench", str(tiny_artifact), "--prompt-tokens", "100000", "--json")
    assert code == 1 and "exceed the maximum sequence length" in json.loads(out)["error"]
    code, out, _ = _moecc("bench", str(tiny_artifact), "--prompt-tokens", "128", "--runs", "10000", "--json")
    assert code == 1 and "too few for 10000 runs of 1 prompts of 128 tokens" in json.loads(out)["error"]
