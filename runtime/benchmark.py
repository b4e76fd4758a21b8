"""Timing a loaded artifact: prefill and decode speed, acceptance, memory; several runs, median and spread.

Pure measurement (numpy + the runtime); `moecc bench` renders the table, the JSON and the chart.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from runtime.artifact import ModelEntry
from runtime.decoder import kv_bytes_per_position
from runtime.generator import Generator
from runtime.speculative import AdaptiveDraftLength, GenerationStats


@dataclass(frozen=True)
class Mode:
    name: str  # "main only", "speculative k=4", "speculative auto", "prompt lookup", "lookup then draft"
    speculative: bool
    draft_length: int | str | None = None
    proposer: str = "draft"


@dataclass
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class CaseResult:
    mode: str
    prompt_tokens: int
    new_tokens: int
    batch_size: int
    runs: int
    prefill_tokens_per_second: Spread
    decode_tokens_per_second: Spread
    milliseconds_per_token: Spread
    acceptance_rate: float
    mean_accepted_length: float
    mean_draft_length: float
    verify_milliseconds: float  # per main-model call (main-only: up to MAIN_ONLY_STEPS steps; else a verify of a step's proposals)
    draft_milliseconds: float  # the draft's time per proposed token, catching up included (0 without proposals)
    draft_lengths: dict[int, int] = field(default_factory=dict)  # tokens proposed (a lookup's found, a draft's chosen) -> steps
    decode_by_run: list[float] = field(default_factory=list)  # decode tokens/s of each timed run, in round order


def modes_for(generator: Generator, draft_length: int) -> list[Mode]:
    modes = [Mode("main only", speculative=False)]
    if generator.draft is not None:
        modes += [Mode(f"speculative k={draft_length}", True, draft_length), Mode("speculative auto", True, "auto")]
    modes.append(Mode("prompt lookup", True, "auto", "prompt-lookup"))
    if generator.draft is not None:
        modes.append(Mode("lookup then draft", True, "auto", "lookup-then-draft"))
    return modes


Batch = tuple[tuple[int, ...], ...]  # one prompt, or several of the same length decoded together


@dataclass(frozen=True)
class Case:
    mode: Mode
    batches: tuple[Batch, ...]  # what each timed run decodes, in turn (the warm-up round the first)

    @property
    def prompts(self) -> Batch:
        return self.batches[0]

    def batch_of_run(self, run: int) -> Batch:
        """The prompts of timed run `run` (1, 2, ...); 0, the warm-up round, takes the first batch."""
        return self.batches[max(run - 1, 0) % len(self.batches)]


def _generate(generator: Generator, mode: Mode, prompts: Batch, new_tokens: int) -> GenerationStats:
    """One generation of exactly `new_tokens` per prompt (end-of-text ignored)."""
    options = {"draft_length": mode.draft_length, "proposer": mode.proposer} if mode.speculative else {}
    if len(prompts) == 1:
        stats = GenerationStats()
        for _ in generator.stream_ids(list(prompts[0]), max_new_tokens=new_tokens, speculative=mode.speculative, stats=stats, stop_tokens=set(), **options):
            pass
        return stats
    _, stats = generator.generate_batch_ids([list(p) for p in prompts], max_new_tokens=new_tokens, stop_tokens=set(), speculative=mode.speculative, **options)
    return stats


def run_cases(generator: Generator, cases: list[Case], new_tokens: int, runs: int, progress: Callable[[int, Case], None] | None = None) -> list[CaseResult]:
    """Each case `runs` times after a warm-up round (which warms caches and ONNX Runtime's allocations), in
    rounds that run every case once in turn, so the machine's drift reaches every case alike instead of the
    ones that happen to run last. Each run decodes its case's batch for that run (case.batch_of_run): with
    different text per run, the spread and the acceptance cover the text as well as the machine. One prompt
    goes through the single-sequence loop; several are decoded together as one batch, and tokens/s then
    counts every row's tokens. Each single-sequence case with an adaptive draft length keeps a policy of its
    own across the rounds, as it would running alone (a batched generation starts a fresh one every call anyway)."""
    records: list[list[GenerationStats]] = [[] for _ in cases]
    policies = [AdaptiveDraftLength(generator.manifest.generation.max_draft_length) for _ in cases]
    shared = generator.adaptive_draft_length
    try:
        for round_index in range(runs + 1):
            for case, record, policy in zip(cases, records, policies):
                if progress:
                    progress(round_index, case)
                generator.adaptive_draft_length = policy
                stats = _generate(generator, case.mode, case.batch_of_run(round_index), new_tokens)
                if round_index:
                    record.append(stats)
    finally:
        generator.adaptive_draft_length = shared
    return [_summary(case, record, new_tokens, runs) for case, record in zip(cases, records)]


def _summary(case: Case, records: list[GenerationStats], new_tokens: int, runs: int) -> CaseResult:
    proposed, accepted = sum(s.proposed for s in records), sum(s.accepted for s in records)
    calls, lengths = sum(s.verify_calls for s in records), [k for s in records for k in s.draft_lengths]
    batch = len(case.prompts)
    return CaseResult(
        mode=case.mode.name if batch == 1 else f"{case.mode.name}, batch {batch}",
        prompt_tokens=len(case.prompts[0]), new_tokens=new_tokens, batch_size=batch, runs=runs,
        prefill_tokens_per_second=Spread.of([s.prefill_tokens_per_second for s in records]),
        decode_tokens_per_second=Spread.of([s.decode_tokens_per_second for s in records]),
        milliseconds_per_token=Spread.of([1000 / s.decode_tokens_per_second for s in records]),
        acceptance_rate=accepted / proposed if proposed else 0.0,
        mean_accepted_length=sum(s.new_tokens for s in records) / calls if calls else 0.0,
        mean_draft_length=sum(lengths) / len(lengths) if lengths else 0.0,
        verify_milliseconds=1000 * sum(s.verify_seconds for s in records) / calls if calls else 0.0,
        draft_milliseconds=1000 * sum(s.draft_seconds for s in records) / proposed if proposed else 0.0,
        draft_lengths={k: lengths.count(k) for k in sorted(set(lengths))} if case.mode.speculative else {},
        decode_by_run=[s.decode_tokens_per_second for s in records],
    )


@dataclass(frozen=True)
class SpeculationCost:
    """A speculative case's step costs against main-only decoding of the same prompt, in main-only steps (one
    per token, several to a call: speculative.MAIN_ONLY_STEPS), and the most any draft could gain at its
    measured tokens per verify. Counting the model calls only, speed-up = tokens per verify / (verify cost +
    proposals * draft cost), so a draft that cost nothing reaches tokens per verify / verify cost. On an MoE a
    verify of k + 1 positions reads the experts of every position's routes, so this bound, not the draft, can
    be what keeps speculation short of a goal."""

    mode: str
    prompt_tokens: int
    speed_up: float  # decode tokens/s over main-only's (medians)
    verify_cost: float  # a verify call's time, in main-only steps
    draft_cost: float  # the time per proposal (a draft's reading of the tokens it lacked included), in main-only steps
    tokens_per_verify: float
    free_draft_bound: float
    # The speed-up of each round over main-only in the same round, on the same text: its median and range show
    # how much the machine's state moves it (None when the two cases' rounds do not pair up).
    speed_up_by_round: Spread | None = None


def speculation_costs(cases: list[CaseResult]) -> list[SpeculationCost]:
    """SpeculationCost of each single-sequence case with proposals, against main-only at the same prompt length."""
    main_only = {case.prompt_tokens: case for case in cases if case.mode == "main only"}
    costs = []
    for case in cases:
        main = main_only.get(case.prompt_tokens)
        if main is None or case.batch_size != 1 or not case.mean_draft_length or not main.verify_milliseconds:  # main-only proposes nothing
            continue
        step = main.verify_milliseconds / main.mean_accepted_length  # one main-only token's share of its call
        verify_cost = case.verify_milliseconds / step
        paired = len(case.decode_by_run) == len(main.decode_by_run) > 0
        by_round = Spread.of([ours / alone for ours, alone in zip(case.decode_by_run, main.decode_by_run)]) if paired else None
        costs.append(
            SpeculationCost(
                mode=case.mode, prompt_tokens=case.prompt_tokens,
                speed_up=case.decode_tokens_per_second.median / main.decode_tokens_per_second.median,
                verify_cost=verify_cost, draft_cost=case.draft_milliseconds / step,
                tokens_per_verify=case.mean_accepted_length, free_draft_bound=case.mean_accepted_length / verify_cost,
                speed_up_by_round=by_round,
            )
        )
    return costs


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def active_weight_bytes(model_path: Path) -> int:
    """Bytes of weights one decode step reads: all of them, except that an MoE layer reads k of its E
    experts and a table (embedding, rotary cos/sin) one row (read from the graph, not the weights)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    experts_read: dict[str, int] = {}  # expert weight -> top-k of its MoE node
    tables: set[str] = set()
    for node in graph.node:
        if node.op_type in ("MoE", "QMoE") and node.domain == "com.microsoft":
            top_k = next(a.i for a in node.attribute if a.name == "k")
            experts_read |= {name: top_k for name in node.input[2:8] if name}
        elif node.op_type == "Gather":
            tables.add(node.input[0])
        elif node.op_type == "GroupQueryAttention":
            tables |= set(node.input[7:9])  # cos and sin caches
    total = 0.0
    for tensor in graph.initializer:
        size = int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if tensor.name in tables:
            continue
        total += size * experts_read[tensor.name] / tensor.dims[0] if tensor.name in experts_read else size
    return int(total)


