"""How much speculation can gain on this machine: measured call costs of an artifact's models, the
speed-up they allow at given acceptance rates, and how close each draft-length policy comes on real text.

    .venv/bin/python scripts/speculation_ceiling.py --artifact artifacts/tiny-coder --acceptance 0.84 0.92
    .venv/bin/python scripts/speculation_ceiling.py --artifact artifacts/small-coder --replay 24

Times one main-model call over 1, 2, ..., max+1 new tokens (a verify of k proposals reads k+1) and one
draft call, on held-out text after a 128-token context, median of many calls. With acceptance a, k
proposals commit E(k) = (1 - a^(k+1)) / (1 - a) tokens per step, so speculation runs at
E(k) * main(1) / (k * draft(1) + main(k+1)) times main-only speed; with a draft that cost nothing the
bound is E(k) * main(1) / main(k+1). main(1) is a call per token: main-only greedy decoding chains
MAIN_ONLY_STEPS in one call (about 0.92x the time on small-coder), so these read that much above moecc bench's.

--replay N records, on N held-out prompts, where the draft's greedy proposal agrees with the main model's
greedy continuation; in greedy decoding that alone decides how far any chain of proposals is accepted. It
then replays every fixed draft length and the adaptive policy (runtime.speculative.AdaptiveDraftLength)
over those sequences with the measured costs, each call's cost scattered as this machine scatters it
(--noise, --outliers; seeded), and with --drift and --dwell through slow spells in which every call is
dearer (the policy sees them; the speed-up is billed at the usual speed, so it shows what its choices cost).
On a shared machine two timed runs differ by more than a policy change
gains; the replay compares policies on the same text and the same costs, and shows what speculation
loses to text whose hard tokens come in runs, which the geometric bound above does not see. Last, it
splits the draft's agreement by the main model's probability of its own greedy token: where the agreement
is lost, and so what a better draft could win back.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.table import Table

import runtime
from compiler import corpus
from runtime.sampling import SamplingParams, distribution
from runtime.speculative import AdaptiveDraftLength, DraftLengthPolicy, FixedDraftLength

CONTEXT = 128
UNTEMPERED = SamplingParams(temperature=1.0)  # the main model's own distribution over the next token


def call_milliseconds(decoder, text: list[int], new_tokens: int, calls: int) -> float:
    cache = decoder.new_cache()
    cache.feed(text[:CONTEXT], last=1)
    timings = []
    for call in range(calls):
        start = CONTEXT + (call * 7) % (len(text) - CONTEXT - new_tokens)  # different tokens route to different experts
        cache.keep(CONTEXT)
        pending = text[start : start + new_tokens]
        started = time.perf_counter()
        cache.feed(pending)
        timings.append(time.perf_counter() - started)
    return 1000 * statistics.median(timings)


def greedy_agreement(generator, prompts: list[list[int]], new_tokens: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per prompt, whether the draft's argmax after each token of the main model's greedy continuation (read
    with the true prefix) is the continuation's next token; and the main model's probability of that token
    there (its confidence, read the same way)."""
    sequences, confidences = [], []
    for prompt in prompts:
        continuation = [token for piece in generator.stream_ids(prompt, max_new_tokens=new_tokens, speculative=False, stop_tokens=()) for token in piece]
        read = prompt + continuation[:-1]
        logits = generator.draft.new_cache().feed(read, last=len(continuation))
        sequences.append(logits.argmax(-1) == np.asarray(continuation))
        main_logits = generator.main.new_cache().feed(read, last=len(continuation))
        confidences.append(np.array([distribution(row, UNTEMPERED)[token] for row, token in zip(main_logits, continuation)]))
    return sequences, confidences


CONFIDENCE_BANDS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)


def confidence_table(sequences: list[np.ndarray], confidences: list[np.ndarray]) -> Table:
    """Where the draft loses agreement: by how sure the main model was of its own greedy token. A draft of its
    own cannot tell the main model's near-ties apart as the main model does; past them it rarely disagrees."""
    agrees, sure = np.concatenate(sequences), np.concatenate(confidences)
    table = Table(title=f"draft agreement by the main model's probability of its greedy token ({len(agrees)} tokens)")
    for column in ("main model's probability", "share of tokens", "draft agrees", "share of disagreements"):
        table.add_column(column, justify="right")
    misses = max(int((~agrees).sum()), 1)
    for low, high in zip(CONFIDENCE_BANDS, CONFIDENCE_BANDS[1:]):
        band = (sure >= low) & ((sure < high) if high < 1.0 else (sure <= high))
        agreement = f"{agrees[band].mean():.3f}" if band.any() else "-"
        table.add_row(f"{low:.1f} - {high:.1f}", f"{band.mean():.3f}", agreement, f"{(band & ~agrees).sum() / misses:.3f}")
    return table


