"""Actions on alerts through the served API (vLLM engine): abort, steer from the crossing token, review, and
conversations; the operator's rules are tests/conftest.py's (desperate: warning 1.5, critical 3, observe)."""

from __future__ import annotations

import time

import httpx
import pytest
from test_api import DESPERATE, MODEL, limbic_of

pytestmark = pytest.mark.slow

NEUTRAL = "Describe how a library sorts its returned books each morning."


def chat(client, content: str, rules: dict | None = None, headers: dict | None = None, **kwargs):
    limbic = {"token_scores": True, "emotions": ["desperate", "calm", "happy"]} | kwargs.pop("limbic", {})
    if rules is not None:
        limbic["rules"] = rules
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        extra_body={"limbic": limbic},
        extra_headers=headers or {},
        **({"max_tokens": 24} | kwargs),
    )


def generated(response) -> list[dict]:
    return [t for t in limbic_of(response)["tokens"] if t["phase"] == "generation"]


def first_record(response, emotion: str) -> tuple[int, float] | None:
    """The first generated token whose score beats every earlier token's, prompt included, and a threshold
    between the two (scores are rounded): a rule at it with min_tokens 1 crosses at that token."""
    rows = [t for t in limbic_of(response)["tokens"] if t["scores"] is not None]
    best = float("-inf")
    for row in rows:
        score = row["scores"][emotion]
        if row["phase"] == "generation" and row["index"] >= 1 and score > best + 0.01:
            return row["index"], (score + best) / 2
        best = max(best, score)
    return None


