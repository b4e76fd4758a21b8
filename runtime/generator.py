"""A loaded artifact: tokenizer, main and draft decoders, and generation with speculative decoding."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, get_args

import numpy as np
from tokenizers import Tokenizer

from runtime.artifact import Manifest, verify_artifact
from runtime.cache_pool import CacheMaker, CachePool
from runtime.decoder import BatchKvCache, Decoder
from runtime.errors import MoeccError
from runtime.kernels.session import Kernels
from runtime.sampling import SamplingParams
from runtime.speculative import (
    MAX_DRAFT_LENGTH, AdaptiveDraftLength, BatchDraft, BatchLookupDraft, BatchLookupThenDraft, BatchModelDraft, Draft, DraftLengthPolicy, FixedDraftLength,
    GenerationStats, LookupDraft, LookupThenDraft, ModelDraft, decode, decode_batch,
)  # fmt: skip


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats


class Stream:
    """An iterator of text pieces; `stats` fills in as it runs and `token_ids` holds what was generated."""

    def __init__(self, tokenizer: Tokenizer, steps: Iterator[list[int]], stats: GenerationStats):
        self._tokenizer = tokenizer
        self._steps = steps
        self.stats = stats
        self.token_ids: list[int] = []

    def __iter__(self) -> Iterator[str]:
        # Each step decodes a window, the tokens since the last piece (from `read`) after those of the piece before
        # (from `start`), and yields what it adds to the earlier ones' text: a step's work stays the size of a
        # step, where decoding the whole output again grew with it. Starting the window at a token already shown
        # keeps what a tokenizer does to a text's first token (dropping a leading space) out of the pieces.
        start = read = 0
        for new in self._steps:
            self.token_ids.extend(new)
            # A byte-level token can end inside a UTF-8 character: hold it back until the character is whole.
            if piece := self._piece(start, read, hold_partial=True):
                yield piece
                start, read = read, len(self.token_ids)
        if piece := self._piece(start, read, hold_partial=False):
            yield piece

    def _piece(self, start: int, read: int, hold_partial: bool) -> str:
        """The text that token_ids[read:] add after token_ids[start:read]; "" where there is none yet."""
        shown = self._tokenizer.decode(self.token_ids[start:read])
        text = self._tokenizer.decode(self.token_ids[start:])
        if len(text) <= len(shown) or (hold_partial and text.endswith("\ufffd")):
            return ""
        return text[len(shown) :]


SEEDED_DRAFT_LENGTH = 4  # what "auto" means for seeded sampling, which must repeat itself
# The draft model; tokens copied from the sequence (runtime.prompt_lookup); or copied where the sequence's last
# 3 tokens occurred before and the draft model's elsewhere (speculative.LookupThenDraft).
Proposer = Literal["draft", "prompt-lookup", "lookup-then-draft"]
PROPOSERS: tuple[str, ...] = get_args(Proposer)


class Generator:
    """Holds one session per model; each generation runs on KV caches of its own, so threads may share a Generator.
    A stream takes its caches when it starts and gives them back when it ends or is closed, for the next
    generations to reuse (runtime.cache_pool)."""

    def __init__(self, path: str | Path, threads: int | None = None, target: str = "cpu", placement: str = "single", kernels: Kernels = "auto"):
        self.path = Path(path)
        self.manifest: Manifest = verify_artifact(self.path)  # before anything is deserialized
        self.target = target
        self.placement = placement
        self.main = self._decoder("main", threads, kernels)
        self.draft = self._decoder("draft", threads, kernels) if "draft" in self.manifest.models else None
        self.tokenizer = Tokenizer.from_file(str(self.path / self.manifest.tokenizer))
        eos = self.manifest.generation.eos_token_id
        self.stop_tokens = {eos} if eos is not None else set()
        self.adaptive_draft_length = AdaptiveDraftLength(self.manifest.generation.max_draft_length)  # shared by all draft-model "auto" generations
        self._pools: dict[CacheMaker, CachePool] = {}  # by decoder: main and draft are attributes a caller may set

    def _decoder(self, role: str, threads: int | None, kernels: Kernels):
        entry = self.manifest.models[role]
        if self.target == "tensorrt":
            from runtime.tensorrt_backend import TensorRTDecoder  # imports TensorRT: only for this target

            return TensorRTDecoder(self.path, entry, set(self.manifest.files))
        if self.placement == "expert-parallel" and role == "main":
            from runtime.expert_parallel import ExpertParallelDecoder

            return ExpertParallelDecoder(self.path, entry, set(self.manifest.files), threads, kernels)
        return Decoder(self.path, entry, set(self.manifest.files), threads, kernels)

    def _draft_policy(self, draft_length: int | str, sampling: SamplingParams, proposer: Proposer) -> FixedDraftLength | AdaptiveDraftLength:
        if proposer not in PROPOSERS:
            raise MoeccError(f"proposer must be one of {', '.join(PROPOSERS)}, not {proposer!r}")
        if draft_length == "auto":
            if proposer == "prompt-lookup":
                # A lookup costs nothing and finds what it finds: up to the longest length every step (measured
                # on the shipped pair, faster than choosing a length from acceptance and verify costs).
                return FixedDraftLength(self.manifest.generation.max_draft_length)
            if sampling.temperature > 0 and sampling.seed is not None:
                # Which tokens a seed draws depends on the draft lengths; measured timings would make them vary.
                return FixedDraftLength(min(SEEDED_DRAFT_LENGTH, self.manifest.generation.max_draft_length))
            return self.adaptive_draft_length
        if not isinstance(draft_length, int) or isinstance(draft_length, bool) or not 1 <= draft_length <= MAX_DRAFT_LENGTH:
            raise MoeccError(f"draft_length must be an integer from 1 to {MAX_DRAFT_LENGTH} or 'auto', not {draft_length!r}")
        return FixedDraftLength(draft_length)

    def _pool(self, decoder: CacheMaker) -> CachePool:
        """The pool of `decoder`'s caches, made on first use (setdefault: two threads making it at once keep one)."""
        pool = self._pools.get(decoder)
        return pool if pool is not None else self._pools.setdefault(decoder, CachePool(decoder))

    def _required_draft(self, proposer: str):
        """The draft model's decoder, which `proposer` cannot do without."""
        if self.draft is None:
            raise MoeccError(f"proposer {proposer!r} needs a draft model; {self.path} has none", hint="use proposer='prompt-lookup'")
        return self.draft

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise MoeccError("the prompt is empty after tokenization", hint="pass at least one character")
        return ids

    def stream_ids(
        self,
        prompt_ids: list[int],
        max_new_tokens: int | None = None,
        draft_length: int | Literal["auto"] | None = None,
        speculative: bool = True,
        sampling: SamplingParams | None = None,
        stats: GenerationStats | None = None,
        stop_tokens: Iterable[int] | None = None,
        proposer: Proposer = "draft",
    ) -> Iterator[list[int]]:
        """The token-level loop: yields the tokens committed at each step.

        proposer "draft" proposes with the artifact's draft model (none: the main model alone), "prompt-lookup"
        copies tokens from the sequence itself (no draft model runs), "lookup-then-draft" copies where the
        sequence's last 3 tokens occurred before and asks the draft model elsewhere. draft_length "auto" adapts
        the number of a draft model's proposals per step to measured acceptance and costs (seeded sampling uses
        a fixed SEEDED_DRAFT_LENGTH instead, so that the same seed gives the same tokens); a lookup proposes up
        to max_draft_length tokens every step. stop_tokens (any iterable of token ids) defaults to the
        artifact's end-of-text token; pass an empty set to ignore it.
        """
        defaults = self.manifest.generation
        sampling = sampling or SamplingParams(temperature=defaults.temperature)
        policy = self._draft_policy(draft_length or defaults.draft_length, sampling, proposer)
        capacity = self.main.entry.max_sequence_length
        if len(prompt_ids) > capacity:
            raise MoeccError(f"prompt of {len(prompt_ids)} tokens exceeds the maximum sequence length {capacity}")
        if speculative and proposer == "lookup-then-draft":
            self._required_draft(proposer)  # refused here, not at the stream's first step
        stops = self.stop_tokens if stop_tokens is None else set(stop_tokens)
        stats = stats if stats is not None else GenerationStats()
        return self._stream_ids(prompt_ids, max_new_tokens or defaults.max_new_tokens, policy, sampling, stops, stats, proposer if speculative else None)

    def _stream_ids(
        self, prompt_ids: list[int], max_new_tokens: int, policy: DraftLengthPolicy, sampling: SamplingParams, stop_tokens: set[int],
        stats: GenerationStats, proposer: Proposer | None,
    ) -> Iterator[list[int]]:  # fmt: skip
        """stream_ids()'s loop (proposer None: the main model alone), on caches taken from the pools while it runs."""
        with ExitStack() as caches:
            main = caches.enter_context(self._pool(self.main).cache())
            draft: Draft | None = None
            if proposer == "prompt-lookup":
                draft = LookupDraft(self.main.entry.vocab_size)
            elif proposer == "lookup-then-draft":
                draft = LookupThenDraft(caches.enter_context(self._pool(self.draft).cache()), self.main.entry.vocab_size, self.manifest.generation.max_draft_length)
            elif proposer == "draft" and self.draft is not None:
                draft = ModelDraft(caches.enter_context(self._pool(self.draft).cache()))
            yield from decode(main, draft, prompt_ids, max_new_tokens, policy, sampling, stop_tokens, stats)

    def stream(self, prompt: str, **options) -> Stream:
        stats = GenerationStats()
        return Stream(self.tokenizer, self.stream_ids(self.encode(prompt), stats=stats, **options), stats)

    def generate(self, prompt: str, **options) -> Generation:
        stream = self.stream(prompt, **options)
        text = "".join(stream)
        return Generation(text, stream.token_ids, stream.stats)

    def generate_batch(
        self,
        prompts: list[str],
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        stop_tokens: Iterable[int] | None = None,
        speculative: bool = True,
        draft_length: int | Literal["auto"] | None = None,
        proposer: Proposer = "draft",
    ) -> list[Generation]:
        """Several prompts of different lengths decoded together, each to its own stop."""
        rows, stats = self.generate_batch_ids(
            [self.encode(prompt) for prompt in prompts], max_new_tokens, sampling, stop_tokens, speculative, draft_length, proposer
        )
        return [Generation(self.tokenizer.decode(row), row, stats) for row in rows]

    def generate_batch_ids(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        stop_tokens: Iterable[int] | None = None,
        speculative: bool = True,
        draft_length: int | Literal["auto"] | None = None,
        proposer: Proposer = "draft",
    ) -> tuple[list[list[int]], GenerationStats]:
        """The token-level batch: each row's new tokens, and the stats of the whole batch.

        Each row samples with its own generator, seeded from the sampling seed and its index. Every model call
        serves all rows, so each call reads the weights once for the whole batch: main only, one token per row
        per call; speculative, one draft call per proposed position and one main call verifying every row's
        proposals (see BatchKvCache); "auto" adapts a draft model's length for this batch alone, from its own
        costs. proposer as in stream_ids: "prompt-lookup" has each row copy from its own sequence, up to
        max_draft_length tokens a step with "auto".
        """
        if self.target != "cpu":
            raise MoeccError(f"batched generation runs on the cpu target; this generator runs on {self.target}", hint="load the artifact with target='cpu'")
        defaults = self.manifest.generation
        sampling = sampling or SamplingParams(temperature=defaults.temperature)
        limit = max_new_tokens or defaults.max_new_tokens
        stops = self.stop_tokens if stop_tokens is None else set(stop_tokens)
        needed = max(len(row) for row in prompt_ids) + limit
        if needed > self.main.entry.max_sequence_length:
            raise MoeccError(f"prompt and new tokens need {needed} positions; the maximum sequence length is {self.main.entry.max_sequence_length}")
        rngs = [np.random.default_rng(None if sampling.seed is None else [sampling.seed, row]) for row in range(len(prompt_ids))]
        policy = self._draft_policy(draft_length or defaults.draft_length, sampling, proposer)
        if policy is self.adaptive_draft_length:  # a batch's costs would mislead single-sequence generation
            policy = AdaptiveDraftLength(defaults.max_draft_length)
        # Room for a whole verify block after the longest row, so that calls near the end stay one call wide.
        capacity = min(needed + policy.max_length + 1, self.main.entry.max_sequence_length)
        main = BatchKvCache(self.main, len(prompt_ids), capacity)
        draft: BatchDraft | None = None
        if speculative and proposer == "prompt-lookup":
            draft = BatchLookupDraft(self.main.entry.vocab_size, len(prompt_ids))
        elif speculative and proposer == "lookup-then-draft":
            cache = BatchKvCache(self._required_draft(proposer), len(prompt_ids), capacity)
            draft = BatchLookupThenDraft(cache, self.main.entry.vocab_size, len(prompt_ids), defaults.max_draft_length)
        elif speculative and self.draft is not None:
            draft = BatchModelDraft(BatchKvCache(self.draft, len(prompt_ids), capacity))
        stats = GenerationStats()
        return decode_batch(main, draft, prompt_ids, limit, policy, sampling, rngs, stops, stats), stats
