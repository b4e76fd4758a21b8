"""A partitioned artifact against the unpartitioned one, run as one model and expert-parallel.

    .venv/bin/python scripts/check_expert_parallel.py artifacts/tiny-coder-parted --reference artifacts/tiny-coder

On held-out text: the largest logit difference from the reference (prompt chunks, then single tokens and
verify blocks through the KV cache), beside the reference's own (the same tokens in one call), whether greedy decoding from each prompt gives the same tokens,
main-only decode tokens/s of each, and under expert-parallel placement the partitions each token was
sent to per MoE layer (the all-to-all traffic of multi-device serving) beside what `moecc plan-sim`
estimates for the same plan from the calibration counts.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import runtime
from compiler import corpus, partitioning

PROMPT, NEW = 96, 64


def logits_through_the_cache(generator, tokens: list[int]) -> np.ndarray:
    cache = generator.main.new_cache(len(tokens))
    pieces, at = [cache.feed(tokens[:PROMPT])], PROMPT
    while at < len(tokens):  # alternately one token and a 4-token verify block
        width = 1 if len(pieces) % 2 else 4
        pieces.append(cache.feed(tokens[at : at + width]))
        at += width
    return np.concatenate(pieces)


def greedy(generator, prompt: list[int]) -> tuple[list[int], float]:
    started = time.perf_counter()
    tokens = [t for step in generator.stream_ids(prompt, max_new_tokens=NEW, speculative=False, stop_tokens=set()) for t in step]
    return tokens, NEW / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--reference", required=True, help="the same recipe built without partitions")
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    reference = runtime.load(args.reference, target="cpu")
    placements = {placement: runtime.load(args.artifact, target="cpu", placement=placement) for placement in runtime.PLACEMENTS}
    text = reference.encode("\n".join(corpus.read_text(path) for path in corpus.stdlib_files("heldout")[:40]))
    windows = [text[i * 211 : i * 211 + PROMPT + 40] for i in range(args.prompts)]
    expected = [logits_through_the_cache(reference, window) for window in windows]
    report = {"artifact": args.artifact, "reference": args.reference, "prompts": args.prompts}
    # The floor: the reference against itself, the same tokens in one call instead of chunks through the cache.
    report["reference vs itself: max abs logit difference"] = float(max(np.abs(reference.main.new_cache(len(w)).feed(w) - e).max() for w, e in zip(windows, expected)))
    report["reference: max abs logit"] = float(max(np.abs(e).max() for e in expected))
    outputs = {"reference": [greedy(reference, window[:PROMPT]) for window in windows]}
    for placement, generator in placements.items():
        report[f"{placement}: max abs logit difference"] = float(max(np.abs(logits_through_the_cache(generator, w) - e).max() for w, e in zip(windows, expected)))
        outputs[placement] = [greedy(generator, window[:PROMPT]) for window in windows]
        report[f"{placement}: same greedy tokens"] = [tokens for tokens, _ in outputs[placement]] == [tokens for tokens, _ in outputs["reference"]]
    for name, runs in outputs.items():
        report[f"{name}: decode tokens/s (median)"] = round(float(np.median([speed for _, speed in runs])), 1)
    report["expert-parallel: partitions per token and layer (measured)"] = round(placements["expert-parallel"].main.partitions_per_token(), 3)
    manifest = placements["single"].manifest
    plan = next(r.result for r in manifest.stages if r.model == "main" and r.stage == "partition")
    routing = next(r.result for r in manifest.stages if r.model == "main" and r.stage == "calibrate")
    top_k = partitioning.experts_per_token(routing["tokens_per_expert"][0], routing["tokens"])
    selections = [partitioning.sample_routing(np.asarray(layer["tokens_per_expert"], float), top_k, 4096, seed) for seed, layer in enumerate(plan["layers"])]
    report["expert-parallel: partitions per token and layer (plan-sim estimate, independent routing)"] = round(float(np.mean(
        [partitioning.devices_per_token(chosen, layer["partition_of_expert"]) for chosen, layer in zip(selections, plan["layers"])]
    )), 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
