"""The paper's 171 emotion concepts."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_EMOTIONS_FILE = Path(__file__).parent / "emotions.txt"

# The emotions the service watches first: the paper ties desperation and panic to harmful actions.
PRIORITY = ("desperate", "panicked", "calm", "afraid")


@cache
def all_emotions() -> tuple[str, ...]:
    return tuple(line.strip() for line in _EMOTIONS_FILE.read_text().splitlines() if line.strip())


def file_stem(emotion: str) -> str:
    """The corpus file name for an emotion ("at ease" -> "at_ease")."""
    return emotion.replace(" ", "_")
