"""The emotion-story, neutral-dialogue and transcript corpus used to extract, calibrate and validate vectors.

Data lives in ``data/``: ``stories/<emotion>.jsonl`` (stories that show an emotion without naming it),
``neutral_dialogues.jsonl`` (emotion-free chats on the same topics) and ``transcripts/*.jsonl`` (chat and
agent transcripts in which the *assistant* shows an emotion, eight labels per scenario, matched). The split
is fixed by topic (or scenario), so held-out texts are on topics the vectors never saw: index 4 mod 5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from limbic.vectors.concepts import file_stem

DATA = Path(__file__).parent / "data"
Split = Literal["train", "heldout", "all"]


@dataclass(frozen=True)
class Story:
    emotion: str
    index: int
    topic: int
    person: str
    text: str


def is_heldout(topic: int) -> bool:
    return topic % 5 == 4


def _in_split(topic: int, split: Split) -> bool:
    return split == "all" or (split == "heldout") == is_heldout(topic)


def available_emotions(data: Path = DATA) -> list[str]:
    """Emotions that have a story file, in the order of the paper's list."""
    from limbic.vectors.concepts import all_emotions

    present = {p.stem for p in (data / "stories").glob("*.jsonl")}
    return [e for e in all_emotions() if file_stem(e) in present]


def load_stories(emotion: str, split: Split = "all", limit: int | None = None, data: Path = DATA) -> list[Story]:
    path = data / "stories" / f"{file_stem(emotion)}.jsonl"
    stories = [Story(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    chosen = [s for s in stories if _in_split(s.topic, split)]
    return chosen[:limit] if limit is not None else chosen


def load_neutral_dialogues(split: Split = "all", limit: int | None = None, data: Path = DATA) -> list[list[dict]]:
    """Neutral chats as OpenAI-style message lists."""
    rows = [json.loads(line) for line in (data / "neutral_dialogues.jsonl").read_text().splitlines() if line]
    chosen = [row["messages"] for row in rows if _in_split(row["topic"], split)]
    return chosen[:limit] if limit is not None else chosen


@dataclass(frozen=True)
class Transcript:
    scenario: int
    label: str  # the assistant's emotion, or "neutral"
    kind: str  # "agent" or "chat"
    messages: list[dict]
    writer: str | None = None  # the external set names its writing session


TRANSCRIPT_LABELS = ("desperate", "panicked", "calm", "afraid", "angry", "ashamed", "hopeful", "neutral")


def load_transcripts(split: Split = "all", data: Path = DATA) -> list[Transcript]:
    """The labelled transcripts of ``split``, in scenario then label order."""
    rows = [
        json.loads(line)
        for path in sorted((data / "transcripts").glob("part-*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    chosen = [Transcript(**row) for row in rows if _in_split(row["scenario"], split)]
    return sorted(chosen, key=lambda t: (t.scenario, TRANSCRIPT_LABELS.index(t.label)))


def load_external_transcripts(data: Path = DATA) -> list[Transcript]:
    """The external test set: other writers, another brief and other scenarios (``data/external``). Nothing
    is ever fitted or chosen on it; it measures how far the vectors and the text-only baseline transfer."""
    rows = [
        json.loads(line)
        for path in sorted((data / "external").glob("part-*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    return sorted((Transcript(**row) for row in rows), key=lambda t: (t.scenario, TRANSCRIPT_LABELS.index(t.label)))


def topics(data: Path = DATA) -> list[str]:
    return [t for t in (data / "story_topics.txt").read_text().splitlines() if t.strip()]
