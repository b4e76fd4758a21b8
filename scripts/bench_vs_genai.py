"""Benchmark one model of a built artifact against onnxruntime-genai on the same checkpoint, same precision.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python scripts/bench_vs_genai.py --recipe recipes/small-coder-float-draft.yaml --model draft

The artifact (default: artifacts/NAME, NAME the recipe's) must have been built from the recipe's checkpoints.

onnxruntime-genai's own model builder converts the Hugging Face checkpoint (fp32, CPU) into its cache
folder; both runtimes then decode the same held-out prompts greedily for the same number of new tokens
(end-of-text ignored), on the same threads, in alternating rounds so that the machine's drift hits both
alike; each side starts once the other's threads have gone idle (onnxruntime-genai's keep spinning for
about 70 ms after its last token, which would take a core from ours). Both also decode the same tokens with
prompt lookup (genai's n-gram speculative decoding), compared on a row of its own. Prints a table and writes
JSON. The ratio to read is the median of the rounds' own ratios: a round's two sides run seconds apart, so
the machine's drift over the whole run moves it less than a ratio of medians; the table gives the rounds'
range, the JSON every round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from rich.console import Console
from rich.table import Table

import runtime
from compiler import corpus
from compiler.pipeline import check_built_from, with_generated_weights
from compiler.recipe import load_recipe
from runtime.benchmark import wait_until_idle
from runtime.errors import MoeccError
from runtime.sampling import SamplingParams
from runtime.speculative import FixedDraftLength, GenerationStats, LookupDraft, decode


GENAI_NGRAM_SIZE = 3  # its fastest on the shipped draft of sizes 2 to 4, at 8 tokens a step (1.8-2.0x its plain decoding)


def build_genai_model(checkpoint: Path, folder: Path) -> Path:
    """onnxruntime-genai's builder, once per checkpoint (fp32 weights and activations on CPU, as ours)."""
    if not (folder / "genai_config.json").exists():
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(folder),
                   "-p", "fp32", "-e", "cpu", "-c", str(folder / "cache")]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return folder


def genai_decode(model: og.Model, prompt: list[int], new_tokens: int, ngram: dict | None = None) -> tuple[list[int], float, float]:
    """Greedy tokens, prefill seconds (the prompt and the first logits), decode seconds; with `ngram`, its
    n-gram speculative decoding (its prompt lookup) with those options."""
    params = og.GeneratorParams(model)
    length = len(prompt) + new_tokens
    params.set_search_options(do_sample=False, max_length=length, min_length=length)  # min_length: end-of-text ignored
    if ngram:
        params.set_speculative_options(**ngram)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(prompt)
    prefilled = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    finished = time.perf_counter()
    return list(generator.get_sequence(0)[len(prompt) :]), prefilled - started, finished - prefilled


