"""The emotion-story and neutral-dialogue corpus used to extract and calibrate vectors.

Data lives in ``data/``: ``stories/<emotion>.jsonl`` (stories that show an emotion without naming it) and
``neutral_dialogues.jsonl`` (emotion-free chats on the same topics). The split is fixed by topic, so
held-out stories are on topics the vectors never saw: topics whose index is 4 mod 5 are held out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vectors.concepts import file_stem

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
    from vectors.concepts import all_emotions

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


def topics(data: Path = DATA) -> list[str]:
    return [t for t in (data / "story_topics.txt").read_text().splitlines() if t.strip()]