def decoding_loop_costs(generator, text: list[int], max_length: int, calls: int) -> tuple[dict[int, float], list[float]]:
    """Seconds per call as the decoding loop runs them, taken in turn so that the machine's drift reaches all
    alike: the main model alone after two calls of its own (1 position), a verify of n positions right after
    n - 1 greedy proposals, and those proposals (one draft call each, or chained in one where the draft's
    kernel does; their weights and threads start cold after a verify). Returns the main model's seconds by
    positions and what the j-th proposal of a step adds (the first, then a fitted cost per further one)."""
    main, draft = generator.main.new_cache(), generator.draft.new_cache()
    main.feed(text[:CONTEXT], last=1)
    draft.feed(text[:CONTEXT], last=1)
    main_calls: dict[int, list[float]] = {n: [] for n in range(1, max_length + 2)}
    proposing: dict[int, list[float]] = {n: [] for n in range(1, max_length + 1)}
    for call in range(calls):
        for length in range(max_length + 1):
            start = CONTEXT + (call * 7 + length) % (len(text) - CONTEXT - max_length - 3)
            if length:
                draft.keep(CONTEXT)
                started = time.perf_counter()
                draft.greedy_chain([text[start]], length)
                proposing[length].append(time.perf_counter() - started)
            else:
                for token in text[start : start + 2]:  # settle: the draft's weights leave the cache
                    main.keep(CONTEXT)
                    main.feed([token])
                start += 2
            main.keep(CONTEXT)
            started = time.perf_counter()
            main.feed(text[start : start + length + 1])
            main_calls[length + 1].append(time.perf_counter() - started)
    main_seconds = {n: statistics.median(times) for n, times in main_calls.items()}
    if max_length == 1:
        return main_seconds, [statistics.median(proposing[1])]
    # A step's proposals as a first one and a cost per further one, fitted over every length: the differences of
    # two medians taken at different moments scatter by more than a proposal costs.
    lengths = np.arange(1, max_length + 1)
    per_proposal, fixed = np.polyfit(lengths, [statistics.median(proposing[n]) for n in lengths], 1)
    per_proposal = max(float(per_proposal), 0.0)
    return main_seconds, [max(float(fixed) + per_proposal, per_proposal)] + [per_proposal] * (max_length - 1)


@dataclass(frozen=True)
class CallCosts:
    main: dict[int, float]  # positions -> seconds per call (1: the main model alone)
    proposals: list[float]  # seconds the j-th proposal of a step adds (draft calls, or a chain)
    noise: float  # sigma of each call's log-normal scatter
    outliers: float  # share of calls slowed 3-30x (preempted, or a neighbour's burst)
    drift: float = 1.0  # the machine's slow spells: every call this many times slower
    dwell: int = 0  # steps a spell (slow or not) lasts on average; 0: no spells

    def sample(self, seconds: float, rng: np.random.Generator) -> float:
        slowed = rng.uniform(3, 30) if rng.random() < self.outliers else 1.0
        return seconds * slowed * rng.lognormal(0.0, self.noise)

    def next_speed(self, factor: float, rng: np.random.Generator) -> float:
        """The slowdown of the next step: a spell ends after `dwell` steps on average."""
        if self.dwell and rng.random() < 1 / self.dwell:
            return 1.0 if factor != 1.0 else self.drift
        return factor


@dataclass
class Replay:
    seconds: float = 0.0  # at the machine's usual speed: what its slow spells cost every policy alike is left out
    tokens: int = 0
    verify_calls: int = 0
    lengths: Counter = field(default_factory=Counter)


def replay(policy: DraftLengthPolicy, sequences: list[np.ndarray], costs: CallCosts, rng: np.random.Generator) -> Replay:
    """Greedy speculative decoding of the recorded sequences, step by step as runtime.speculative.decode runs
    it, with sampled call costs in place of calls; one policy for all, as a Generator keeps one."""
    result, factor = Replay(), 1.0
    for agrees in sequences:
        position, step, alone, backlog = 0, 0, 0, 1  # backlog: tokens the draft has yet to read
        while position < len(agrees):
            length = min(policy.choose(), len(agrees) - position - 1)
            kept = 0
            while kept < length and agrees[position + kept]:
                kept += 1
            factor = costs.next_speed(factor, rng)
            draft_seconds = sum(costs.sample(seconds, rng) for seconds in costs.proposals[:length])
            verify_seconds = costs.sample(costs.main[length + 1], rng)
            policy.update(length, kept, factor * draft_seconds, factor * verify_seconds, backlog, step, alone)
            # The draft read its backlog and all proposals but the last; it keeps what was accepted.
            backlog = backlog + 1 if length == 0 else 1 + (kept == length)
            alone = alone + 1 if length == 0 else 0
            position += kept + 1
            step += 1
            result.seconds += draft_seconds + verify_seconds
            result.tokens += kept + 1
            result.verify_calls += 1
            result.lengths[length] += 1
    return result


