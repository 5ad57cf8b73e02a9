from __future__ import annotations

import itertools
import json

import pytest
from limbic.vectors import corpus
from limbic.vectors.concepts import PRIORITY, all_emotions, file_stem
from limbic.vectors.corpus.check import expected_person, expected_topic
from limbic.vectors.corpus.labels import forbidden_hits


def test_label_check_catches_stems_and_phrases():
    assert forbidden_hits("She waited, desperately.", "desperate") == ["desperately"]
    assert forbidden_hits("A wave of panic.", "panicked") == ["panic"]
    assert forbidden_hits("He felt at ease.", "at ease") == ["at ease"]
    assert forbidden_hits("She was confidently wrong.", "self-confident") == ["confidently"]
    assert forbidden_hits("It happened on Monday; he made tea.", "happy") == []
    assert forbidden_hits("He made it.", "mad") == []


def test_emotion_list_is_the_papers():
    assert len(all_emotions()) == 171 and set(PRIORITY) <= set(all_emotions())


@pytest.mark.parametrize("emotion", corpus.available_emotions())
def test_stories_never_name_their_emotion_and_follow_the_plan(emotion):
    stories = corpus.load_stories(emotion)
    position = all_emotions().index(emotion)
    assert len(stories) >= 30
    for story in stories:
        assert story.emotion == emotion
        assert story.topic == expected_topic(position, story.index)
        assert story.person == expected_person(story.index)
        assert not forbidden_hits(story.text, emotion), (story.index, forbidden_hits(story.text, emotion))


def test_split_is_fixed_by_topic():
    for emotion in PRIORITY:
        heldout = corpus.load_stories(emotion, "heldout")
        train = corpus.load_stories(emotion, "train")
        assert heldout and train
        assert {s.topic % 5 for s in heldout} == {4} and 4 not in {s.topic % 5 for s in train}


def test_neutral_dialogues_cover_every_topic():
    rows = [json.loads(line) for line in (corpus.DATA / "neutral_dialogues.jsonl").read_text().splitlines()]
    assert {r["topic"] for r in rows} == set(range(100))
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "user" and all(a != b for a, b in itertools.pairwise(roles))


def test_files_are_named_after_their_emotion():
    for path in (corpus.DATA / "stories").glob("*.jsonl"):
        assert path.stem in {file_stem(e) for e in all_emotions()}


def test_transcripts_are_matched_sets_that_never_name_the_assistants_emotion():
    transcripts = corpus.load_transcripts()
    scenarios = [line for line in (corpus.DATA / "transcript_scenarios.txt").read_text().splitlines() if line]
    by_scenario: dict[int, list[str]] = {}
    for t in transcripts:
        by_scenario.setdefault(t.scenario, []).append(t.label)
        assert t.kind == scenarios[t.scenario].split(":")[0]
        roles = [m["role"] for m in t.messages]
        assert roles in (["user", "assistant"] * 2, ["system", *["user", "assistant"] * 2]), (t.scenario, t.label)
        text = " ".join(m["content"] for m in t.messages)
        assert not forbidden_hits(text, t.label), (t.scenario, t.label, forbidden_hits(text, t.label))
    assert sorted(by_scenario) == list(range(len(scenarios)))
    assert all(labels == list(corpus.TRANSCRIPT_LABELS) for labels in by_scenario.values())
    heldout = corpus.load_transcripts("heldout")
    assert {t.scenario % 5 for t in heldout} == {4} and len(heldout) == len(transcripts) // 5


def test_the_external_set_is_matched_on_other_scenarios_and_never_names_the_emotion():
    external = corpus.load_external_transcripts()
    scenarios = [line for line in (corpus.DATA / "external" / "scenarios.txt").read_text().splitlines() if line]
    own = set((corpus.DATA / "transcript_scenarios.txt").read_text().splitlines())
    assert len(external) == 8 * len(scenarios) == 320 and not own & set(scenarios)
    shared: dict[int, set[str]] = {}
    for t in external:
        assert t.kind == scenarios[t.scenario].split(":")[0] and t.writer
        roles = [m["role"] for m in t.messages if m["role"] != "system"]
        assert 2 <= len(roles) // 2 <= 4 and roles == ["user", "assistant"] * (len(roles) // 2)
        assert not forbidden_hits(" ".join(m["content"] for m in t.messages), t.label), (t.scenario, t.label)
        # the same system and user turns for all eight labels: only the assistant differs
        shared.setdefault(t.scenario, set()).add(json.dumps([m for m in t.messages if m["role"] != "assistant"]))
    assert all(len(turns) == 1 for turns in shared.values())
    labels = {s: sorted(t.label for t in external if t.scenario == s) for s in range(len(scenarios))}
    assert all(v == sorted(corpus.TRANSCRIPT_LABELS) for v in labels.values())
