"""Benchmark the shipped pair's quantized variants side by side, in one table.

    .venv/bin/python scripts/bench_quantization.py

Builds fp32, INT8 weight-only, W8A8 (percentile; min-max with SmoothQuant), INT4 round-to-nearest, INT4
GPTQ and mixed INT8/INT4 from the shipped recipes (variants change the recipe's quantize block), then measures for each: artifact
size against fp32, the main model's held-out perplexity and top-1 agreement with the fp32 main model
(standard-library files no recipe calibrates on), main-only greedy decode tokens/s and speculative
acceptance. Writes JSON next to the artifacts.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from bench_vs_transformers import ours  # scripts/ is on the path when this file runs as a script
from rich.console import Console
from rich.table import Table

import runtime
from compiler import corpus
from compiler.pipeline import build
from compiler.recipe import load_recipe
from runtime.evaluate import next_token_nll

VARIANTS = (  # label, recipe, quantize settings changed for the benchmark
    ("fp32", "tiny-coder", {}),
    ("INT8 weight-only", "tiny-coder-int8", {}),
    ("INT8 W8A8 (static, percentile)", "tiny-coder-w8a8", {}),
    ("INT8 W8A8 (static, min-max, SmoothQuant 0.5)", "tiny-coder-w8a8", {"activation_range": "minmax", "smoothquant": 0.5}),
    ("INT4 RTN", "tiny-coder-int4", {"method": "rtn"}),
    ("INT4 GPTQ", "tiny-coder-int4", {}),
    ("mixed: hot experts INT8, rest INT4 GPTQ", "tiny-coder-mixed", {}),
)


def scores(decoder, tokens: list[int], window: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Next-token NLL and argmax at every position but the last of each window."""
    losses, predictions = [], []
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start : start + window + 1]
        logits = decoder.new_cache(capacity=len(chunk)).feed(chunk[:-1])  # [S,V]
        losses.append(next_token_nll(logits, np.asarray(chunk[1:])))
        predictions.append(logits.argmax(axis=-1))
    return np.concatenate(losses), np.concatenate(predictions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("artifacts"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heldout-tokens", type=int, default=32768)
    parser.add_argument("--json-out", type=Path, default=Path("artifacts/bench-quantization.json"))
    args = parser.parse_args()
    console = Console(width=200)  # the table is wide; keep it whole in logs

    rows, reference = [], None
    for label, recipe_name, changes in VARIANTS:
        loaded = load_recipe(Path("recipes") / f"{recipe_name}.yaml")
        if changes:
            recipe = loaded.recipe
            recipe = recipe.model_copy(update={"name": f"{recipe.name}-bench", "quantize": recipe.quantize.model_copy(update=changes)})
            loaded = loaded.model_copy(update={"recipe": recipe})
        console.print(f"building {loaded.recipe.name} ...")
        generator = runtime.load(build(loaded, args.output).artifact, threads=args.threads)
        if reference is None:
            heldout = []
            for path in corpus.stdlib_files("heldout")[::-1]:  # from the end: the calibration text is read from the start
                heldout.extend(generator.encode(corpus.read_text(path)))
                if len(heldout) >= args.heldout_tokens:
                    break
            heldout = heldout[: args.heldout_tokens]
            prompts = [generator.encode(text) for text in corpus.heldout_prompts(args.prompts)]
        nll, top1 = scores(generator.main, heldout)
        main_only, _, greedy = ours(generator, prompts, args.new_tokens, speculative=False)
        speculative, _, outputs = ours(generator, prompts, args.new_tokens, draft_length=4)
        assert outputs == greedy, f"{label}: speculative greedy diverged from the same artifact's main-only greedy"
        row = {
            "variant": label,
            "precision": generator.manifest.models["main"].precision,
            "bytes": sum(f.size for f in generator.manifest.files.values()),
            "perplexity": math.exp(nll.mean()),
            "top1": top1,
            "decode_tps": main_only.tokens_per_second,
            "speculative_tps": speculative.tokens_per_second,
            "acceptance": speculative.acceptance_rate,
        }
        reference = reference or row
        rows.append(row)

    table = Table(title=f"shipped pair quantized: main model on {len(heldout):,} held-out tokens; decode over {len(prompts)} prompts x {args.new_tokens} tokens, {args.threads} threads")
    for column in ("variant", "precision", "size", "vs fp32", "perplexity", "change", "top-1 vs fp32", "decode tok/s", "speculative k=4 tok/s", "acceptance"):
        table.add_column(column, justify="left" if column in ("variant", "precision") else "right")
    results = []
    for row in rows:
        summary = {
            "variant": row["variant"], "precision": row["precision"], "bytes": row["bytes"],
            "size_vs_fp32": round(row["bytes"] / reference["bytes"], 3),
            "perplexity": round(row["perplexity"], 4), "perplexity_change": round(row["perplexity"] / reference["perplexity"] - 1, 5),
            "top1_agreement_vs_fp32": round(float((row["top1"] == reference["top1"]).mean()), 4),
            "decode_tokens_per_second": round(row["decode_tps"], 1), "speculative_tokens_per_second": round(row["speculative_tps"], 1),
            "acceptance": round(row["acceptance"], 3),
        }
        results.append(summary)
        table.add_row(
            summary["variant"], summary["precision"], f"{row['bytes'] / 2**20:.1f} MiB", f"{summary['size_vs_fp32']:.2f}x",
            f"{summary['perplexity']:.3f}", f"{summary['perplexity_change']:+.2%}", f"{summary['top1_agreement_vs_fp32']:.3f}",
            f"{summary['decode_tokens_per_second']:.0f}", f"{summary['speculative_tokens_per_second']:.0f}", f"{summary['acceptance']:.3f}",
        )
    console.print(table)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"heldout_tokens": len(heldout), "threads": args.threads, "variants": results}, indent=2))
    console.print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