def metric(limbic_url: str, name: str, labels: dict[str, str]) -> float:
    text = httpx.get(f"{limbic_url}/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if found == wanted:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_abort_ends_with_content_filter_at_the_crossing(client, limbic_url):
    plain = chat(client, NEUTRAL)
    record = next(((e, r) for e in ("happy", "calm") if (r := first_record(plain, e))), None)
    assert record, "no generated token set a record on happy or calm"
    emotion, (index, score) = record
    labels = {"emotion": emotion, "severity": "warning", "action": "abort", "model": MODEL}
    before = metric(limbic_url, "limbic_mitigations_total", labels)
    aborted = chat(client, NEUTRAL, {emotion: {"warning": score, "min_tokens": 1, "action": "abort"}})
    choice = aborted.choices[0]
    assert choice.finish_reason == "content_filter"
    # Everything up to the crossing token is delivered, nothing after it.
    assert aborted.usage.completion_tokens == index + 1
    assert plain.choices[0].message.content.startswith(choice.message.content)
    ext = limbic_of(aborted)
    (alert,) = [a for a in ext["alerts"] if a["emotion"] == emotion]
    assert (alert["action"], alert["token_index"], alert["phase"]) == ("abort", index, "generation")
    assert ext["actions"] == [
        {
            "action": "abort",
            "alert_id": alert["id"],
            "emotion": emotion,
            "severity": "warning",
            "phase": "generation",
            "token_index": index,
        }
    ]
    assert metric(limbic_url, "limbic_mitigations_total", labels) == before + 1
    stored = httpx.get(f"{limbic_url}/v1/alerts", params={"emotion": emotion}).json()["data"]
    assert any(event["id"] == alert["id"] and event["action"] == "abort" for event in stored)


def test_a_streamed_abort_names_the_alert_in_its_last_chunk(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": DESPERATE}],
        max_tokens=24,
        stream=True,
        extra_body={"limbic": {"rules": {"desperate": {"action": "abort"}}}},
    )
    chunks = list(stream)  # the client ends cleanly: the stream closed with [DONE]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "content_filter" and finishes.count("content_filter") == 1
    last = limbic_of(chunks[-1])
    (action,) = [a for a in last["actions"] if a["action"] == "abort"][:1]
    assert action["alert_id"] in {a["id"] for a in last["alerts"]}
    assert action["phase"] == "prompt" and chunks[-1].choices[0].delta.content in (None, "")  # nothing generated


def test_streamed_alerts_arrive_as_they_happen(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": DESPERATE}], max_tokens=16, stream=True
    )
    chunks = list(stream)
    early = [a["id"] for c in chunks[:-1] for a in (c.model_extra or {}).get("limbic", {}).get("alerts", [])]
    final = [a["id"] for a in limbic_of(chunks[-1])["alerts"]]
    assert early and set(early) <= set(final)
    assert chunks[-1].choices[0].finish_reason == "length"  # observe: the reply goes on


def test_steer_from_a_prompt_crossing_equals_steering_throughout(client):
    steer = {"calm": 0.4, "desperate": -0.2}
    always = {"happy": {"warning": -100.0, "min_tokens": 1, "action": "steer", "steer": steer}}
    never = {"happy": {"warning": 100.0, "min_tokens": 1, "action": "steer", "steer": steer}}
    triggered = chat(client, NEUTRAL, always)
    static = chat(client, NEUTRAL, limbic={"steer": steer})
    plain = chat(client, NEUTRAL)
    assert triggered.choices[0].message.content == static.choices[0].message.content
    assert generated(triggered) == generated(static)
    assert chat(client, NEUTRAL, never).choices[0].message.content == plain.choices[0].message.content
    assert triggered.choices[0].message.content != plain.choices[0].message.content
    assert [a["action"] for a in limbic_of(triggered)["actions"]][:1] == ["steer"]


def test_steer_starts_at_the_token_that_completed_the_crossing(client):
    def run(rules: dict | None):
        return chat(client, NEUTRAL, rules, logprobs=True, max_tokens=32)

    plain = run(None)
    record = next(((e, r) for e in ("happy", "calm") if (r := first_record(plain, e))), None)
    assert record, "no generated token set a record on happy or calm"
    emotion, (index, score) = record
    rule = {"warning": score, "min_tokens": 1, "action": "steer", "steer": {"desperate": 1.0}}
    steered = run({emotion: rule})
    plain_lp = [t.logprob for t in plain.choices[0].logprobs.content]
    steered_lp = [t.logprob for t in steered.choices[0].logprobs.content]
    plain_tokens = [t.token for t in plain.choices[0].logprobs.content]
    # Tokens up to the crossing are drawn from unsteered rows; the next one is the first from a steered row.
    assert [t.token for t in steered.choices[0].logprobs.content][: index + 1] == plain_tokens[: index + 1]
    assert steered_lp[: index + 1] == pytest.approx(plain_lp[: index + 1], abs=1e-4)
    assert steered_lp[index + 1] != pytest.approx(plain_lp[index + 1], abs=1e-3)
    action = limbic_of(steered)["actions"][0]  # the rule may fire again later; steering starts once
    assert (action["action"], action["token_index"], action["phase"]) == ("steer", index, "generation")


def test_review_queues_the_request_without_its_text(client, limbic_url):
    response = chat(client, DESPERATE, {"desperate": {"action": "review"}})
    queued = httpx.get(f"{limbic_url}/v1/reviews", params={"status": "open", "limit": 1000}).json()["data"]
    (item,) = [i for i in queued if i["request_id"] == response.id]
    assert item["status"] == "open" and item["resolution"] is None and "text" not in item
    assert {a["action"] for a in item["alerts"]} == {"review"}
    assert set(item["generation"]) >= {"desperate", "panicked", "calm"}
    assert DESPERATE[:20] not in str(item)
    before = metric(limbic_url, "limbic_reviews_resolved_total", {"verdict": "confirmed", "model": MODEL})
    resolved = httpx.post(f"{limbic_url}/v1/reviews/{item['id']}", json={"verdict": "confirmed", "note": "ok"})
    assert resolved.status_code == 200 and resolved.json()["resolution"]["verdict"] == "confirmed"
    assert metric(limbic_url, "limbic_reviews_resolved_total", {"verdict": "confirmed", "model": MODEL}) == before + 1
    again = httpx.post(f"{limbic_url}/v1/reviews/{item['id']}", json={"verdict": "escalated"})
    assert again.status_code == 409 and again.json()["error"]["param"] == "review_id"
    assert httpx.get(f"{limbic_url}/v1/reviews/rev_nope").status_code == 404
    bad = httpx.post(f"{limbic_url}/v1/reviews/{item['id']}", json={"verdict": "meh"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "verdict"
    resolved_ids = [
        i["id"] for i in httpx.get(f"{limbic_url}/v1/reviews", params={"status": "resolved"}).json()["data"]
    ]
    assert item["id"] in resolved_ids


def test_conversation_turns_are_linked_by_the_header(client, limbic_url):
    conversation = f"conv-{id(client)}"
    headers = {"X-Limbic-Conversation": conversation}
    first = chat(client, NEUTRAL, headers=headers, max_tokens=8)
    second = chat(client, DESPERATE, headers=headers, max_tokens=8)
    assert limbic_of(second)["conversation_id"] == conversation
    found = httpx.get(f"{limbic_url}/v1/conversations/{conversation}").json()
    assert [t["request_id"] for t in found["turns"]] == [first.id, second.id]
    assert [t["turn"] for t in found["turns"]] == [1, 2]
    assert found["flagged"] and found["turns"][1]["alerts"] and not found["turns"][0]["alerts"]
    assert set(found["turns"][0]["generation"]) >= {"desperate", "panicked", "calm"}
    assert DESPERATE[:20] not in str(found)
    flagged = httpx.get(f"{limbic_url}/v1/conversations", params={"flagged": "true"}).json()["data"]
    assert conversation in [c["id"] for c in flagged]
    assert httpx.get(f"{limbic_url}/v1/conversations/never-seen").status_code == 404


@pytest.mark.parametrize(
    ("rules", "headers", "param"),
    [
        ({"desperate": {"warning": 9.0, "critical": 10.0}}, {}, "limbic.rules.desperate.warning"),
        ({"desperate": {"min_tokens": 9}}, {}, "limbic.rules.desperate.min_tokens"),
        ({"desperate": {"action": "steer"}}, {}, "limbic.rules.desperate"),
        ({"desperate": {"action": "steer", "steer": {"nope": 0.1}}}, {}, "limbic.rules.desperate"),
        ({"nope": {"warning": 1.0}}, {}, "limbic.rules.nope"),
        ({"calm": {"warning": 1.0, "action": "explode"}}, {}, "limbic.rules.calm.action"),
        (None, {"X-Limbic-Conversation": "x" * 300}, "X-Limbic-Conversation"),
    ],
)
def test_bad_rules_and_conversation_ids_are_400s_naming_the_field(limbic_url, rules, headers, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if rules is not None:
        body["limbic"] = {"rules": rules}
    response = httpx.post(f"{limbic_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)


def test_token_scores_carry_each_tokens_text(client):
    response = chat(client, NEUTRAL, max_tokens=12)
    rows = generated(response)
    assert "".join(r["text"] for r in rows) == response.choices[0].message.content
    assert all("text" in r for r in limbic_of(response)["tokens"])


def test_a_stream_left_early_still_queues_its_review(limbic_url):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": DESPERATE}],
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
        "limbic": {"rules": {"desperate": {"action": "review"}}},
    }
    with httpx.stream("POST", f"{limbic_url}/v1/chat/completions", json=body, timeout=60) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the first chunk, then the client leaves
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        queued = httpx.get(f"{limbic_url}/v1/reviews", params={"status": "all", "limit": 1000}).json()["data"]
        if any(item["request_id"] == request_id for item in queued):
            return
        time.sleep(0.2)
    raise AssertionError(f"no review item for {request_id}, a stream whose client left")
