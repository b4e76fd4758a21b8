"""Benchmark a built pair side by side: our runtime against transformers, speculative against main-only.

Three pairings: main-only against transformers' generate, speculative decoding with the draft model
against its assisted generation with the same draft, and our prompt lookup against its prompt lookup;
and ours alone: lookup-then-draft (copies where the text repeats, the draft elsewhere) against main-only.

    .venv/bin/python scripts/bench_vs_transformers.py --recipe recipes/tiny-coder.yaml
    .venv/bin/python scripts/bench_vs_transformers.py --recipe recipes/bench-moe.yaml \
        --prompts 4 --new-tokens 64 --heldout-tokens 0 --draft-lengths 4 auto

The artifact (default: artifacts/NAME, NAME the recipe's) must have been built from the recipe's checkpoints.

Prints one table and writes JSON. Figures are tokens/s over held-out prompts with the end-of-text token
ignored, so every run produces the same number of tokens: end to end (the prompt's reading included), and
decode (the tokens after each generation's first step, over the time after it; the first step reads the
prompt). Ratios are what matter on a shared machine: both sides run in this process on the same threads,
in alternating rounds after a warm-up round, each side starting once the other's threads have gone idle,
and each ratio against transformers is the median of the rounds' own ratios. Our own settings take turns
on each prompt (main-only, each draft length, the lookups), and a speed-up over main-only is the median of
the per-prompt ratios: measured a round apart, one setting after the other over all prompts, k = 4's
speed-up on small-coder read 1.61x to 1.99x in three rounds of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

import runtime
from compiler import corpus
from compiler.pipeline import check_built_from, with_generated_weights
from compiler.recipe import load_recipe
from compiler.reference_weights import take_exported_weights
from runtime.benchmark import wait_until_idle
from runtime.errors import MoeccError
from runtime.evaluate import perplexity
from runtime.prompt_lookup import MAX_NGRAM
from runtime.speculative import GenerationStats

MAIN_ONLY = "ours main only"


def _start_idle() -> None:
    if not wait_until_idle():
        print("warning: threads still running after 2 s; this side's figures may read low", file=sys.stderr)


class FirstStepClock(BaseStreamer):
    """When generate's first step ended and how many tokens it gave: its first put() is the prompt."""

    def __init__(self):
        self.puts, self.tokens, self.at = 0, 0, 0.0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.tokens, self.at = value.numel(), time.perf_counter()

    def end(self) -> None:
        pass


def decode_rate(tokens: float, seconds: float) -> float:
    if not tokens:
        raise SystemExit("every generation ended in its first step, so there is no decode figure: raise --new-tokens")
    return tokens / seconds


@dataclass
class Ours:
    """One of our settings over a round's prompts: stats summed (acceptance over all proposals), the outputs,
    and each prompt's seconds end to end and after its first step (which reads the prompt)."""

    total: GenerationStats = field(default_factory=GenerationStats)
    outputs: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)

    def generate(self, generator, ids: list[int], new_tokens: int, sampling=None, **options) -> None:
        """One generation, timed here from the call to the stream's end, as theirs() times generate."""
        stats = GenerationStats()
        generated: list[int] = []
        started = time.perf_counter()
        first_step, first_tokens = started, 0
        for step in generator.stream_ids(ids, max_new_tokens=new_tokens, stats=stats, stop_tokens=set(), sampling=sampling, **options):
            if not generated:
                first_step, first_tokens = time.perf_counter(), len(step)
            generated.extend(step)
        finished = time.perf_counter()
        self.outputs.append(generated)
        self.seconds.append(finished - started)
        self.decode_tokens.append(len(generated) - first_tokens)
        self.decode_seconds.append(finished - first_step)
        self.total.seconds += finished - started
        for name in ("new_tokens", "draft_seconds", "verify_seconds", "verify_calls", "proposed", "accepted"):
            setattr(self.total, name, getattr(self.total, name) + getattr(stats, name))
        self.total.draft_lengths.extend(stats.draft_lengths)

    @property
    def decode_rate(self) -> float:
        return decode_rate(sum(self.decode_tokens), sum(self.decode_seconds))

    def speedups_over(self, main_only: Ours) -> tuple[list[float], list[float]]:
        """Per prompt, this setting's speed over main-only's: end to end, and after the first step."""
        end_to_end = [main / mine for main, mine in zip(main_only.seconds, self.seconds)]
        decode = [(tokens / seconds) / (main_tokens / main_seconds) for tokens, seconds, main_tokens, main_seconds
                  in zip(self.decode_tokens, self.decode_seconds, main_only.decode_tokens, main_only.decode_seconds)]  # fmt: skip
        return end_to_end, decode


