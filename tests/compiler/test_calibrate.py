"""Calibration: routing statistics measured with ONNX Runtime agree with transformers; rare experts are reported."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from compiler.checkpoint import Checkpoint
from compiler.pipeline import build
from compiler.recipe import calibration_text, load_recipe
from compiler.stages import calibrate, export


def _stage_result(manifest, model="main"):
    return next(r.result for r in manifest.stages if r.stage == "calibrate" and r.model == model)


def test_routing_counts_match_transformers(tiny_pair, tmp_path):
    report = build(load_recipe(tiny_pair / "tiny.yaml"), tmp_path)
    routing = _stage_result(report.manifest)
    assert routing["tokens"] == 1024 and routing["moe_layers"] == 2
    assert all(sum(layer) == 1024 * 2 for layer in routing["tokens_per_expert"])  # top-2 of every token

    model = AutoModelForCausalLM.from_pretrained(tiny_pair / "main", dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(tiny_pair / "main" / "tokenizer.json"))
    ids = tokenizer.encode(calibration_text(load_recipe(tiny_pair / "tiny.yaml"))).ids[:1024]
    expected = np.zeros((2, 8), np.int64)
    with torch.no_grad():
        for start in range(0, len(ids), 256):
            router = model(torch.tensor([ids[start : start + 256]]), output_router_logits=True).router_logits
            for layer, logits in enumerate(router):
                np.add.at(expected[layer], torch.topk(logits, 2, dim=-1).indices.flatten().numpy(), 1)
    assert np.array_equal(np.array(routing["tokens_per_expert"]), expected)
    assert _stage_result(report.manifest, "draft")["moe_layers"] == 0  # dense: nothing to route


def test_rarely_routed_experts_are_reported(tiny_pair, tmp_path):
    """Three tokens of text cannot reach all 8 experts with top-2: the unrouted ones are named with 0 tokens."""
    checkpoint = Checkpoint(tiny_pair / "main")
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    export.run(checkpoint, export.ExportConfig(max_sequence_length=64), export_dir)
    config = calibrate.CalibrateConfig(text_sha256="x", max_tokens=3, window=64, min_tokens_per_expert=1)
    out = tmp_path / "calibrate"
    out.mkdir()
    ids = Tokenizer.from_file(str(tiny_pair / "main" / "tokenizer.json")).encode("def f(x): return x").ids
    result = calibrate.run(checkpoint, config, out, export_dir=export_dir, ids=ids)
    assert result.tokens == 3
    unrouted = [(r.layer, r.expert) for r in result.rarely_routed]
    counts = np.array(result.tokens_per_expert)
    assert unrouted and all(counts[layer, expert] == 0 for layer, expert in unrouted)
    assert len(unrouted) == int((counts == 0).sum())
    assert (out / calibrate.ROUTING_FILE).is_file()


def test_cached_key_and_value_ranges_match_transformers(tiny_pair, tmp_path):
    """The INT8 KV cache's ranges: per KV head and channel, the largest |value| and the largest norm of each
    rotated pair of key channels (i, i + D/2), over the keys and values transformers caches for the same windows."""
    checkpoint = Checkpoint(tiny_pair / "main")
    export_dir, out = tmp_path / "export", tmp_path / "calibrate"
    export_dir.mkdir(), out.mkdir()
    export.run(checkpoint, export.ExportConfig(max_sequence_length=128), export_dir)
    ids = Tokenizer.from_file(str(tiny_pair / "main" / "tokenizer.json")).encode(calibration_text(load_recipe(tiny_pair / "tiny.yaml"))).ids[:256]
    calibrate.run(checkpoint, calibrate.CalibrateConfig(text_sha256="x", max_tokens=256, window=128, min_tokens_per_expert=1), out, export_dir=export_dir, ids=ids)
    measured = calibrate.read_statistics(out, ("kv_key", "kv_value"))

    model = AutoModelForCausalLM.from_pretrained(tiny_pair / "main", dtype=torch.float32).eval()
    layers = model.config.num_hidden_layers
    keys, values = [0.0] * layers, [0.0] * layers
    with torch.no_grad():
        for start in (0, 128):
            cache = model(torch.tensor([ids[start : start + 128]]), use_cache=True).cache
            for layer in range(layers):
                key, value = cache.layers[layer].keys[0].numpy(), cache.layers[layer].values[0].numpy()  # [KV heads, T, D], keys rotated
                half = key.shape[-1] // 2
                pair_norm = np.sqrt(key[..., :half] ** 2 + key[..., half:] ** 2).max(axis=1)
                keys[layer] = np.maximum(keys[layer], np.concatenate([pair_norm, pair_norm], axis=-1))
                values[layer] = np.maximum(values[layer], np.abs(value).max(axis=1))
    assert len(measured) == 2 * layers
    for layer in range(layers):
        np.testing.assert_allclose(measured[calibrate.statistics_key("kv_key", str(layer))], keys[layer], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(measured[calibrate.statistics_key("kv_value", str(layer))], values[layer], rtol=1e-4, atol=1e-5)
