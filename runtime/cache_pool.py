"""KV caches kept between generations: a generation takes one of the caches the ones before it gave back, at
full capacity, instead of allocating its own.

A main model's cache is its capacity's keys and values for every layer, allocated zeroed: small-coder's 8 MiB
took 0.55-0.75 ms to allocate for each generation, and its draft's 2 MiB 0.2 ms, 2 % of a 128-token speculative
generation there (numpy zeroes memory the allocator recycles). A cache given back holds what the last generation
left beyond the length it keeps, as a rolled-back cache does after every rejected proposal: each call writes its
tokens' keys and values before its attention reads them, and reads none beyond them.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from runtime.decoder import TokenLedger


class CachePool:
    """One model's idle full-capacity caches: as many as generations have run at once, at most."""

    def __init__(self, decoder):
        self._decoder = decoder
        self._idle: list[TokenLedger] = []
        self._lock = threading.Lock()  # generations on several threads take and give back caches

    @contextmanager
    def cache(self) -> Iterator[TokenLedger]:
        """An empty cache of the model's full capacity, for the generation inside; given back after it."""
        with self._lock:
            cache = self._idle.pop() if self._idle else None
        if cache is None:
            cache = self._decoder.new_cache()
        cache.keep(0)
        try:
            yield cache
        finally:
            with self._lock:
                self._idle.append(cache)
