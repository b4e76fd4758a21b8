"""One of moecc's CPU kernels against ONNX Runtime's own, on an artifact's model: call times side by side.

    .venv/bin/python scripts/bench_kernels.py artifacts/tiny-coder-int8 --kernel moecc.QMoE

Loads the artifact twice in one process, once with every kernel that applies and once without `--kernel`
(its nodes then run ONNX Runtime's kernel, the other swaps stay; without moecc.FusedDecoder, the model runs
moecc's kernels node by node, and a node-by-node kernel is measured in a model run node by node), and times
calls over 1, 2, 5 and 9 new tokens after a prompt (a decode step and verify blocks) in alternating rounds, so
that the machine's drift reaches both alike; then a prompt's prefill. Prints medians over rounds and the
ratio. Also checks that both give the same greedy tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console
from rich.table import Table

import runtime
from compiler import corpus
from runtime.kernels import session


def call_milliseconds(cache, base: int, tokens: list[int], calls: int) -> float:
    """Median milliseconds of a call over `tokens` after the cache's first `base` tokens."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        cache.feed(tokens, last=len(tokens))
        times.append(time.perf_counter() - start)
        cache.keep(base)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--kernel", choices=sorted(session._KERNELS), default="moecc.QMoE", help="the kernel the baseline runs without")
    parser.add_argument("--role", choices=("main", "draft"), default="main")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 5, 9], help="new tokens per timed call")
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=60, help="per width and round; the median counts")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    # A node-by-node kernel is measured where the whole-graph one does not run the model.
    whole_graph = args.kernel in session._WHOLE_GRAPH
    with nullcontext() if whole_graph else session.node_by_node():
        ours = runtime.load(args.artifact, target="cpu", threads=args.threads)
        with session.withholding([args.kernel]):
            theirs = runtime.load(args.artifact, target="cpu", threads=args.threads)
    baseline = "node by node" if whole_graph else "ONNX Runtime"
    models = {"moecc": getattr(ours, args.role), baseline: getattr(theirs, args.role)}
    if args.kernel not in models["moecc"].kernels:
        raise SystemExit(f"{args.artifact} {args.role}: {args.kernel} does not apply (its kernels: {', '.join(models['moecc'].kernels) or 'none'})")

    text = [token for path in corpus.stdlib_files("heldout")[:2] for token in ours.encode(corpus.read_text(path))]
    prompt, block = text[: args.prompt_tokens], text[args.prompt_tokens : args.prompt_tokens + max(args.widths)]
    caches = {name: model.new_cache(args.prompt_tokens + max(args.widths)) for name, model in models.items()}
    for cache in caches.values():
        cache.feed(prompt, last=1)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, cache in caches.items():
            for width in args.widths:
                times.setdefault((name, width), []).append(call_milliseconds(cache, len(prompt), block[:width], args.calls))
    prefill = {}
    for name, model in models.items():
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            model.new_cache(args.prompt_tokens).feed(prompt, last=1)
            runs.append(time.perf_counter() - start)
        prefill[name] = statistics.median(runs) * 1e3

    table = Table(title=f"{args.artifact} {args.role}: {args.kernel} against {baseline}, ms per call (median of {args.rounds} rounds)")
    for column in ("call", "moecc", baseline, "speed-up"):
        table.add_column(column, justify="right")
    for width in args.widths:
        mine, other = (statistics.median(times[name, width]) for name in models)
        table.add_row(f"{width} new token{'s' if width > 1 else ''}", f"{mine:.3f}", f"{other:.3f}", f"{other / mine:.2f}x")
    table.add_row(f"prefill {len(prompt)}", f"{prefill['moecc']:.1f}", f"{prefill[baseline]:.1f}", f"{prefill[baseline] / prefill['moecc']:.2f}x")
    Console().print(table)
    if args.role == "main":
        outputs = [generator.generate_batch_ids([prompt[:64]], max_new_tokens=64, speculative=False)[0] for generator in (ours, theirs)]
        print("greedy tokens:", "the same" if outputs[0] == outputs[1] else "DIFFERENT")


if __name__ == "__main__":
    main()
