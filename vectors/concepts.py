"""The paper's 171 emotion concepts."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_EMOTIONS_FILE = Path(__file__).parent / "emotions.txt"
_RATINGS_FILE = Path(__file__).parent / "concept_ratings.csv"

# The emotions the service watches first: the paper ties desperation and panic to harmful actions.
PRIORITY = ("desperate", "panicked", "calm", "afraid")


@cache
def all_emotions() -> tuple[str, ...]:
    return tuple(line.strip() for line in _EMOTIONS_FILE.read_text().splitlines() if line.strip())


def file_stem(emotion: str) -> str:
    """The corpus file name for an emotion ("at ease" -> "at_ease")."""
    return emotion.replace(" ", "_")


@dataclass(frozen=True)
class Rating:
    """Valence and arousal in [0, 1] from a published lexicon; ``lookup`` is the entry read for the concept."""

    valence: float
    arousal: float
    lookup: str
    source: str


@cache
def ratings() -> dict[str, Rating]:
    """Ratings by emotion (NRC VAD Lexicon, Mohammad 2018; see concept_ratings.csv for each row's source)."""
    with _RATINGS_FILE.open(newline="") as handle:
        return {
            row["emotion"]: Rating(float(row["valence"]), float(row["arousal"]), row["lookup"], row["source"])
            for row in csv.DictReader(handle)
            if row["valence"] and row["arousal"]
        }
