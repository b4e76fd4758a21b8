"""Artifacts that share a main model, side by side in one process: decode time per token, main-only and
speculative (fixed draft lengths and auto), each artifact's cases on the same held-out prompts in turn.

    .venv/bin/python scripts/bench_artifacts.py artifacts/small-coder-float-draft artifacts/small-coder

On a shared machine two `moecc bench` runs minutes apart differ by more than a draft's precision changes;
here every case runs on a prompt before the next prompt is taken, so the machine's drift reaches all alike.
Speed-ups are against the first artifact's main model alone, whose greedy output every case must repeat.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

import runtime
from compiler import corpus
from runtime.speculative import GenerationStats

MAIN_ONLY = "main only"


@dataclass
class Case:
    artifact: int  # its index among the artifacts compared
    mode: str  # MAIN_ONLY, a draft length, or "auto"
    seconds_per_token: list[float] = field(default_factory=list)
    tokens_per_verify: list[float] = field(default_factory=list)
    seconds_per_proposal: list[float] = field(default_factory=list)
    lossless: bool = True


def check_same_main(paths: list[Path], generators: list[runtime.Generator]) -> None:
    """Refuse artifacts whose main models differ: their speed-ups would not be over the same model alone."""
    for path, generator in zip(paths[1:], generators[1:]):
        if generator.manifest.inputs["main"] != generators[0].manifest.inputs["main"]:
            raise SystemExit(f"{path} was built from another main checkpoint than {paths[0]}: compare artifacts of one main model")


def compare(paths: list[Path], prompt_tokens: int, new_tokens: int, rounds: int, lengths: list[str], threads: int | None) -> list[Case]:
    generators = [runtime.load(path, target="cpu", threads=threads) for path in paths]
    check_same_main(paths, generators)
    text = generators[0].encode("\n".join(corpus.read_text(path) for path in corpus.stdlib_files("heldout")[:60]))
    cases = [Case(0, MAIN_ONLY)] + [Case(index, length) for index in range(len(paths)) for length in lengths]
    for round_ in range(rounds):
        prompt = text[round_ * 1499 % (len(text) - prompt_tokens) :][:prompt_tokens]
        reference: list[int] = []
        for case in cases:
            stats = GenerationStats()
            options = {"speculative": False} if case.mode == MAIN_ONLY else {"draft_length": case.mode if case.mode == "auto" else int(case.mode)}
            steps = generators[case.artifact].stream_ids(list(prompt), max_new_tokens=new_tokens, stats=stats, stop_tokens=set(), **options)
            output = [token for step in steps for token in step]
            reference = reference or output  # main only runs first
            case.lossless &= output == reference
            case.seconds_per_token.append((stats.seconds - stats.prefill_seconds) / stats.new_tokens)
            case.tokens_per_verify.append(stats.new_tokens / stats.verify_calls)
            if stats.proposed:
                case.seconds_per_proposal.append(stats.draft_seconds / stats.proposed)
    return cases


def table(paths: list[Path], cases: list[Case], rounds: int, prompt_tokens: int) -> Table:
    main_only = statistics.median(cases[0].seconds_per_token)
    result = Table(title=f"medians of {rounds} held-out prompts of {prompt_tokens} tokens, each case in turn on every prompt")
    for column in ("artifact", "draft length", "ms per token", "speed-up over main only", "tokens per verify", "ms per proposal", "lossless"):
        result.add_column(column, justify="right")
    for case in cases:
        seconds = statistics.median(case.seconds_per_token)
        proposal = f"{1000 * statistics.median(case.seconds_per_proposal):.3f}" if case.seconds_per_proposal else "-"
        per_verify = f"{statistics.mean(case.tokens_per_verify):.2f}" if case.mode != MAIN_ONLY else "-"  # main-only calls verify nothing
        result.add_row(paths[case.artifact].name, case.mode, f"{1000 * seconds:.3f}", f"{main_only / seconds:.2f}x", per_verify, proposal, "yes" if case.lossless else "NO")
    return result


def draft_length(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"a draft length is a positive integer or auto, not {value!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--draft-lengths", type=draft_length, nargs="+", default=["4", "8", "auto"], help="fixed lengths, or auto")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cases = compare(args.artifacts, args.prompt_tokens, args.new_tokens, args.rounds, args.draft_lengths, args.threads)
    Console().print(table(args.artifacts, cases, args.rounds, args.prompt_tokens))
    if not all(case.lossless for case in cases):
        raise SystemExit("a speculative case's output differs from the main model's own greedy output")


if __name__ == "__main__":
    main()
