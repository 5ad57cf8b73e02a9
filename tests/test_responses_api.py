"""The Responses API on the live server with the openai client: text, streamed events, function tools and
their outputs, previous_response_id, and limbic's extension on the response."""

from __future__ import annotations

import json

import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def test_text_response_carries_scores(client):
    response = client.responses.create(
        model=MODEL, input="Name a colour.", instructions="Answer in one word.", max_output_tokens=8, temperature=0
    )
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage.output_tokens >= 1
    limbic = response.model_extra["limbic"]
    assert {"desperate", "calm"} <= set(limbic["generation"]) and "alerts" in limbic


def test_streamed_events_rebuild_the_response(client):
    kwargs = dict(model=MODEL, input="Say hello.", max_output_tokens=12, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text


def test_forced_function_call_then_its_output_continues_the_conversation(client):
    first = client.responses.create(
        model=MODEL,
        input="What is the weather in Oslo?",
        tools=[TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=32,
        temperature=0,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and json.loads(calls[0].arguments)["city"] in ("Paris", "Oslo")
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Snow, -3 C"}],
        tools=[TOOL],
        max_output_tokens=16,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the stored turn was prepended


def test_unknown_previous_response_is_a_404_and_refused_fields_400(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_missing", max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="hi", background=True, max_output_tokens=4)
    assert refused.value.body["param"] == "background"
    with pytest.raises(openai.BadRequestError) as tool:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}], max_output_tokens=4)
    assert tool.value.body["param"].startswith("tools")