def ours_in_turn(generator, prompts, new_tokens, settings: dict[str, dict]) -> dict[str, Ours]:
    """Every setting (name -> stream options) on each prompt before the next prompt is taken, so that the
    machine's drift (main-only decoding ran 1.26x faster in one round than in another of one run here) reaches
    all alike."""
    runs = {name: Ours() for name in settings}
    _start_idle()  # PyTorch's threads spin a while after its last call
    for ids in prompts:
        for name, options in settings.items():
            runs[name].generate(generator, ids, new_tokens, **options)
    return runs


def theirs(model, prompts, new_tokens, assistant=None, lookup_tokens=None):
    """transformers' generate: alone, assisted by a draft model, or with its prompt lookup (lookup_tokens
    proposals); tokens/s end to end and after each first step, and the outputs."""
    lookup = {"prompt_lookup_num_tokens": lookup_tokens, "max_matching_ngram_size": MAX_NGRAM} if lookup_tokens else {}
    tokens = seconds = decode_tokens = decode_seconds = 0.0
    outputs = []
    _start_idle()
    for ids in prompts:
        inputs = torch.tensor([ids])
        clock = FirstStepClock()
        started = time.perf_counter()
        with torch.no_grad():
            result = model.generate(
                inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                assistant_model=assistant, pad_token_id=0, streamer=clock, **lookup,
            )
        finished = time.perf_counter()
        generated = result[0, len(ids) :].tolist()
        tokens += len(generated)
        seconds += finished - started
        decode_tokens += len(generated) - clock.tokens
        decode_seconds += finished - clock.at
        outputs.append(generated)
    return tokens / seconds, decode_rate(decode_tokens, decode_seconds), outputs


