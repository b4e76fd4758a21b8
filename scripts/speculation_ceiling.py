"""How much speculation can gain on this machine: measured call costs of an artifact's models, and the
speed-up they allow at given acceptance rates.

    .venv/bin/python scripts/speculation_ceiling.py --artifact artifacts/tiny-coder --acceptance 0.84 0.92

Times one main-model call over 1, 2, ..., max+1 new tokens (a verify of k proposals reads k+1) and one
draft call, on held-out text after a 128-token context, median of many calls. With acceptance a, k
proposals commit E(k) = (1 - a^(k+1)) / (1 - a) tokens per step, so speculation runs at
E(k) * main(1) / (k * draft(1) + main(k+1)) times main-only speed; with a draft that cost nothing the
bound is E(k) * main(1) / main(k+1).
"""

from __future__ import annotations

import argparse
import statistics
import time

from rich.console import Console
from rich.table import Table

import runtime
from compiler import corpus

CONTEXT = 128


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="artifacts/tiny-coder")
    parser.add_argument("--acceptance", type=float, nargs="+", default=[0.84])
    parser.add_argument("--max-draft-length", type=int, default=8)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    generator = runtime.load(args.artifact, threads=args.threads)
    text = generator.encode("\n".join(corpus.read_text(path) for path in corpus.stdlib_files("heldout")[:5]))[:4096]
    main_ms = {n: call_milliseconds(generator.main, text, n, args.calls) for n in range(1, args.max_draft_length + 2)}
    draft_ms = call_milliseconds(generator.draft, text, 1, args.calls)

    console = Console()
    costs = Table(title=f"{generator.manifest.name}: milliseconds per call after {CONTEXT} tokens, median of {args.calls}")
    for column in ("new tokens", "main", "main / main(1)"):
        costs.add_column(column, justify="right")
    for n, ms in main_ms.items():
        costs.add_row(str(n), f"{ms:.3f}", f"{ms / main_ms[1]:.2f}")
    console.print(costs)
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


if __name__ == "__main__":
    main()
