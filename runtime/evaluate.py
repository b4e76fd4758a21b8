"""Scoring text with a loaded decoder: negative log-likelihood and perplexity over fixed windows."""

from __future__ import annotations

import math

import numpy as np

from runtime.decoder import Decoder


def next_token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) at each position, from logits [S,V] and the S tokens that follow them."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -log_probs[np.arange(len(targets)), targets]


def token_nll(decoder: Decoder, token_ids: list[int], window: int = 256) -> np.ndarray:
    """Negative log-likelihood of every token after the first of each window (each window starts a fresh cache)."""
    losses = []
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        cache = decoder.new_cache(capacity=len(chunk))
        losses.append(next_token_nll(cache.feed(chunk[:-1]), np.asarray(chunk[1:])))  # logits [S,V]
    return np.concatenate(losses)


def perplexity(decoder: Decoder, token_ids: list[int], window: int = 256) -> float:
    return math.exp(float(token_nll(decoder, token_ids, window).mean()))
