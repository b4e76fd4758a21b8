"""Benchmark a built pair side by side: our runtime against transformers, speculative against main-only.

    .venv/bin/python scripts/bench_vs_transformers.py --recipe recipes/tiny-coder.yaml --artifact artifacts/tiny-coder
    .venv/bin/python scripts/bench_vs_transformers.py --recipe recipes/bench-moe.yaml --artifact artifacts/bench-moe \
        --prompts 4 --new-tokens 64 --heldout-tokens 0 --draft-lengths 4 auto

Prints one table and writes JSON. Decode figures are tokens/s over held-out prompts with the
end-of-text token ignored, so every run produces the same number of tokens; ratios are what
matter on a shared machine, so both sides run in this process, one after the other, on the same threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

import runtime
from compiler import corpus
from compiler.pipeline import with_generated_weights
from compiler.recipe import load_recipe
from runtime.evaluate import perplexity
from runtime.speculative import GenerationStats


def ours(generator, prompts, new_tokens, sampling=None, **options):
    """Aggregate stats over prompts: total tokens / total seconds, acceptance over all proposals."""
    total = GenerationStats()
    outputs = []
    for ids in prompts:
        stats = GenerationStats()
        steps = generator.stream_ids(ids, max_new_tokens=new_tokens, stats=stats, stop_tokens=set(), sampling=sampling, **options)
        outputs.append([t for step in steps for t in step])
        for field in ("new_tokens", "seconds", "draft_seconds", "verify_seconds", "verify_calls", "proposed", "accepted"):
            setattr(total, field, getattr(total, field) + getattr(stats, field))
        total.draft_lengths.extend(stats.draft_lengths)
    return total, outputs


def theirs(model, prompts, new_tokens, assistant=None):
    tokens = seconds = 0.0
    outputs = []
    for ids in prompts:
        inputs = torch.tensor([ids])
        started = time.perf_counter()
        with torch.no_grad():
            result = model.generate(
                inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                assistant_model=assistant, pad_token_id=0,
            )
        seconds += time.perf_counter() - started
        generated = result[0, len(ids) :].tolist()
        tokens += len(generated)
        outputs.append(generated)
    return tokens / seconds, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/tiny-coder.yaml"))
    parser.add_argument("--artifact", type=Path, default=Path("artifacts/tiny-coder"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heldout-tokens", type=int, default=65536, help="held-out tokens for perplexity (0: skip)")
    parser.add_argument("--draft-lengths", nargs="+", default=["1", "2", "4", "8", "auto"], help="speculative settings to measure")
    parser.add_argument("--json-out", type=Path, default=None, help="default: artifacts/bench-NAME-vs-transformers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)

    loaded = with_generated_weights(load_recipe(args.recipe), Path("artifacts/.cache"))  # random-init recipes: their generated weights
    generator = runtime.load(args.artifact, threads=args.threads)
    prompts = [generator.encode(text) for text in corpus.heldout_prompts(args.prompts)]
    results: dict = {"threads": args.threads, "prompts": len(prompts), "new_tokens": args.new_tokens}

    # Perplexity on held-out standard-library text, both models through ONNX Runtime.
    heldout = []
    for path in corpus.stdlib_files("heldout"):
        heldout.extend(generator.encode(corpus.read_text(path)))
        if len(heldout) >= args.heldout_tokens:
            break
    heldout = heldout[: args.heldout_tokens]
    if heldout:
        results["perplexity"] = {role: round(perplexity(getattr(generator, role), heldout), 3) for role in ("main", "draft")}

    main_only, reference = ours(generator, prompts, args.new_tokens, speculative=False)
    results["ours_main_only_tps"] = round(main_only.tokens_per_second, 1)
    results["speculative"] = {}
    for k in (int(k) if k.isdigit() else k for k in args.draft_lengths):
        spec, outputs = ours(generator, prompts, args.new_tokens, draft_length=k)
        assert outputs == reference, f"speculative greedy diverged from main-only greedy at draft length {k}"
        sampled, _ = ours(generator, prompts, args.new_tokens, draft_length=k, sampling=runtime.SamplingParams(temperature=0.8, seed=0))
        results["speculative"][k] = {
            "tokens_per_second": round(spec.tokens_per_second, 1),
            "speedup_vs_main_only": round(spec.tokens_per_second / main_only.tokens_per_second, 2),
            "acceptance_greedy": round(spec.acceptance_rate, 3),
            "mean_accepted_length": round(spec.mean_accepted_length, 2),
            "acceptance_sampled_t0.8": round(sampled.acceptance_rate, 3),
            "draft_share_of_time": round(spec.draft_seconds / spec.seconds, 2),
        }

    main_model = AutoModelForCausalLM.from_pretrained(loaded.main_checkpoint, dtype=torch.float32).eval()
    layers = loaded.recipe.draft.layers  # a derived draft: the same checkpoint cut after its first layers
    overrides = {"num_hidden_layers": layers} if layers else {}
    draft_model = AutoModelForCausalLM.from_pretrained(loaded.draft_checkpoint, dtype=torch.float32, **overrides).eval()
    hf_tps, hf_outputs = theirs(main_model, prompts, args.new_tokens)
    hf_assisted_tps, _ = theirs(main_model, prompts, args.new_tokens, assistant=draft_model)
    agreement = statistics.mean(float(np.mean(np.array(a) == np.array(b))) for a, b in zip(hf_outputs, reference))
    default_k = generator.manifest.generation.draft_length
    if default_k not in results["speculative"]:
        default_k = next(iter(results["speculative"]))
    best = results["speculative"][default_k]
    results |= {
        "transformers_main_only_tps": round(hf_tps, 1),
        "transformers_assisted_tps": round(hf_assisted_tps, 1),
        "ratio_main_only_vs_transformers": round(main_only.tokens_per_second / hf_tps, 2),
        "ratio_speculative_vs_transformers_assisted": round(best["tokens_per_second"] / hf_assisted_tps, 2),
        "greedy_token_agreement_with_transformers": round(agreement, 4),
    }

    table = Table(title=f"{generator.manifest.name}: {len(prompts)} held-out prompts x {args.new_tokens} tokens, {args.threads} threads")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("held-out perplexity main / draft", f"{results['perplexity']['main']} / {results['perplexity']['draft']}")] if heldout else []
    rows += [
        ("ours main-only tokens/s", results["ours_main_only_tps"]),
        ("transformers generate tokens/s", results["transformers_main_only_tps"]),
        ("ratio main-only ours / transformers", results["ratio_main_only_vs_transformers"]),
        ("transformers assisted tokens/s", results["transformers_assisted_tps"]),
        (f"ratio speculative (k={default_k}) ours / transformers assisted", results["ratio_speculative_vs_transformers_assisted"]),
        ("greedy token agreement with transformers", results["greedy_token_agreement_with_transformers"]),
    ]
    for k, row in results["speculative"].items():
        rows.append(
            (f"speculative k={k}: tokens/s, speed-up, acceptance greedy / T=0.8, mean accepted",
             f"{row['tokens_per_second']}, {row['speedup_vs_main_only']}x, {row['acceptance_greedy']} / {row['acceptance_sampled_t0.8']}, {row['mean_accepted_length']}")
        )
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    json_out = args.json_out or Path("artifacts") / f"bench-{generator.manifest.name}-vs-transformers.json"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {json_out}")


if __name__ == "__main__":
    main()
