"""Turning logits into next-token distributions (greedy, temperature, top-k, top-p) and drawing from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def one_hot(token: int, size: int) -> np.ndarray:
    """The distribution [size] float64 that draws `token` for certain."""
    probs = np.zeros(size, dtype=np.float64)
    probs[token] = 1.0
    return probs


def distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution one would sample from, [V] float64. Greedy is the one-hot of the argmax.

    Expressing greedy as a one-hot distribution lets one acceptance rule serve both modes:
    rejection sampling over one-hot distributions is exactly "accept while the argmaxes agree".
    """
    if params.greedy:
        return one_hot(int(np.argmax(logits)), logits.shape[-1])
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        cut = int(np.searchsorted(cumulative, params.top_p)) + 1
        kept = np.zeros_like(probs)
        kept[order[:cut]] = probs[order[:cut]]
        probs = kept / kept.sum()
    return probs


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a distribution; a one-hot distribution needs no randomness."""
    top = int(np.argmax(probs))
    if probs[top] == 1.0:
        return top
    return int(rng.choice(probs.size, p=probs))
