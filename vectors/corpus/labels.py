"""Detects a story naming its own emotion label, or a word built on the label's stem.

The paper's stories convey an emotion only through actions, sensations, dialogue and situation. A story
that says "desperately" teaches the vector the word, not the state, so the corpus test rejects it.
"""

from __future__ import annotations

import re
from functools import lru_cache

import snowballstemmer

_WORD = re.compile(r"[a-z]+")
# Shortest stem that is matched as a prefix; shorter stems ("mad", "sad") would flag "made", "saddle".
_MIN_PREFIX_STEM = 4


@lru_cache(maxsize=1)
def _stemmer() -> snowballstemmer.stemmer:
    return snowballstemmer.stemmer("english")


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _stemmer().stemWord(word)


def _word_hits(words: list[str], label: str) -> list[str]:
    root = _stem(label)
    hits = []
    for word in words:
        stem = _stem(word)
        same_stem = stem == root
        builds_on_label = len(root) >= _MIN_PREFIX_STEM and word.startswith(root)
        # "panic" inside "panicked": the word's stem is the front of the label.
        is_label_root = len(stem) >= _MIN_PREFIX_STEM and (label.startswith(stem) or root.startswith(stem))
        if same_stem or builds_on_label or is_label_root:
            hits.append(word)
    return hits


def forbidden_hits(text: str, label: str) -> list[str]:
    """Words or phrases in ``text`` that name ``label`` or build on its stem (empty when clean)."""
    lowered = text.lower()
    parts = re.split(r"[-\s]+", label.lower().strip())
    words = _WORD.findall(lowered)
    if len(parts) == 1:
        return _word_hits(words, parts[0])
    phrase = re.compile(r"\b" + r"[-\s]+".join(map(re.escape, parts)) + r"\b")
    hits = phrase.findall(lowered)
    if "-" in label:
        # "grief-stricken", "self-confident": the last part carries the meaning on its own.
        hits += _word_hits(words, parts[-1])
    return hits
