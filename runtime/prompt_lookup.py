"""Prompt lookup: proposals copied from the sequence itself, where no draft model is run.

Where the sequence's last n tokens occurred before (n from MAX_NGRAM down to MIN_NGRAM, the longest match
first), the tokens that followed their latest earlier occurrence are proposed. Code and structured text
repeat themselves (names, signatures, boilerplate, lines echoed from the prompt), and a proposal costs a
dictionary lookup instead of draft-model calls; the main model verifies it like any other, so the output
stays the main model's own. onnxruntime-genai (n-gram speculative decoding), vLLM ("ngram") and
transformers (prompt_lookup_num_tokens) offer the same proposer.
"""

from __future__ import annotations

MAX_NGRAM = 3
MIN_NGRAM = 2  # single-token matches propose far more than they get accepted (measured on the shipped pair)


class PromptLookup:
    """One sequence's n-gram index: each n-gram of the sequence, by where it last ended. The sequence only
    grows (committed tokens are never taken back), so the index is extended, never rebuilt."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.sizes = range(max_ngram, min_ngram - 1, -1)  # longest first
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> the position right after its latest occurrence
        self._indexed = 1  # n-grams ending before this position are in the index

    def index(self, tokens: list[int]) -> None:
        """Add the n-grams of `tokens` (the sequence so far) but those ending it, which have no continuation yet."""
        for stop in range(self._indexed, len(tokens)):
            for size in self.sizes:
                if stop >= size:
                    self._ends[tuple(tokens[stop - size : stop])] = stop
        self._indexed = max(self._indexed, len(tokens))

    def propose(self, tokens: list[int], length: int) -> list[int]:
        """Up to `length` tokens that followed the latest earlier occurrence of the longest n-gram ending
        `tokens`; none if no such n-gram occurred before. A continuation that reaches the sequence's end goes
        on with its own first tokens (the sequence repeating with that period), as an overlapping copy does."""
        self.index(tokens)
        end = len(tokens)
        for size in self.sizes:
            if end > size:
                start = self._ends.get(tuple(tokens[end - size :]))
                if start is not None:
                    copied = tokens[start : start + length]
                    while len(copied) < length:  # the match overlaps the end: a run repeating every end - start tokens
                        copied.append(copied[len(copied) - (end - start)])
                    return copied
        return []
