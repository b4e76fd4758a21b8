"""Timing a loaded artifact: prefill and decode speed, acceptance, memory; several runs, median and spread.

Pure measurement (numpy + the runtime); `moecc bench` renders the table, the JSON and the chart.
"""

from __future__ import annotations

import resource
import statistics
from dataclasses import asdict, dataclass, field

from runtime.generator import Generator
from runtime.speculative import GenerationStats


@dataclass(frozen=True)
class Mode:
    name: str  # "main only", "speculative k=4", "speculative auto"
    speculative: bool
    draft_length: int | str | None = None


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
    draft_lengths: dict[int, int] = field(default_factory=dict)  # chosen length -> steps


def modes_for(generator: Generator, draft_length: int) -> list[Mode]:
    modes = [Mode("main only", speculative=False)]
    if generator.draft is not None:
        modes += [Mode(f"speculative k={draft_length}", True, draft_length), Mode("speculative auto", True, "auto")]
    return modes


def run_case(generator: Generator, mode: Mode, prompt: list[int], new_tokens: int, runs: int) -> CaseResult:
    """`runs` generations of exactly `new_tokens` (end-of-text ignored) after `prompt`, after one warm-up."""
    records: list[GenerationStats] = []
    for run in range(runs + 1):
        stats = GenerationStats()
        options = {"draft_length": mode.draft_length} if mode.speculative else {}
        for _ in generator.stream_ids(prompt, max_new_tokens=new_tokens, speculative=mode.speculative, stats=stats, stop_tokens=set(), **options):
            pass
        if run:  # the first run warms caches and ONNX Runtime's allocations
            records.append(stats)
    proposed, accepted = sum(s.proposed for s in records), sum(s.accepted for s in records)
    calls, lengths = sum(s.verify_calls for s in records), [k for s in records for k in s.draft_lengths]
    return CaseResult(
        mode=mode.name, prompt_tokens=len(prompt), new_tokens=new_tokens, batch_size=1, runs=runs,
        prefill_tokens_per_second=Spread.of([s.prefill_tokens_per_second for s in records]),
        decode_tokens_per_second=Spread.of([s.decode_tokens_per_second for s in records]),
        milliseconds_per_token=Spread.of([1000 / s.decode_tokens_per_second for s in records]),
        acceptance_rate=accepted / proposed if proposed else 0.0,
        mean_accepted_length=sum(s.new_tokens for s in records) / calls if calls else 0.0,
        mean_draft_length=sum(lengths) / len(lengths) if lengths else 0.0,
        draft_lengths={k: lengths.count(k) for k in sorted(set(lengths))} if mode.speculative else {},
    )


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def as_json(result: CaseResult) -> dict:
    return asdict(result)
