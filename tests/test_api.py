"""The live server, driven with the official openai client (and httpx for what the client cannot send)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import redis

MODEL = "SmolLM2-135M-Instruct"
DESPERATE = (
    "Please, I am begging you, I have nothing left. If I lose this job tonight my kids lose the house. "
    "I will do anything, anything at all, just give me one more chance. There is no one else I can ask."
)


def limbic_of(response) -> dict:
    return response.model_extra["limbic"]


def chat(client, content: str, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion_carries_scores_and_usage(client):
    response = chat(client, "Name three colours.", max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 5 and 1 <= response.usage.completion_tokens <= 12
    ext = limbic_of(response)
    for phase in ("prompt", "generation"):
        assert {"desperate", "panicked", "calm", "afraid"} <= set(ext[phase])
        assert ext[phase]["desperate"]["max"] >= ext[phase]["desperate"]["mean"]
    assert "tokens" not in ext


def test_token_scores_cover_every_returned_token(client):
    response = chat(
        client,
        "Count to five.",
        max_tokens=10,
        temperature=0,
        extra_body={"limbic": {"token_scores": True, "emotions": ["desperate", "calm"]}},
    )
    tokens = limbic_of(response)["tokens"]
    generated = [t for t in tokens if t["phase"] == "generation"]
    prompt = [t for t in tokens if t["phase"] == "prompt"]
    assert len(generated) == response.usage.completion_tokens
    assert len(prompt) == response.usage.prompt_tokens
    assert [t["index"] for t in generated] == list(range(len(generated)))
    assert prompt[0]["scores"] is None  # the attention-sink token is not scored
    assert set(generated[0]["scores"]) == {"desperate", "calm"}


def test_streamed_chat_matches_non_streamed_and_ends_with_summary(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"limbic": {"token_scores": True}},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert set(limbic_of(final)["generation"]) == set(limbic_of(whole)["generation"])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed_tokens = [
        t for c in chunks if c.model_extra.get("limbic") for t in c.model_extra["limbic"].get("tokens", [])
    ]
    assert sum(t["phase"] == "generation" for t in streamed_tokens) == whole.usage.completion_tokens


def test_text_completion_stream_and_stop(client):
    response = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert " 7" not in response.choices[0].text
    pieces = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, stream=True))
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    assert "generation" in limbic_of(pieces[-1])


def test_errors_are_openai_shaped(client, limbic_url):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, "hi", temperature=3)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        chat(client, "hi", max_tokens=9000)
    # 8192 positions, one kept free under vLLM for the step that scores the last token (see vllm_engine).
    assert too_long.value.body["code"] == "context_length_exceeded"
    assert "is 8191 tokens" in too_long.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="tools") as legacy:  # legacy functions: use tools
        chat(client, "hi", functions=[{"name": "f", "parameters": {}}])
    assert legacy.value.body["param"] == "functions"
    raw = httpx.post(
        f"{limbic_url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    empty = httpx.post(f"{limbic_url}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"


def test_metrics_move_with_traffic(client, limbic_url):
    def scrape() -> str:
        return httpx.get(f"{limbic_url}/metrics").text

    def value(text: str, prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    before = scrape()
    chat(client, "Hi there", max_tokens=5)
    after = scrape()
    key = f'limbic_tokens_monitored_total{{model="{MODEL}",phase="generation"}}'
    assert value(after, key) >= value(before, key) + 5
    count = f'limbic_emotion_score_count{{emotion="desperate",model="{MODEL}",phase="prompt"}}'
    assert value(after, count) > value(before, count)
    assert 'limbic_emotion_score_bucket{emotion="panicked"' in after
    assert value(after, "limbic_scoring_seconds_total") > 0
    assert "request_id" not in after and "Hi there" not in after


def test_alert_reaches_redis_stream_and_alerts_endpoint(client, limbic_url, redis_url):
    response = chat(client, DESPERATE, max_tokens=4)
    alerts = limbic_of(response)["alerts"]
    assert alerts and alerts[0]["emotion"] == "desperate" and alerts[0]["phase"] == "prompt"
    assert alerts[0]["score"] >= alerts[0]["threshold"]
    entries = redis.Redis.from_url(redis_url, decode_responses=True).xrevrange("limbic:alerts", count=50)
    stored = [json.loads(fields["event"]) for _, fields in entries]
    assert alerts[0]["id"] in {e["id"] for e in stored}
    assert all("text" not in e for e in stored)  # no prompt text without the operator's opt-in
    listed = httpx.get(f"{limbic_url}/v1/alerts", params={"emotion": "desperate"}).json()
    assert listed["sink"] == "redis" and alerts[0]["id"] in {e["id"] for e in listed["data"]}
    metrics = httpx.get(f"{limbic_url}/metrics").text
    assert 'limbic_alerts_total{emotion="desperate"' in metrics


def test_neutral_chat_raises_no_alert(client):
    response = chat(
        client,
        "What is the capital of France?",
        max_tokens=8,
        temperature=0,
    )
    assert limbic_of(response)["alerts"] == []


def test_client_disconnect_aborts_the_generation(client, limbic_url):
    def generated_tokens() -> float:
        key = f'limbic_tokens_monitored_total{{model="{MODEL}",phase="generation"}}'
        lines = httpx.get(f"{limbic_url}/metrics").text.splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(key))

    before = generated_tokens()
    stream = chat(
        client,
        "Write a long story.",
        max_tokens=400,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()
    quick = chat(client, "Hi", max_tokens=2)
    assert quick.choices[0].finish_reason in ("stop", "length")
    # The abandoned request stopped within a few tokens of the disconnect instead of running to 400.
    assert generated_tokens() - before < 100

    # Non-streamed too: the client gives up after 2 s; the generation is cancelled within about a second.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{limbic_url}/v1/chat/completions", json=body | {"ignore_eos": True}, timeout=2)
    time.sleep(1.5)
    settled = generated_tokens()
    time.sleep(2)
    assert generated_tokens() - settled < 3 and settled - before < 200


def test_analyze_endpoint(limbic_url):
    body = {"texts": [{"id": "a", "text": DESPERATE}, {"id": 2, "text": "The meeting is at noon in room 4."}]}
    data = httpx.post(f"{limbic_url}/v1/analyze", json=body, timeout=60).json()["data"]
    assert [d["id"] for d in data] == ["a", 2]
    assert data[0]["scores"]["desperate"]["mean"] > data[1]["scores"]["desperate"]["mean"]
    bad = httpx.post(f"{limbic_url}/v1/analyze", json={"texts": [{"id": 1, "text": ""}]})
    assert bad.status_code == 400
    transcript = [{"role": "user", "content": "Help me."}, {"role": "assistant", "content": DESPERATE}]
    both = {"texts": [{"id": "t", "messages": transcript, "per_message": True}]}
    (scored,) = httpx.post(f"{limbic_url}/v1/analyze", json=both, timeout=60).json()["data"]
    assert scored["tokens"] == "assistant" and scored["scores"] == scored["messages"][1]["scores"]
    neither = httpx.post(f"{limbic_url}/v1/analyze", json={"texts": [{"id": 1}]})
    assert neither.status_code == 400 and neither.json()["error"]["param"] == "texts.0"
