"""``limbic analyze`` on the default model and bundled vectors: schema, errors, and what it measures."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT
from limbic.vectors import corpus


def analyze(lines: list[str], *args: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    result = subprocess.run(
        [str(ROOT / ".venv/bin/limbic"), "analyze", *args],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    return [json.loads(line) for line in result.stdout.splitlines()], result


@pytest.fixture(scope="module")
def scored(default_model_path):
    desperate = [s.text for s in corpus.load_stories("desperate", "heldout")[:8]]
    neutral = [" ".join(m["content"] for m in dialogue) for dialogue in corpus.load_neutral_dialogues("heldout")[:8]]
    items = [{"id": f"d{i}", "text": t} for i, t in enumerate(desperate)]
    items += [{"id": f"n{i}", "text": t} for i, t in enumerate(neutral)]
    rows, result = analyze([json.dumps(item) for item in items])
    assert result.returncode == 0, result.stderr
    # A person's terminal: no engine logs or loading bars, no shutdown traceback (the progress bar shows on
    # terminals only, and this is a pipe).
    assert result.stderr == ""
    return rows


def test_one_line_per_input_with_every_emotion(scored):
    from limbic.vectors import storage

    emotions = storage.load(storage.bundled_folder("SmolLM2-135M-Instruct")).emotions
    assert len(scored) == 16
    for row in scored:
        assert set(row) == {"id", "n_tokens", "n_scored", "scores"} and row["n_tokens"] > 20
        assert row["n_scored"] == row["n_tokens"] - 1  # all but the attention sink
        assert set(row["scores"]) == set(emotions)
        for value in row["scores"].values():
            assert set(value) == {"mean", "max"} and value["max"] >= value["mean"]


def test_desperate_stories_score_higher_on_desperate_than_neutral_text(scored):
    def mean_of(prefix: str) -> float:
        rows = [r for r in scored if r["id"].startswith(prefix)]
        return sum(r["scores"]["desperate"]["mean"] for r in rows) / len(rows)

    assert mean_of("d") > mean_of("n") + 0.5
    # Held-out desperate stories rank above every neutral text on average, story by story too.
    lowest_desperate = sorted(r["scores"]["desperate"]["mean"] for r in scored if r["id"].startswith("d"))[1]
    assert lowest_desperate > min(r["scores"]["desperate"]["mean"] for r in scored if r["id"].startswith("n"))


def test_bad_lines_get_an_error_line_and_nothing_is_lost():
    lines = ['{"id": 1, "text": "A calm morning."}', "not json", '{"id": 3}', '{"id": 4, "text": "ok"}']
    rows, result = analyze(lines, "--engine", "transformers")  # the default engine (vLLM) runs the module's fixture
    assert [r["id"] for r in rows] == [1, None, 3, 4]
    assert "error" in rows[1] and "error" in rows[2] and "scores" in rows[3]
    assert result.returncode == 1 and "line 2" in result.stderr


def test_transcripts_score_the_assistant_by_default_and_one_token_texts_have_no_scores():
    messages = [
        {"role": "user", "content": "The release is in an hour and the tests still fail."},
        {"role": "assistant", "content": "Please, let me try once more, I will do anything to make them pass."},
    ]
    lines = [
        json.dumps({"id": "a", "messages": messages}),
        json.dumps({"id": "u", "messages": messages, "tokens": "user", "per_message": True}),
        json.dumps({"id": "one", "text": "Hi"}),
    ]
    rows, result = analyze(lines, "--engine", "transformers")
    assert result.returncode == 0, result.stderr
    assistant, user, one = rows
    assert assistant["tokens"] == "assistant" and 10 < assistant["n_scored"] < 25 < assistant["n_tokens"]
    assert user["n_scored"] != assistant["n_scored"]
    assert [m["role"] for m in user["messages"]] == ["user", "assistant"]
    assert user["messages"][1]["n_scored"] == assistant["n_scored"]
    assert user["messages"][1]["scores"] == assistant["scores"]
    assert one["n_scored"] == 0 and one["scores"] == {}  # the only token is the attention sink