def assistant_weights(draft_model, generator, artifact: Path) -> str:
    """Give transformers' assistant the draft our runtime runs: a draft whose products the recipe quantized
    takes their dequantized weights (compiler.reference_weights). Our runtime also rounds such a draft's
    activations to 8 bits, as the artifact's MatMulNBits accuracy level asks and transformers does not: on
    small-coder that moves the draft's greedy agreement with the main model from 0.858 to 0.856 (24 held-out
    prompts, 128 tokens each). Returns which weights it has, for the table."""
    if generator.manifest.models["draft"].precision == "fp32":
        return "the checkpoint's"
    try:
        take_exported_weights(draft_model, onnx.load(str(artifact / "draft" / "model.onnx")))
    except ValueError as error:  # a derived draft's quantized experts, for one
        return f"the checkpoint's float weights, not the artifact's {generator.manifest.models['draft'].precision} ones ({error})"
    return f"the artifact's, {generator.manifest.models['draft'].precision} dequantized"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/tiny-coder.yaml"))
    parser.add_argument("--artifact", type=Path, help="default: artifacts/NAME, NAME the recipe's")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds after the warm-up round")
    parser.add_argument("--heldout-tokens", type=int, default=65536, help="held-out tokens for perplexity (0: skip)")
    parser.add_argument("--draft-lengths", nargs="+", default=["1", "2", "4", "8", "auto"], help="speculative settings to measure")
    parser.add_argument("--lookup-tokens", type=int, default=None, help="tokens a prompt lookup proposes per step, both sides (default: the artifact's max_draft_length)")
    parser.add_argument("--json-out", type=Path, default=None, help="default: artifacts/bench-NAME-vs-transformers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)

    loaded = with_generated_weights(load_recipe(args.recipe), Path("artifacts/.cache"))  # random-init recipes: their generated weights
    artifact = args.artifact or Path("artifacts") / loaded.recipe.name
    try:
        check_built_from(artifact, loaded)
    except MoeccError as error:
        raise SystemExit(str(error)) from None
    generator = runtime.load(artifact, threads=args.threads)
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

    main_model = AutoModelForCausalLM.from_pretrained(loaded.main_checkpoint, dtype=torch.float32).eval()
    layers = loaded.recipe.draft.layers  # a derived draft: the same checkpoint cut after its first layers
    overrides = {"num_hidden_layers": layers} if layers else {}
    if loaded.recipe.draft.experts_per_token:  # or routed to fewer experts
        overrides["num_experts_per_tok"] = loaded.recipe.draft.experts_per_token
    draft_model = AutoModelForCausalLM.from_pretrained(loaded.draft_checkpoint, dtype=torch.float32, **overrides).eval()
    results["transformers_draft"] = assistant_weights(draft_model, generator, artifact)
    lengths = [int(k) if k.isdigit() else k for k in args.draft_lengths]
    lookup_tokens = args.lookup_tokens or generator.manifest.generation.max_draft_length  # what our "auto" proposes with a lookup

    settings = {MAIN_ONLY: {"speculative": False}} | {f"ours speculative {k}": {"draft_length": k} for k in lengths}
    settings |= {"ours prompt lookup": {"proposer": "prompt-lookup", "draft_length": lookup_tokens}, "ours lookup then draft": {"proposer": "lookup-then-draft"}}
    rounds: dict[str, list[float]] = {}  # measure -> tokens/s per counted round
    speedups: dict[str, list[float]] = {}  # our setting (", decode": after the first step) -> its speed over main-only's, per prompt of the counted rounds
    for round_index in range(args.rounds + 1):  # round 0 warms both sides up
        measured = {}
        ran = ours_in_turn(generator, prompts, args.new_tokens, settings)
        reference = ran[MAIN_ONLY].outputs
        for name, run in ran.items():
            assert run.outputs == reference, f"{name} diverged from main-only greedy"
            measured[name], measured[f"{name}, decode"] = run.total.tokens_per_second, run.decode_rate
            if round_index:
                end_to_end, decode = run.speedups_over(ran[MAIN_ONLY])
                speedups.setdefault(name, []).extend(end_to_end)
                speedups.setdefault(f"{name}, decode", []).extend(decode)
        measured["transformers generate"], measured["transformers generate, decode"], hf_outputs = theirs(main_model, prompts, args.new_tokens)
        measured["transformers assisted"], measured["transformers assisted, decode"], _ = theirs(main_model, prompts, args.new_tokens, assistant=draft_model)
        measured["transformers prompt lookup"], measured["transformers prompt lookup, decode"], _ = theirs(
            main_model, prompts, args.new_tokens, lookup_tokens=lookup_tokens
        )
        if round_index:
            for k in lengths:
                spec = ran[f"ours speculative {k}"].total
                spec_stats = results.setdefault("speculative", {}).setdefault(k, {"acceptance": [], "accepted_length": [], "draft_share": []})
                spec_stats["acceptance"].append(spec.acceptance_rate)
                spec_stats["accepted_length"].append(spec.mean_accepted_length)
                spec_stats["draft_share"].append(spec.draft_seconds / spec.seconds)
            lookup, both = ran["ours prompt lookup"].total, ran["ours lookup then draft"].total
            lookup_stats = results.setdefault("prompt_lookup", {"acceptance": [], "accepted_length": []})
            lookup_stats["acceptance"].append(lookup.acceptance_rate)
            lookup_stats["accepted_length"].append(lookup.mean_accepted_length)
            results.setdefault("lookup_then_draft", {"accepted_length": []})["accepted_length"].append(both.mean_accepted_length)
            for name, value in measured.items():
                rounds.setdefault(name, []).append(value)

    def paired(numerator: str, denominator: str) -> float:
        """The median of the rounds' own ratios: for sides that cannot take turns on each prompt (transformers
        spins its threads a while after each call)."""
        return round(statistics.median(a / b for a, b in zip(rounds[numerator], rounds[denominator])), 2)

    def speedup(name: str) -> float:
        """Our setting's speed over main-only's: the median over the counted rounds' prompts."""
        return round(statistics.median(speedups[name]), 2)

    default_k = generator.manifest.generation.draft_length
    if default_k not in lengths:
        default_k = lengths[0]
    for k in lengths:
        collected = results["speculative"][k]
        sampling = {"draft_length": k, "sampling": runtime.SamplingParams(temperature=0.8, seed=0)}
        sampled = ours_in_turn(generator, prompts, args.new_tokens, {"sampled": sampling})["sampled"].total
        results["speculative"][k] = {
            "tokens_per_second": round(statistics.median(rounds[f"ours speculative {k}"]), 1),
            "speedup_vs_main_only": speedup(f"ours speculative {k}"),
            "speedup_decode_vs_main_only": speedup(f"ours speculative {k}, decode"),
            "acceptance_greedy": round(statistics.mean(collected["acceptance"]), 3),
            "mean_accepted_length": round(statistics.mean(collected["accepted_length"]), 2),
            "acceptance_sampled_t0.8": round(sampled.acceptance_rate, 3),
            "draft_share_of_time": round(statistics.mean(collected["draft_share"]), 2),
        }
    collected = results["prompt_lookup"]
    results["prompt_lookup"] = {
        "lookup_tokens": lookup_tokens,
        "tokens_per_second": round(statistics.median(rounds["ours prompt lookup"]), 1),
        "speedup_vs_main_only": speedup("ours prompt lookup"),
        "acceptance_greedy": round(statistics.mean(collected["acceptance"]), 3),
        "mean_accepted_length": round(statistics.mean(collected["accepted_length"]), 2),
        "transformers_tokens_per_second": round(statistics.median(rounds["transformers prompt lookup"]), 1),
        "transformers_speedup_vs_generate": paired("transformers prompt lookup", "transformers generate"),
        "ratio_vs_transformers_prompt_lookup": paired("ours prompt lookup", "transformers prompt lookup"),
        "ratio_decode_vs_transformers_prompt_lookup": paired("ours prompt lookup, decode", "transformers prompt lookup, decode"),
    }
    results["lookup_then_draft"] = {
        "draft_length": generator.manifest.generation.draft_length,  # the recipe's, for the draft's proposals
        "tokens_per_second": round(statistics.median(rounds["ours lookup then draft"]), 1),
        "speedup_vs_main_only": speedup("ours lookup then draft"),
        "mean_accepted_length": round(statistics.mean(results["lookup_then_draft"]["accepted_length"]), 2),
    }
    agreement = statistics.mean(float(np.mean(np.array(a) == np.array(b))) for a, b in zip(hf_outputs, reference))
    best = results["speculative"][default_k]
    results |= {
        "rounds": args.rounds,
        "ours_main_only_tps": round(statistics.median(rounds["ours main only"]), 1),
        "transformers_main_only_tps": round(statistics.median(rounds["transformers generate"]), 1),
        "transformers_assisted_tps": round(statistics.median(rounds["transformers assisted"]), 1),
        "ours_main_only_decode_tps": round(statistics.median(rounds["ours main only, decode"]), 1),
        "transformers_main_only_decode_tps": round(statistics.median(rounds["transformers generate, decode"]), 1),
        "ratio_main_only_vs_transformers": paired("ours main only", "transformers generate"),
        "ratio_main_only_decode_vs_transformers": paired("ours main only, decode", "transformers generate, decode"),
        "ratio_speculative_vs_transformers_assisted": paired(f"ours speculative {default_k}", "transformers assisted"),
        "ratio_speculative_decode_vs_transformers_assisted": paired(f"ours speculative {default_k}, decode", "transformers assisted, decode"),
        "greedy_token_agreement_with_transformers": round(agreement, 4),
        "tokens_per_second_by_round": {name: [round(v, 1) for v in values] for name, values in rounds.items()},
    }

    table = Table(title=f"{generator.manifest.name}: {len(prompts)} held-out prompts x {args.new_tokens} tokens, {args.threads} threads, "
                        f"medians of {args.rounds} rounds")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("held-out perplexity main / draft", f"{results['perplexity']['main']} / {results['perplexity']['draft']}")] if heldout else []
    rows += [
        ("ours main-only tokens/s, end to end / decode", f"{results['ours_main_only_tps']} / {results['ours_main_only_decode_tps']}"),
        ("transformers generate tokens/s, end to end / decode", f"{results['transformers_main_only_tps']} / {results['transformers_main_only_decode_tps']}"),
        ("ratio main-only ours / transformers, end to end / decode", f"{results['ratio_main_only_vs_transformers']} / {results['ratio_main_only_decode_vs_transformers']}"),
        ("transformers assisted tokens/s (its draft's weights: " + results["transformers_draft"] + ")", results["transformers_assisted_tps"]),
        (f"ratio speculative (k={default_k}) ours / transformers assisted, end to end / decode",
         f"{results['ratio_speculative_vs_transformers_assisted']} / {results['ratio_speculative_decode_vs_transformers_assisted']}"),
        ("greedy token agreement with transformers", results["greedy_token_agreement_with_transformers"]),
    ]
    for k, row in results["speculative"].items():
        rows.append(
            (f"speculative k={k}: tokens/s, speed-up end to end / decode, acceptance greedy / T=0.8, mean accepted",
             f"{row['tokens_per_second']}, {row['speedup_vs_main_only']}x / {row['speedup_decode_vs_main_only']}x, {row['acceptance_greedy']} / "
             f"{row['acceptance_sampled_t0.8']}, {row['mean_accepted_length']}")
        )
    lookup, both = results["prompt_lookup"], results["lookup_then_draft"]
    rows += [
        (f"prompt lookup ({lookup_tokens} tokens): tokens/s, speed-up, acceptance, mean accepted",
         f"{lookup['tokens_per_second']}, {lookup['speedup_vs_main_only']}x, {lookup['acceptance_greedy']}, {lookup['mean_accepted_length']}"),
        (f"lookup then draft (draft k={both['draft_length']}): tokens/s, speed-up, mean accepted",
         f"{both['tokens_per_second']}, {both['speedup_vs_main_only']}x, {both['mean_accepted_length']}"),
        (f"transformers prompt lookup ({lookup_tokens} tokens): tokens/s, speed-up over its generate",
         f"{lookup['transformers_tokens_per_second']}, {lookup['transformers_speedup_vs_generate']}x"),
        ("ratio prompt lookup ours / transformers, end to end / decode",
         f"{lookup['ratio_vs_transformers_prompt_lookup']} / {lookup['ratio_decode_vs_transformers_prompt_lookup']}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    json_out = args.json_out or Path("artifacts") / f"bench-{generator.manifest.name}-vs-transformers.json"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {json_out}")


if __name__ == "__main__":
    main()