def kv_bytes_per_token(entry: ModelEntry, prompt_tokens: int, new_tokens: int) -> int:
    """Bytes of cached keys and values one decode step reads, averaged over decoding `new_tokens` after a
    prompt: every layer's keys and values for every position before the one being decoded."""
    return int(kv_bytes_per_position(entry) * (prompt_tokens + (new_tokens - 1) / 2))


def read_bandwidth(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second that `threads` threads read from memory, as decoding reads its weights: ONNX Runtime's
    MatMul of one row by a float32 matrix far beyond cache, bound in place (no copy), on `threads` threads.
    (numpy's sum, the probe before, read a third less than decoding itself did on this machine.)"""
    rows = 4096
    matrix = np.ones((rows, megabytes * 2**20 // 4 // rows), np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["row", "matrix"], ["product"])], "read_bandwidth",
        [onnx.helper.make_tensor_value_info("row", onnx.TensorProto.FLOAT, [1, rows]), onnx.helper.make_tensor_value_info("matrix", onnx.TensorProto.FLOAT, list(matrix.shape))],
        [onnx.helper.make_tensor_value_info("product", onnx.TensorProto.FLOAT, [1, matrix.shape[1]])],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_ortvalue_input("matrix", ort.OrtValue.ortvalue_from_numpy(matrix))  # an input, not a weight: read as it is, not repacked
    binding.bind_cpu_input("row", np.ones((1, rows), np.float32))
    binding.bind_output("product")
    best = 0.0
    for _ in range(repeats + 1):  # the first call allocates
        started = time.perf_counter()
        session.run_with_iobinding(binding)
        best = max(best, matrix.nbytes / (time.perf_counter() - started))
    return best


def wait_until_idle(window: float = 0.02, busy_share: float = 0.1, timeout: float = 2.0) -> bool:
    """Whether this process's threads stopped running within `timeout` seconds. Thread pools spin a while after
    their last call (ONNX Runtime's default pool about 70 ms on this machine, PyTorch's about 10 ms; ours
    0.1 ms), and a pool left spinning takes a core from whatever is timed next: a benchmark of two runtimes
    in one process waits for this before timing either (and warns when it is not so)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        before = time.process_time()
        time.sleep(window)
        if time.process_time() - before < busy_share * window:
            return True
    return False


def as_json(result: CaseResult | SpeculationCost) -> dict:
    return asdict(result)
