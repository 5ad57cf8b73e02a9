"""Validate corpus files: ``python -m limbic.vectors.corpus.check [FILE ...]`` (default: the whole corpus).

Exits 1 and lists every problem: bad schema, wrong topic/person assignment, or a story that names its label.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from limbic.vectors.concepts import all_emotions
from limbic.vectors.corpus.labels import forbidden_hits

DATA = Path(__file__).parent / "data"


def expected_topic(emotion_index: int, story_index: int, n_topics: int = 100) -> int:
    return (emotion_index * 7 + story_index * 3) % n_topics


def expected_person(story_index: int) -> str:
    return "first" if story_index % 2 == 0 else "third"


def check_story_file(path: Path, emotions: list[str]) -> list[str]:
    problems = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path.name}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not JSON ({exc})")
            continue
        emotion, index = row.get("emotion"), row.get("index")
        if emotion not in emotions:
            problems.append(f"{where}: unknown emotion {emotion!r}")
            continue
        if row.get("topic") != expected_topic(emotions.index(emotion), index):
            problems.append(f"{where}: topic should be {expected_topic(emotions.index(emotion), index)}")
        if row.get("person") != expected_person(index):
            problems.append(f"{where}: person should be {expected_person(index)}")
        hits = forbidden_hits(row.get("text", ""), emotion)
        if hits:
            problems.append(f"{where}: names its label: {sorted(set(hits))}")
    return problems


def main(argv: list[str]) -> int:
    names = list(all_emotions())
    files = [Path(a) for a in argv] or sorted((DATA / "stories").glob("*.jsonl"))
    problems = [p for f in files if f.parent.name == "stories" for p in check_story_file(f, names)]
    for problem in problems:
        print(problem)
    print(f"{len(files)} files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
