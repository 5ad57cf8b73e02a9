"""Prompt scores per block of tokens, so prompts that share a prefix can use vLLM's prefix cache.

vLLM serves a cached prompt block from its KV cache without running the model on it, so its rows are never
scored again. limbic keeps the scores those blocks had when they were computed, keyed the way vLLM keys its
prefix cache: full blocks of ``block_size`` tokens, each identified by a hash chained over every token
before it (the same tokens at the same positions after the same prefix have the same residual stream, and
so the same scores, up to float rounding between batch shapes). A request whose cached blocks are not all
here gets its prefix scored again (the caller's fallback): a miss costs time, never a score.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class PromptScoreCache:
    def __init__(self, block_size: int, width: int, capacity_bytes: int) -> None:
        self.block_size = block_size
        self.width = width
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self._blocks: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._blocks)

    def block_keys(self, token_ids: list[int], n_tokens: int) -> list[bytes]:
        """One key per full block within the first ``n_tokens`` tokens."""
        keys, parent = [], b""
        tokens = np.asarray(token_ids[: n_tokens - n_tokens % self.block_size], dtype="<i8")
        for start in range(0, len(tokens), self.block_size):
            parent = hashlib.sha256(parent + tokens[start : start + self.block_size].tobytes()).digest()
            keys.append(parent)
        return keys

    def lookup(self, token_ids: list[int], n_tokens: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Scores and norms of positions ``0 .. n_tokens`` (a multiple of the block size), or None unless every
        block is here."""
        if n_tokens % self.block_size:
            return None
        keys = self.block_keys(token_ids, n_tokens)
        if not all(key in self._blocks for key in keys):
            return None
        for key in keys:
            self._blocks.move_to_end(key)
        if not keys:
            return np.zeros((0, self.width), np.float32), np.zeros(0, np.float32)
        blocks = [self._blocks[key] for key in keys]
        return np.concatenate([z for z, _ in blocks]), np.concatenate([n for _, n in blocks])

    def store(self, token_ids: list[int], z: np.ndarray, norms: np.ndarray) -> None:
        """Keeps the full blocks of a prompt whose rows ``z`` / ``norms`` were scored (positions from 0)."""
        for i, key in enumerate(self.block_keys(token_ids, len(z))):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            rows = slice(i * self.block_size, (i + 1) * self.block_size)
            block = (z[rows].copy(), norms[rows].copy())
            self._blocks[key] = block
            self.bytes += block[0].nbytes + block[1].nbytes
        while self.bytes > self.capacity_bytes and self._blocks:
            _, (old_z, old_norms) = self._blocks.popitem(last=False)
            self.bytes -= old_z.nbytes + old_norms.nbytes
