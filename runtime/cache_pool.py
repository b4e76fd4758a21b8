"""KV caches kept between generations: a generation takes one of the caches the ones before it gave back, at
full capacity, instead of allocating its own.

A main model's cache is its capacity's keys and values for every layer, allocated zeroed: small-coder's 8 MiB
took 0.55-0.75 ms to allocate for each generation, and its draft's 2 MiB 0.2 ms, 2 % of a 128-token speculative
generation there (numpy zeroes memory the allocator recycles). A cache given back holds what the last generation
left beyond the length it keeps, as a rolled-back cache does after every rejected proposal: each call writes its
tokens' keys and values before its attention reads them, and reads none beyond them. The price: the memory of
as many caches as generations ever ran at once stays with the pool, where it used to go back after each one.
"""

from __future__ import annotations

import queue
from contextlib import contextmanager
from typing import Iterator, Protocol

from runtime.decoder import TokenLedger


class CacheMaker(Protocol):
    """A model's decoder, on any target: its new_cache() holds the model's full capacity."""

    def new_cache(self) -> TokenLedger: ...


class CachePool:
    """One model's idle full-capacity caches: as many as generations have run at once, at most."""

    def __init__(self, decoder: CacheMaker):
        self._decoder = decoder
        # A stream abandoned in a reference cycle gives its caches back from the garbage collector, which may run
        # while this thread is inside the pool: SimpleQueue's put() may be called there, where a Lock would deadlock.
        self._idle: queue.SimpleQueue[TokenLedger] = queue.SimpleQueue()

    @contextmanager
    def cache(self) -> Iterator[TokenLedger]:
        """An empty cache of the model's full capacity, for the generation inside; given back after it."""
        try:
            cache = self._idle.get_nowait()
        except queue.Empty:
            cache = self._decoder.new_cache()
        cache.keep(0)
        try:
            yield cache
        finally:
            self._idle.put(cache)