def replay_table(sequences: list[np.ndarray], costs: CallCosts, max_length: int, seed: int) -> Table:
    agreement = float(np.concatenate(sequences).mean())
    spells = f"; slow spells {costs.drift}x, about {costs.dwell} steps each" if costs.dwell else ""
    table = Table(title=f"replayed on {len(sequences)} held-out prompts (draft agrees with {agreement:.3f} of greedy tokens; noise {costs.noise}, outliers {costs.outliers}{spells})")
    for column in ("draft length", "speed-up over main-only", "tokens per verify", "mean draft length", "main alone"):
        table.add_column(column, justify="right")
    policies: dict[str, DraftLengthPolicy] = {str(k): FixedDraftLength(k) for k in range(1, max_length + 1)}
    policies["auto"] = AdaptiveDraftLength(max_length)
    for name, policy in policies.items():
        result = replay(policy, sequences, costs, np.random.default_rng(seed))
        speed_up = result.tokens * costs.main[1] / result.seconds
        mean_length = sum(k * n for k, n in result.lengths.items()) / result.verify_calls
        table.add_row(name, f"{speed_up:.3f}", f"{result.tokens / result.verify_calls:.2f}", f"{mean_length:.2f}", f"{result.lengths[0] / result.verify_calls:.1%}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="artifacts/tiny-coder")
    parser.add_argument("--acceptance", type=float, nargs="+", default=[0.84])
    parser.add_argument("--max-draft-length", type=int, default=8)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--replay", type=int, default=0, metavar="PROMPTS", help="replay the draft-length policies on this many held-out prompts")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per replayed prompt")
    parser.add_argument("--noise", type=float, default=0.1, help="sigma of the log-normal scatter of each replayed call")
    parser.add_argument("--outliers", type=float, default=0.01, help="share of replayed calls slowed 3-30x")
    parser.add_argument("--drift", type=float, default=1.0, help="the policy sees slow spells: every call this many times slower")
    parser.add_argument("--dwell", type=int, default=0, help="steps a slow spell, or the time between two, lasts on average (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = runtime.load(args.artifact, threads=args.threads)
    text = generator.encode("\n".join(corpus.read_text(path) for path in corpus.stdlib_files("heldout")[:5]))[:4096]
    main_ms = {n: call_milliseconds(generator.main, text, n, args.calls) for n in range(1, args.max_draft_length + 2)}
    draft_ms = call_milliseconds(generator.draft, text, 1, args.calls)

    console = Console()
    call_table = Table(title=f"{generator.manifest.name}: milliseconds per call after {CONTEXT} tokens, median of {args.calls}")
    for column in ("new tokens", "main", "main / main(1)"):
        call_table.add_column(column, justify="right")
    for n, ms in main_ms.items():
        call_table.add_row(str(n), f"{ms:.3f}", f"{ms / main_ms[1]:.2f}")
    console.print(call_table)
    console.print(f"draft, one token: {draft_ms:.3f} ms ({draft_ms / main_ms[1]:.2f} of a main call)")
    bounds = Table(title="speed-up over main-only: with this draft / with a free draft")
    bounds.add_column("k", justify="right")
    for a in args.acceptance:
        bounds.add_column(f"a = {a}", justify="right")
    for k in range(1, args.max_draft_length + 1):
        row = []
        for a in args.acceptance:
            expected = (1 - a ** (k + 1)) / (1 - a)
            row.append(f"{expected * main_ms[1] / (k * draft_ms + main_ms[k + 1]):.2f} / {expected * main_ms[1] / main_ms[k + 1]:.2f}")
        bounds.add_row(str(k), *row)
    console.print(bounds)
    if args.replay:
        heldout = generator.encode("\n".join(corpus.read_text(path) for path in corpus.stdlib_files("heldout")[:80]))
        prompts = [heldout[i * CONTEXT : (i + 1) * CONTEXT] for i in range(args.replay)]
        sequences, confidences = greedy_agreement(generator, prompts, args.new_tokens)
        main_seconds, proposals = decoding_loop_costs(generator, text, args.max_draft_length, args.calls // 4)
        costs = CallCosts(main_seconds, proposals, args.noise, args.outliers, args.drift, args.dwell)
        alone = main_seconds[1]
        loop = " ".join(f"{n}: {seconds / alone:.2f}" for n, seconds in main_seconds.items() if n > 1)
        console.print(f"in the decoding loop, in main-alone calls ({alone * 1000:.3f} ms): verify of n positions {loop}; proposals of a step {' '.join(f'{s / alone:.3f}' for s in proposals)}")
        console.print(replay_table(sequences, costs, args.max_draft_length, args.seed))
        console.print(confidence_table(sequences, confidences))


if __name__ == "__main__":
    main()
