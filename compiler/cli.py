"""The `moecc` command line: composes argument groups and calls library code; every command has --json."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import runtime
from runtime import tensorrt_library
from runtime.decoder import kv_bytes_per_position
from runtime.errors import MoeccError


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
        num_bytes /= 1024
    return str(num_bytes)


class _RichObserver:
    """Progress bars for the build, on stderr so that --json output on stdout stays clean."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
            console=console,
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def stage_started(self, model: str, stage: str) -> None:
        self.task = self.progress.add_task(f"{model} {stage}", total=None, note="")

    def stage_progress(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def stage_finished(self, record) -> None:
        note = "cached" if record.cached else f"{record.seconds:.2f}s"
        total = self.progress.tasks[-1].total or 1
        self.progress.update(self.task, completed=total, total=total, note=note)


def _manifest_summary(manifest, artifact: Path) -> dict[str, Any]:
    models = {}
    for role, entry in manifest.models.items():
        files = {name: f.size for name, f in manifest.files.items() if name.startswith(f"{role}/")}
        kv_cache = {"kv_cache": entry.kv_precision, "kv_cache_bytes_per_token": kv_bytes_per_position(entry)}
        models[role] = entry.model_dump() | {"bytes": sum(files.values())} | kv_cache
    return {
        "artifact": str(artifact),
        "name": manifest.name,
        "moecc_version": manifest.moecc_version,
        "recipe_sha256": manifest.recipe_sha256,
        "models": models,
        "total_bytes": sum(f.size for f in manifest.files.values()),
        "stages": [  # a per-partition stage's runs carry their partition
            r.model_dump(include={"model", "stage", "seconds", "cached"}) | ({"partition": r.config["partition"]} if "partition" in r.config else {})
            for r in manifest.stages
        ],
        "accuracy": {r.model: r.result for r in manifest.stages if r.stage == "verify"},
        "routing": {r.model: r.result for r in manifest.stages if r.stage == "calibrate" and r.result.get("moe_layers")},
        "experts": {r.model: r.result["experts"] for r in manifest.stages if r.stage == "quantize" and any(e["precision"] != "fp32" for e in r.result.get("experts", []))},
        "lowering": {r.model: r.result for r in manifest.stages if r.stage == "lower" and (r.result["split_nodes"] or r.result["kept_whole"])},
        "engines": _engines(manifest),
        "partition": {
            r.model: r.result | {
                "pruned_bytes": next(q.result.get("pruned_bytes", 0) for q in manifest.stages if q.model == r.model and q.stage == "quantize"),
                "files": _partition_files(manifest, r.model, r.result),
            }
            for r in manifest.stages if r.stage == "partition" and r.result["layers"]
        },
        "generation": manifest.generation.model_dump(),
        "tools": manifest.tools,
    }


def _partition_files(manifest, role: str, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Each partition's own file of expert weights: its size and the precisions of the experts in it."""
    from compiler.partition_files import partition_file

    experts = next(r.result.get("experts", []) for r in manifest.stages if r.model == role and r.stage == "quantize")
    precisions: dict[int, set[str]] = {}
    for expert in experts:
        precisions.setdefault(plan["layers"][expert["layer"]]["partition_of_expert"][expert["expert"]], set()).add(expert["precision"])
    files = []
    for part in range(plan["partitions"]):
        name = f"{role}/{partition_file(part)}"
        if name in manifest.files:
            files.append({"partition": part, "file": name, "bytes": manifest.files[name].size, "precision": sorted(precisions.get(part, {"fp32"}))})
    return files


def _engines(manifest) -> dict[str, Any]:
    """Each model's engine: its identity, the network's layers by type, and the lowered graph's accuracy check."""
    engines = {}
    for role, entry in manifest.models.items():
        if entry.engine is None:
            continue
        built = next(r.result for r in manifest.stages if r.model == role and r.stage == "build")
        check = next(r.result["check"] for r in manifest.stages if r.model == role and r.stage == "lower_tensorrt")
        engines[role] = entry.engine.model_dump() | {"layers": built["layers"], "layer_types": built["layer_types"], "check": check}
    return engines


def _print_engines(console: Console, engines: dict[str, Any], artifact: Path, layers: bool) -> None:
    table = Table(title="TensorRT engines")
    for column in ("model", "built with", "GPUs", "precision", "layers", "size", "lowered graph vs reference"):
        table.add_column(column)
    for role, engine in engines.items():
        check = engine["check"]
        table.add_row(
            role, tensorrt_library.label(engine["flavour"], engine["version"]), ", ".join(engine["compute_capabilities"]) or "its own", engine["precision"], str(engine["layers"]), _size(engine["size"]),
            f"ppl {check['perplexity_increase']:+.2%}, top-1 {check['top1_agreement']:.3f}",
        )
    console.print(table)
    for role, engine in engines.items():
        profiles = ", ".join(f"{p['name']} {p['tokens'][0]}-{p['tokens'][2]} tokens after up to {p['past'][2]}, batch up to {p['batch'][2]}" for p in engine["profiles"])
        kinds = ", ".join(f"{kind.lower()} {count}" for kind, count in engine["layer_types"].items())
        flags = f"; flags: {', '.join(engine['builder_flags'])}" if engine["builder_flags"] else ""
        console.print(f"{role} engine profiles: {profiles}{flags}\n{role} network layers as parsed: {kinds}", highlight=False)
        if layers:
            console.print((artifact / engine["layers_path"]).read_text(), end="", markup=False, highlight=False)
    if not layers:
        console.print("(moecc inspect --layers lists every layer; the engine inspector itself needs a GPU to deserialize an engine)", highlight=False)


def _print_summary(console: Console, summary: dict[str, Any], title: str, layers: bool = False) -> None:
    table = Table(title=title)
    for column in ("model", "architecture", "precision", "parameters", "layers", "size", "KV cache per token"):
        table.add_column(column)
    for role, entry in summary["models"].items():
        kv_cache = f"{_size(entry['kv_cache_bytes_per_token'])} ({entry['kv_cache']})"
        table.add_row(role, entry["architecture"], entry["precision"], f"{entry['parameters']:,}", str(entry["num_layers"]), _size(entry["bytes"]), kv_cache)
    console.print(table)
    stages = Table(title="stages")
    for column in ("model", "stage", "seconds", "cached"):
        stages.add_column(column)
    for record in summary["stages"]:
        stage = record["stage"] + (f" p{record['partition']}" if "partition" in record else "")
        stages.add_row(record["model"], stage, f"{record['seconds']:.2f}", "yes" if record["cached"] else "no")
    console.print(stages)
    for role, routing in summary["routing"].items():
        table = Table(title=f"{role} routing on {routing['tokens']:,} calibration tokens")
        for column in ("layer", "tokens per expert (min / max)", "max / mean load", "rarely routed experts"):
            table.add_column(column)
        for layer, counts in enumerate(routing["tokens_per_expert"]):
            rare = [str(r["expert"]) for r in routing["rarely_routed"] if r["layer"] == layer]
            table.add_row(str(layer), f"{min(counts)} / {max(counts)}", f"{max(counts) * len(counts) / max(1, sum(counts)):.2f}", ", ".join(rare) or "-")
        console.print(table)
    for role, plan in summary["partition"].items():
        table = Table(title=f"{role} expert plan: {plan['partitions']} partitions, {plan['strategy']} (max/mean load per layer)")
        for column in ("layer", "tokens per partition", "max / mean", "contiguous", "balanced", "hot experts", "pruned"):
            table.add_column(column)
        for layer in plan["layers"]:
            hot = [str(e) for e, tier in enumerate(layer["tiers"]) if tier == "hot"]
            by = layer["imbalance_by_strategy"]
            table.add_row(
                str(layer["layer"]), " / ".join(f"{load:,}" for load in layer["partition_loads"]), f"{layer['imbalance']:.3f}",
                f"{by['contiguous']:.3f}", f"{by['balanced']:.3f}", ", ".join(hot) or "-", ", ".join(map(str, layer["pruned"])) or "-",
            )
        console.print(table)
        if plan["files"]:
            console.print(f"{role} partition files: " + "; ".join(f"{f['file']} {_size(f['bytes'])} ({', '.join(f['precision'])})" for f in plan["files"]))
        if plan["pruned_experts"]:
            console.print(
                f"{role}: {plan['pruned_experts']} experts pruned (routed < {plan['prune_below_share']:.2%} of their layer's tokens), "
                f"{_size(plan['pruned_bytes'])} of weights removed"
            )
    for role, experts in summary["experts"].items():
        table = Table(title=f"{role} expert precision (reasons in the manifest's quantize record)")
        precisions = sorted({e["precision"] for e in experts})
        for column in ("layer", *precisions):
            table.add_column(column)
        for layer in sorted({e["layer"] for e in experts}):
            chosen = [e for e in experts if e["layer"] == layer]
            table.add_row(str(layer), *(", ".join(str(e["expert"]) for e in chosen if e["precision"] == p) or "-" for p in precisions))
        console.print(table)
    for role, lowering in summary["lowering"].items():
        kept = "; ".join(f"{node} kept whole: {why}" for node, why in lowering["kept_whole"].items())
        console.print(
            f"{role}: experts split into {lowering['expert_parts']} sub-experts in {len(lowering['split_nodes'])} MoE nodes "
            f"(spreads one token's experts over the CPU threads){'; ' + kept if kept else ''}"
        )
    if summary["engines"]:
        _print_engines(console, summary["engines"], Path(summary["artifact"]), layers)
    if summary["accuracy"]:
        table = Table(title="accuracy against the exported reference (held-out text)")
        for column in ("model", "tokens", "reference ppl", "ppl", "change", "top-1 agreement", "gate"):
            table.add_column(column)
        for role, gate in summary["accuracy"].items():
            table.add_row(
                role, str(gate["tokens"]), f"{gate['reference_perplexity']:.3f}", f"{gate['perplexity']:.3f}",
                f"{gate['perplexity_increase']:+.2%}", f"{gate['top1_agreement']:.3f}", "passed" if gate["passed"] else "FAILED",
            )
        console.print(table)
    else:
        console.print("accuracy: no verify stage in this artifact")
    console.print(f"artifact: {summary['artifact']} ({_size(summary['total_bytes'])})")


def cmd_build(args, out: Console, err: Console) -> dict[str, Any]:
    from compiler.pipeline import build
    from compiler.recipe import load_recipe

    loaded = load_recipe(args.recipe)
    with _RichObserver(err) as observer:
        report = build(loaded, Path(args.output), observer if not (args.quiet or args.json) else None)
    summary = _manifest_summary(report.manifest, report.artifact) | {"seconds": round(report.seconds, 3)}
    if not args.json:
        _print_summary(out, summary, f"built {report.manifest.name} in {report.seconds:.1f}s")
    return summary


def cmd_inspect(args, out: Console, err: Console) -> dict[str, Any]:
    from runtime.artifact import verify_artifact

    artifact = Path(args.artifact)
    summary = _manifest_summary(verify_artifact(artifact), artifact)
    if args.heatmap:
        from compiler.routing_view import heatmap

        plans = summary["partition"]
        if "main" not in plans:
            raise MoeccError(f"{artifact}: the main model has no routing statistics to draw", hint="only MoE models have them")
        heatmap(plans["main"]["layers"], Path(args.heatmap), f"{summary['name']}: routed share per expert, partitions outlined (* hot)")
        summary["heatmap"] = args.heatmap
    if args.layers:
        for engine in summary["engines"].values():
            engine["layer_list"] = [line.split("\t", 1) for line in (artifact / engine["layers_path"]).read_text().splitlines()]
    if not args.json:
        _print_summary(out, summary, f"{summary['name']}", layers=args.layers)
    return summary


def _add_loading_options(parser: argparse.ArgumentParser) -> None:
    """How a command that runs an artifact opens it (the arguments of runtime.load)."""
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--target", choices=["auto", *runtime.TARGETS], default="auto", help="auto: the TensorRT engines where this machine can run them, else cpu")
    parser.add_argument(
        "--placement", choices=runtime.PLACEMENTS, default="single",
        help="expert-parallel: one worker per partition of a partitioned artifact's experts (cpu target)",
    )
    parser.add_argument(
        "--kernels", choices=runtime.KERNELS, default="auto",
        help="cpu target: moecc's attention, MoE and MatMul kernels (built for this machine on first use) or ONNX Runtime's; auto: ours where they build and apply",
    )


def cmd_verify(args, out: Console, err: Console) -> dict[str, Any]:
    from compiler.artifact_audit import audit

    report = audit(Path(args.artifact), Path(args.public_key) if args.public_key else None)
    if not args.json:
        out.print(
            f"[green]verified[/green] {args.artifact}: {report['files']} files ({_size(report['bytes'])}) match the manifest; "
            f"external data of {len(report['onnx_models'])} ONNX models inside it; {report['gates']} accuracy gates pass; signature {report['signature']}"
        )
    return report


def cmd_generate(args, out: Console, err: Console) -> dict[str, Any]:
    generator = runtime.load(args.artifact, target=args.target, threads=args.threads, placement=args.placement, kernels=args.kernels)
    sampling = runtime.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stream = generator.stream(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        draft_length=args.draft_length,
        speculative=not args.no_speculative,
        sampling=sampling,
        proposer=args.proposer,
    )
    pieces = []
    if not args.json:
        out.print(args.prompt, end="", style="bold", highlight=False)
    for piece in stream:
        pieces.append(piece)
        if not args.json:
            out.print(piece, end="", highlight=False, markup=False)
    stats = stream.stats.as_dict()
    if not args.json:
        out.print()
        setting = args.draft_length or generator.manifest.generation.draft_length
        proposals = {"prompt-lookup": "prompt lookup", "lookup-then-draft": "lookup, then draft model"}.get(args.proposer, "draft model")
        mode = f"speculative ({proposals}), draft length {setting} (mean {stats['mean_draft_length']:.1f})" if not args.no_speculative else "main model only"
        calls = (
            f"{stats['verify_calls']} main-model calls ({stats['mean_accepted_length']:.2f} tokens each), {stats['verify_seconds']:.2f}s"
            if args.no_speculative
            else f"acceptance {stats['acceptance_rate']:.2f}, mean accepted length {stats['mean_accepted_length']:.2f}, "
            f"draft {stats['draft_seconds']:.2f}s, verify {stats['verify_seconds']:.2f}s"
        )
        err.print(f"[dim]{stats['new_tokens']} tokens in {stats['seconds']:.2f}s: {stats['tokens_per_second']:.1f} tokens/s ({mode}); {calls}[/dim]")
    result = {"text": "".join(pieces), "token_ids": stream.token_ids, "stats": stats}
    if generator.placement == "expert-parallel":
        result["partitions_per_token"] = round(generator.main.partitions_per_token(), 4)
        if not args.json:
            err.print(f"[dim]expert-parallel: each token went to {result['partitions_per_token']:.2f} partitions per MoE layer[/dim]")
    return result


def cmd_bench(args, out: Console, err: Console) -> dict[str, Any]:
    from compiler import corpus
    from runtime import benchmark

    generator = runtime.load(args.artifact, target=args.target, threads=args.threads, placement=args.placement, kernels=args.kernels)
    default = generator.manifest.generation.draft_length
    fixed = args.draft_length or (default if isinstance(default, int) else 4)
    heldout = generator.encode("\n".join(corpus.read_text(path) for path in corpus.stdlib_files("heldout")[:50]))
    planned = []
    for prompt_tokens in args.prompt_tokens:
        if prompt_tokens + args.new_tokens > generator.main.entry.max_sequence_length:
            raise MoeccError(f"{prompt_tokens} prompt + {args.new_tokens} new tokens exceed the maximum sequence length {generator.main.entry.max_sequence_length}")
        for batch in args.batch_sizes:  # different prompts of the same length; each run its own
            if args.runs * batch * prompt_tokens > len(heldout):
                raise MoeccError(f"the held-out text has {len(heldout)} tokens, too few for {args.runs} runs of {batch} prompts of {prompt_tokens} tokens",
                                 hint="ask for fewer runs, a smaller batch or shorter prompts")  # fmt: skip
            windows = [tuple(heldout[start : start + prompt_tokens]) for start in range(0, args.runs * batch * prompt_tokens, prompt_tokens)]
            batches = tuple(tuple(windows[run * batch : (run + 1) * batch]) for run in range(args.runs))
            planned += [benchmark.Case(mode, batches) for mode in benchmark.modes_for(generator, fixed)]

    def progress(round_index: int, case: benchmark.Case) -> None:
        if not args.json:
            label = "warm-up" if round_index == 0 else f"run {round_index}/{args.runs}"
            err.print(f"[dim]{label}: {case.mode.name}, batch {len(case.prompts)}, prompt {len(case.prompts[0])} tokens ...[/dim]")

    cases = benchmark.run_cases(generator, planned, args.new_tokens, args.runs, progress)
    name = generator.manifest.name
    peak_rss = benchmark.peak_rss_bytes()  # before the bandwidth probe's buffer
    threads = args.threads or os.cpu_count() or 1
    active = benchmark.active_weight_bytes(Path(args.artifact) / generator.main.entry.path)
    bandwidth = benchmark.read_bandwidth(threads)
    # How close main-only decoding runs to the memory limit: weight bytes read per second over what the machine
    # reads; and with the KV cache, which attention reads on top and which grows with the context.
    main_only = [case for case in cases if case.mode == "main only"]
    kv = {case.prompt_tokens: benchmark.kv_bytes_per_token(generator.main.entry, case.prompt_tokens, case.new_tokens) for case in main_only}
    limit = {case.prompt_tokens: active * case.decode_tokens_per_second.median / bandwidth for case in main_only}
    limit_with_kv = {case.prompt_tokens: (active + kv[case.prompt_tokens]) * case.decode_tokens_per_second.median / bandwidth for case in main_only}
    report = {
        "artifact": str(args.artifact), "name": name, "threads": threads, "runs": args.runs, "kernels": list(getattr(generator.main, "kernels", ())),
        "peak_rss_bytes": peak_rss, "main_active_weight_bytes_per_token": active,
        "read_bandwidth_bytes_per_second": bandwidth, "main_only_bandwidth_fraction": limit,
        "main_only_kv_bytes_per_token": kv, "main_only_bandwidth_fraction_with_kv": limit_with_kv,
        "main_only_cost_growth": _cost_growth(main_only, active, kv),
        "cases": [benchmark.as_json(case) for case in cases],
        "speculation": [benchmark.as_json(cost) for cost in benchmark.speculation_costs(cases)],
    }
    json_out = Path(args.json_out or Path(args.artifact).parent / f"bench-{name}.json")
    json_out.write_text(json.dumps(report, indent=1))
    chart = Path(args.chart or json_out.with_suffix(".png"))
    _bench_chart(cases, chart, f"{name}: decode tokens/s (all rows of a batch), median of {args.runs} (bars: min-max)")
    report |= {"json": str(json_out), "chart": str(chart)}
    if not args.json:
        table = Table(title=f"{name}: {args.runs} rounds of every case after a warm-up round, {threads} threads; batch tokens/s count every row")
        for column in ("mode", "prompt", "new", "prefill tok/s", "decode tok/s (min-max)", "ms/token", "acceptance", "tokens/call", "mean k"):
            table.add_column(column, justify="left" if column == "mode" else "right")
        for case in cases:
            decode = case.decode_tokens_per_second
            table.add_row(
                case.mode, str(case.prompt_tokens), str(case.new_tokens), f"{case.prefill_tokens_per_second.median:,.0f}",
                f"{decode.median:,.0f} ({decode.low:,.0f}-{decode.high:,.0f})", f"{case.milliseconds_per_token.median:.2f}",
                f"{case.acceptance_rate:.3f}" if not case.mode.startswith("main only") else "-", f"{case.mean_accepted_length:.2f}",
                f"{case.mean_draft_length:.2f}" if not case.mode.startswith("main only") else "-",
            )
        out.print(table)
        fractions = ", ".join(f"{fraction:.2f} (prompt {prompt})" for prompt, fraction in limit.items())
        usage = f"; main-only decode at batch 1 uses {fractions} of it" if limit else ""
        out.print(f"main model reads {_size(active)} of weights per token; this machine reads {bandwidth / 1e9:.1f} GB/s with {threads} threads{usage}")
        if kv:
            with_kv = ", ".join(f"{_size(kv[prompt])} and {fraction:.2f} (prompt {prompt})" for prompt, fraction in limit_with_kv.items())
            out.print(f"counting the KV cache it also reads per token: {with_kv}")
        for cost in report["speculation"]:
            out.print(speculation_line(cost))
        if growth := report["main_only_cost_growth"]:
            by_round = growth["growth_by_round"]
            out.print(
                f"main-only decode time per token at prompt {growth['to']} against {growth['from']}: {growth['growth']:+.1%} (by round: median "
                f"{by_round['median']:+.1%}, {by_round['low']:+.1%} to {by_round['high']:+.1%}); the bytes a step reads "
                f"(weights and KV cache): {growth['bytes_growth']:+.1%} (kernels: {', '.join(report['kernels']) or 'ONNX Runtime'})"
            )
        out.print(f"peak RSS {_size(report['peak_rss_bytes'])}; wrote {json_out} and {chart}")
    return report


def speculation_line(cost: dict[str, Any]) -> str:
    """One speculative case's costs (benchmark.SpeculationCost, as JSON) in words."""
    rounds = cost.get("speed_up_by_round")
    spread = f" (by round, on the same text: median {rounds['median']:.2f}x, {rounds['low']:.2f}-{rounds['high']:.2f}x)" if rounds else ""
    return (
        f"{cost['mode']}, prompt {cost['prompt_tokens']}: {cost['speed_up']:.2f}x main-only{spread}; a verify call took {cost['verify_cost']:.2f} main-only "
        f"steps, and proposing {cost['draft_cost']:.2f} per proposal (catching up included); at {cost['tokens_per_verify']:.2f} tokens per verify, "
        f"proposals that cost nothing would reach {cost['free_draft_bound']:.2f}x"
    )


def _cost_growth(main_only: list, active_weight_bytes: int, kv_bytes: dict[int, int]) -> dict[str, Any] | None:
    """How much longer a main-only decode step (batch 1) takes after the longest prompt than after the shortest; and
    how much more it reads (its active weights and the KV cache): the growth a step bound by its reads cannot beat,
    so that a figure above it says what the attention's arithmetic adds, not what the cache's size does. Beside the
    medians' ratio, each round's own (growth_by_round: median, low, high)."""
    from runtime.benchmark import Spread

    single = sorted(main_only, key=lambda case: case.prompt_tokens)
    if len(single) < 2:
        return None
    first, last = single[0], single[-1]
    growth = last.milliseconds_per_token.median / first.milliseconds_per_token.median - 1
    reads = (active_weight_bytes + kv_bytes[last.prompt_tokens]) / (active_weight_bytes + kv_bytes[first.prompt_tokens]) - 1
    # Each round's growth, its two runs in the same round: the machine's drift over the whole benchmark (10-15 %
    # within minutes on a shared 2-core Xeon) moves the medians' ratio, not these; their range shows what is left.
    by_round = Spread.of([short / long - 1 for short, long in zip(first.decode_by_run, last.decode_by_run, strict=True)])
    return {
        "from": first.prompt_tokens, "to": last.prompt_tokens, "growth": round(growth, 4), "bytes_growth": round(reads, 4),
        "growth_by_round": {"median": round(by_round.median, 4), "low": round(by_round.low, 4), "high": round(by_round.high, 4)},
    }


def _bench_chart(cases, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(case.mode for case in cases))
    prompts = sorted({case.prompt_tokens for case in cases})
    figure, axes = plt.subplots(figsize=(2 + 2.2 * len(prompts), 4))
    width = 0.8 / len(modes)
    for index, mode in enumerate(modes):
        chosen = [next(c for c in cases if c.mode == mode and c.prompt_tokens == p) for p in prompts]
        medians = [c.decode_tokens_per_second.median for c in chosen]
        errors = [[m - c.decode_tokens_per_second.low for m, c in zip(medians, chosen)], [c.decode_tokens_per_second.high - m for m, c in zip(medians, chosen)]]
        axes.bar([p + index * width for p in range(len(prompts))], medians, width, yerr=errors, capsize=3, label=mode)
    axes.set_xticks([p + width * (len(modes) - 1) / 2 for p in range(len(prompts))], [f"prompt {p}" for p in prompts])
    axes.set_ylabel("decode tokens/s")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def cmd_plan_sim(args, out: Console, err: Console) -> dict[str, Any]:
    from compiler import partitioning

    if args.artifact:
        from runtime.artifact import verify_artifact

        manifest = verify_artifact(Path(args.artifact))
        routing = next((r.result for r in manifest.stages if r.model == "main" and r.stage == "calibrate" and r.result.get("moe_layers")), None)
        if routing is None:
            raise MoeccError(f"{args.artifact}: no routing statistics (the main model is not an MoE)")
        loads = routing["tokens_per_expert"]
        top_k = partitioning.experts_per_token(loads[0], routing["tokens"])
        source = f"measured routing of {manifest.name} ({routing['tokens']:,} calibration tokens)"
    else:
        loads = [(partitioning.zipf_popularity(args.experts, args.skew, seed) * 1e6).round().astype(int).tolist() for seed in range(args.layers)]
        top_k, source = args.top_k, f"synthetic routing: {args.layers} layers, {args.experts} experts, top-{args.top_k}, Zipf skew {args.skew}"
    rows = partitioning.simulate(loads, top_k, args.devices, args.tokens)
    if not args.json:
        table = Table(title=f"expert placement, {source}")
        for column in ("devices", "strategy", "max / mean load (worst layer)", "mean over layers", "devices per token and layer"):
            table.add_column(column)
        for row in rows:
            table.add_row(str(row["devices"]), row["strategy"], f"{row['max_imbalance']:.3f}", f"{row['mean_imbalance']:.3f}", f"{row['devices_per_token']:.2f}")
        out.print(table)
    return {"source": source, "top_k": top_k, "rows": rows}


def _draft_length(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecc", description="Compile Mixture-of-Experts models and run them with speculative decoding.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print one JSON object on stdout (for CI)")
        sub.set_defaults(handler=handler)
        return sub

    build = command("build", "build an artifact from a YAML recipe", cmd_build)
    build.add_argument("recipe", help="recipe file, e.g. recipes/tiny-coder.yaml")
    build.add_argument("--output", default="artifacts", help="folder that receives the artifact (default: artifacts)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")

    inspect = command("inspect", "verify an artifact and show what is inside", cmd_inspect)
    inspect.add_argument("artifact")
    inspect.add_argument("--layers", action="store_true", help="list every layer of each TensorRT engine")
    inspect.add_argument("--heatmap", default=None, help="write a PNG heat map of the main model's routing and partition plan")

    verify = command("verify", "check an artifact: digests, paths, external data, accuracy gates, signature", cmd_verify)
    verify.add_argument("artifact")
    verify.add_argument("--public-key", default=None, help="PEM public key; needed when the artifact is signed (manifest.sig)")

    plan_sim = command("plan-sim", "simulate expert placement on N devices: load imbalance and traffic per strategy", cmd_plan_sim)
    plan_sim.add_argument("artifact", nargs="?", default=None, help="use this artifact's measured routing (default: synthetic)")
    plan_sim.add_argument("--devices", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    plan_sim.add_argument("--experts", type=int, default=128, help="synthetic routing: experts per layer")
    plan_sim.add_argument("--layers", type=int, default=4, help="synthetic routing: MoE layers")
    plan_sim.add_argument("--top-k", type=int, default=8, help="synthetic routing: experts per token")
    plan_sim.add_argument("--skew", type=float, default=1.0, help="synthetic routing: Zipf exponent of expert popularity (0: uniform)")
    plan_sim.add_argument("--tokens", type=int, default=4096, help="tokens sampled for the traffic estimate")

    generate = command("generate", "generate text from an artifact", cmd_generate)
    generate.add_argument("artifact")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=None)
    generate.add_argument("--draft-length", type=_draft_length, default=None, help="draft tokens per verify call, or auto (default: the recipe's)")
    generate.add_argument("--no-speculative", action="store_true", help="decode with the main model alone")
    generate.add_argument(
        "--proposer", choices=runtime.PROPOSERS, default="draft",
        help="who proposes: the draft model; prompt-lookup (tokens copied from the prompt and the text so far; no draft model runs); "
        "or lookup-then-draft (copied where the text's last 3 tokens occurred before, the draft model's elsewhere)",
    )
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    _add_loading_options(generate)

    bench = command("bench", "time an artifact: prefill, decode, speculative acceptance, memory", cmd_bench)
    bench.add_argument("artifact")
    bench.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 512], help="prompt lengths, from held-out text")
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--runs", type=int, default=3, help="timed rounds, each running every case once (so drift reaches all alike) on text of its own, after a warm-up round")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="prompts decoded together, each size in every mode")
    bench.add_argument("--draft-length", type=int, default=None, help="the fixed draft length to compare with auto (default: the recipe's, else 4)")
    _add_loading_options(bench)
    bench.add_argument("--json-out", default=None, help="default: bench-NAME.json next to the artifact")
    bench.add_argument("--chart", default=None, help="PNG chart; default: the JSON path with .png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out, err = Console(), Console(stderr=True)
    try:
        result = args.handler(args, out, err)
    except (MoeccError, ValueError) as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        else:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    if args.json:
        print(json.dumps({"ok": True} | result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
