"""Where a decode step's time goes at each context length: ONNX Runtime's own profile of an artifact's model, per op type.

    .venv/bin/python scripts/profile_decode.py --artifact artifacts/bench-moe --contexts 128 2048

For each context, the model reads that many held-out tokens, then runs calls of --new-tokens tokens (1:
a decode step; k + 1: a verify of k proposals) right after them, each rolled back by the next; the profile
of those calls is summed per op type and divided by the number of calls. Profiling adds a fixed
cost to every node, so read the table for where time grows with the context, and the wall-clock
milliseconds (`moecc bench`) for how fast decoding is.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

import runtime
from compiler import corpus
from runtime.artifact import ModelEntry
from runtime.decoder import POSITIONS_INPUT, KvState, session_options
from runtime.kernels.fused_decoder import GREEDY_STEPS, GREEDY_TOKENS
from runtime.kernels.session import node_by_node, open_session


def profile(
    artifact: Path, entry: ModelEntry, text: list[int], context: int, calls: int, new_tokens: int, threads: int, folder: Path, kernels: str, whole_graph: bool = True
) -> Counter[str]:
    """Microseconds per call of `new_tokens` tokens, by op type, after `context` tokens of `text`; without
    `whole_graph`, moecc's kernels node by node where one node would run the whole model."""
    options = session_options(entry.session_options, threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / f"profile-{context}")
    with nullcontext() if whole_graph else node_by_node():
        session, _ = open_session(artifact / entry.path, onnx.load(artifact / entry.path, load_external_data=False), entry.head_dim, options, kernels)
    state = KvState(entry, 1, entry.max_sequence_length)
    binding = session.io_binding()
    inputs = {value.name for value in session.get_inputs()}
    state.bind(binding, inputs)
    if GREEDY_STEPS in inputs:  # a model run as one node (moecc.FusedDecoder): each call proposes nothing further
        binding.bind_cpu_input(GREEDY_STEPS, np.zeros((), dtype=np.int64))
        binding.bind_output(GREEDY_TOKENS, "cpu")

    def call(tokens: list[int], cached: int) -> None:
        state.set_lengths([cached], [len(tokens)], len(tokens))
        binding.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        positions = np.arange(len(tokens), dtype=np.int64).reshape(1, -1, 1)  # every new token's, as a verify asks
        binding.bind_cpu_input(POSITIONS_INPUT, positions)
        binding.bind_output("logits", "cpu")
        session.run_with_iobinding(binding)

    call(text[:context], 0)
    for position in range(context, context + calls * new_tokens, new_tokens):  # different tokens route to different experts
        call(text[position : position + new_tokens], context)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(event["ts"] for event in events if event.get("cat") == "Session" and event["name"] == "model_run")
    decoding = runs[1]  # the first run read the context
    per_op: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= decoding:
            per_op[event["args"]["op_name"]] += event["dur"] / calls
    return per_op


def _entry_and_text(artifact: Path, role: str) -> tuple[ModelEntry, list[int]]:
    """The model's manifest entry and the held-out text in its tokens, from a checked artifact. The generator's
    own sessions go when this returns: the profiled session is the only copy of the model in memory."""
    generator = runtime.load(artifact, target="cpu", threads=1)  # checks the artifact before anything is loaded
    return getattr(generator, role).entry, generator.encode("\n".join(corpus.read_text(path) for path in corpus.stdlib_files("heldout")[:50]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=Path("artifacts/bench-moe"))
    parser.add_argument("--model", choices=("main", "draft"), default="main")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=1, help="tokens per call: 1 decodes, k + 1 verifies k proposals")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=10, help="op types shown, by time at the longest context")
    parser.add_argument("--kernels", choices=runtime.KERNELS, default="auto", help="moecc's kernels (the whole model in one node where it applies) or ONNX Runtime's")
    parser.add_argument("--node-by-node", action="store_true", help="moecc's kernels node by node, where one node (moecc.FusedDecoder) would run the whole model")
    args = parser.parse_args()
    entry, text = _entry_and_text(args.artifact, args.model)
    needed = max(args.contexts) + args.calls * args.new_tokens
    if len(text) < needed:
        raise SystemExit(f"the held-out text has {len(text)} tokens; the longest context needs {needed}")
    with tempfile.TemporaryDirectory() as folder:
        profiles = {
            context: profile(args.artifact, entry, text, context, args.calls, args.new_tokens, args.threads, Path(folder), args.kernels, not args.node_by_node)
            for context in args.contexts
        }
    longest = profiles[max(args.contexts)]
    table = Table(title=f"{args.artifact.name} {args.model}: µs per call of {args.new_tokens} new tokens by op type (ONNX Runtime profile, {args.calls} calls, {args.threads} threads)")
    table.add_column("op type")
    for context in args.contexts:
        table.add_column(f"context {context}", justify="right")
    for op, _ in longest.most_common(args.top):
        table.add_row(op, *(f"{profiles[context][op]:,.0f}" for context in args.contexts))
    table.add_row("all", *(f"{sum(profiles[context].values()):,.0f}" for context in args.contexts))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