def ours_decode(decoder, prompt: list[int], new_tokens: int, lookup_tokens: int = 0) -> tuple[list[int], float, float]:
    """The same greedy loop as main-only generation, on the chosen model's own KV cache; with lookup_tokens,
    the model verifies up to that many prompt-lookup proposals per step (the same tokens, fewer calls)."""
    stats = GenerationStats()
    draft = LookupDraft(decoder.entry.vocab_size) if lookup_tokens else None
    steps = decode(decoder.new_cache(), draft, prompt, new_tokens, FixedDraftLength(lookup_tokens or 1), SamplingParams(), set(), stats)
    tokens = [token for step in steps for token in step]
    return tokens, stats.prefill_seconds, stats.seconds - stats.prefill_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/tiny-coder.yaml"))
    parser.add_argument("--artifact", type=Path, help="default: artifacts/NAME, NAME the recipe's")
    parser.add_argument("--model", choices=("main", "draft"), default="draft", help="the genai builder covers dense models")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--genai-ngram-size", type=int, default=GENAI_NGRAM_SIZE, help="onnxruntime-genai's n-gram size for its prompt lookup")
    parser.add_argument("--kernels", choices=runtime.KERNELS, default="auto", help="our attention, MoE and MatMul kernels or ONNX Runtime's (runtime.load)")
    parser.add_argument("--json-out", type=Path, default=None, help="default: artifacts/bench-NAME-vs-genai.json")
    args = parser.parse_args()
    console = Console(width=140)

    loaded = with_generated_weights(load_recipe(args.recipe), Path("artifacts/.cache"))
    checkpoint = loaded.main_checkpoint if args.model == "main" else loaded.draft_checkpoint
    artifact = args.artifact or Path("artifacts") / loaded.recipe.name
    try:
        manifest = check_built_from(artifact, loaded)
    except MoeccError as error:
        raise SystemExit(str(error)) from None
    precision = manifest.models[args.model].precision
    if precision != "fp32":  # the builder converts the checkpoint in float32
        raise SystemExit(f"{artifact}'s {args.model} model is {precision}, onnxruntime-genai's here fp32: compare the same "
                         f"precision, e.g. --recipe recipes/small-coder-float-draft.yaml")
    generator = runtime.load(artifact, threads=args.threads, kernels=args.kernels)
    decoder = getattr(generator, args.model)
    config = og.Config(str(build_genai_model(checkpoint, Path("artifacts/.cache/genai") / f"{loaded.recipe.name}-{args.model}")))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    genai = og.Model(config)
    prompts = [generator.encode(text) for text in corpus.heldout_prompts(args.prompts)]

    lookup_tokens = generator.manifest.generation.max_draft_length  # what the runtime's "auto" proposes with a lookup
    ngram = {"ngram_size": args.genai_ngram_size, "max_draft_tokens": lookup_tokens}  # the same length both sides
    sides = {
        "moecc": lambda p: ours_decode(decoder, p, args.new_tokens),
        "onnxruntime-genai": lambda p: genai_decode(genai, p, args.new_tokens),
        "moecc prompt lookup": lambda p: ours_decode(decoder, p, args.new_tokens, lookup_tokens),
        "onnxruntime-genai n-gram": lambda p: genai_decode(genai, p, args.new_tokens, ngram),
    }
    rates: dict[str, dict[str, list[float]]] = {side: {"decode": [], "end_to_end": []} for side in sides}
    outputs: dict[str, list[list[int]]] = {}
    for round_index in range(args.rounds + 1):  # round 0 warms both up and is not counted
        for side, run in sides.items():
            tokens = prefill = decoding = 0.0
            outputs[side] = []
            if not wait_until_idle():  # the other side's thread pool may still be spinning
                console.print(f"[yellow]{side}: threads still running after 2 s; this round's figures may read low[/yellow]")
            for prompt in prompts:
                generated, prefill_seconds, decode_seconds = run(prompt)
                outputs[side].append(generated)
                tokens, prefill, decoding = tokens + len(generated), prefill + prefill_seconds, decoding + decode_seconds
            if round_index:
                rates[side]["decode"].append(tokens / decoding)
                rates[side]["end_to_end"].append(tokens / (prefill + decoding))
    agreement = statistics.mean(float(np.mean(np.array(a) == np.array(b))) for a, b in zip(outputs["moecc"], outputs["onnxruntime-genai"]))
    assert outputs["moecc prompt lookup"] == outputs["moecc"], "prompt lookup changed the greedy tokens"
    assert outputs["onnxruntime-genai n-gram"] == outputs["onnxruntime-genai"], "onnxruntime-genai's n-gram decoding changed its greedy tokens"

    results = {
        "model": args.model, "checkpoint": str(checkpoint), "threads": args.threads, "prompts": len(prompts),
        "new_tokens": args.new_tokens, "rounds": args.rounds, "onnxruntime_genai_version": og.__version__,
        "greedy_token_agreement": round(agreement, 4), "moecc_kernels": list(decoder.kernels),
    }
    table = Table(title=f"{loaded.recipe.name} {args.model}: {len(prompts)} held-out prompts x {args.new_tokens} tokens, "
                        f"{args.threads} threads, {args.rounds} rounds (ratio: the median of the rounds' ratios, their range); our kernels: {', '.join(decoder.kernels) or 'none'}")
    for column in ("measure", "moecc", "onnxruntime-genai", "ratio"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    def compared(ours_side: str, genai_side: str, kind: str) -> dict:
        """Both sides' median rates, each round's ratio and their median."""
        ours, theirs = rates[ours_side][kind], rates[genai_side][kind]
        ratios = [a / b for a, b in zip(ours, theirs)]
        return {
            "moecc_tokens_per_second": round(statistics.median(ours), 1), "genai_tokens_per_second": round(statistics.median(theirs), 1),
            "ratio": round(statistics.median(ratios), 2), "round_ratios": [round(r, 3) for r in ratios],
            "moecc_rounds": [round(r, 1) for r in ours], "genai_rounds": [round(r, 1) for r in theirs],
        }

    def add_row(measure: str, figures: dict) -> None:
        spread = f" ({min(figures['round_ratios']):.2f}-{max(figures['round_ratios']):.2f})"
        table.add_row(measure, f"{figures['moecc_tokens_per_second']:.1f}", f"{figures['genai_tokens_per_second']:.1f}", f"{figures['ratio']:.2f}x{spread}")

    for kind in ("decode", "end_to_end"):
        results[kind] = compared("moecc", "onnxruntime-genai", kind)
        add_row(f"{kind.replace('_', '-')} tokens/s", results[kind])
    results["decode_with_prompt_lookup"] = compared("moecc prompt lookup", "onnxruntime-genai n-gram", "decode") | {"lookup_tokens": lookup_tokens, "genai_ngram_options": ngram}
    add_row(f"decode tokens/s, prompt lookup of {lookup_tokens} (genai: n-gram)", results["decode_with_prompt_lookup"])
    table.add_row("greedy token agreement", "", "", f"{agreement:.4f}")
    console.print(table)
    json_out = args.json_out or Path("artifacts") / f"bench-{loaded.recipe.name}-{args.model}-vs-genai.json"
    json_out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {json_out}")


if __name__ == "__main__":
    main()
