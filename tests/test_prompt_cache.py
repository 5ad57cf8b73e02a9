"""The prompt score cache behind vLLM's prefix cache: blocks keyed by their whole prefix, served only whole,
kept within a byte budget, least recently used first out."""

from __future__ import annotations

import numpy as np
from limbic.monitors.prompt_cache import PromptScoreCache

WIDTH = 3


def rows(n: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    z = (np.arange(n * WIDTH, dtype=np.float32).reshape(n, WIDTH) + offset).astype(np.float32)
    return z, np.arange(n, dtype=np.float32) + offset


def test_full_blocks_are_served_back_exactly():
    cache = PromptScoreCache(block_size=4, width=WIDTH, capacity_bytes=10**6)
    tokens = list(range(100, 111))  # 11 tokens: two full blocks and a partial one
    z, norms = rows(11)
    cache.store(tokens, z, norms)
    assert len(cache) == 2
    hit = cache.lookup(tokens, 8)
    assert hit is not None and np.array_equal(hit[0], z[:8]) and np.array_equal(hit[1], norms[:8])
    assert np.array_equal(cache.lookup([*tokens, 5, 6], 4)[0], z[:4])  # a longer prompt, same first block
    assert cache.lookup(tokens, 12) is None  # the third block was never full
    assert cache.lookup(tokens, 6) is None  # vLLM caches whole blocks only
    assert cache.lookup(tokens, 0)[0].shape == (0, WIDTH)


def test_a_block_is_keyed_by_everything_before_it():
    cache = PromptScoreCache(block_size=2, width=WIDTH, capacity_bytes=10**6)
    cache.store([1, 2, 3, 4], *rows(4))
    assert cache.lookup([9, 2, 3, 4], 4) is None  # same second block after another first block
    assert cache.lookup([1, 2, 3, 5], 4) is None
    assert cache.lookup([1, 2, 3, 5], 2) is not None


def test_the_byte_budget_evicts_the_least_recently_used_blocks():
    block_bytes = 2 * WIDTH * 4 + 2 * 4
    cache = PromptScoreCache(block_size=2, width=WIDTH, capacity_bytes=3 * block_bytes)
    cache.store([1, 2, 3, 4], *rows(4))  # blocks A, AB
    cache.store([7, 8], *rows(2, offset=50))  # block C
    assert cache.lookup([1, 2], 2) is not None  # touch A: AB is now the oldest
    cache.store([5, 6], *rows(2, offset=90))  # D: over budget, AB goes
    assert cache.bytes <= 3 * block_bytes and len(cache) == 3
    assert cache.lookup([1, 2, 3, 4], 4) is None and cache.lookup([1, 2], 2) is not None
    assert cache.lookup([7, 8], 2) is not None and cache.lookup([5, 6], 2) is not None
