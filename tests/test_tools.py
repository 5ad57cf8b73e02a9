"""Agent traffic through the live server with the official openai client: tools, structured output, n,
logprobs, vLLM's sampling extensions, and a 400 naming every field limbic refuses."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}}, "required": ["zone"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def post_json(url: str, body: dict) -> httpx.Response:
    """POST with ASCII-escaped JSON, so that even a lone surrogate reaches the server as a client could send it."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=30)


def limbic_of(obj) -> dict:
    return obj.model_extra["limbic"]


def chat(client, messages=ASK, **kwargs):
    kwargs.setdefault("max_tokens", 48)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def assert_valid_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_tool_returns_schema_valid_arguments_every_token_scored(client):
    response = chat(client, tools=TOOLS, tool_choice=NAMED, extra_body={"limbic": {"token_scores": True}})
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    assert_valid_calls(choice.message.tool_calls)
    ext = limbic_of(response)
    generated = [t for t in ext["tokens"] if t["phase"] == "generation"]
    assert len(generated) == response.usage.completion_tokens  # the tool call's tokens are monitored too
    assert ext["chat_template"] == "limbic:chatml_tools.jinja"


def test_required_tool_choice_with_any_tool_and_no_parallel_calls(client):
    response = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=64)
    calls = response.choices[0].message.tool_calls
    assert len(calls) == 1 and response.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(calls)


def test_required_choice_keeps_nested_definitions_resolvable(client):
    """Pydantic-made tool schemas put nested models in $defs; nested in the array of calls they must resolve."""
    parameters = {
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}},
        "required": ["place"],
        "$defs": {
            "Place": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            }
        },
    }
    tools = [{"type": "function", "function": {"name": "visit", "parameters": parameters}}]
    response = chat(client, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=64)
    (call,) = response.choices[0].message.tool_calls  # one call: the 135M model would otherwise repeat it
    jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_auto_tool_choice_parses_whatever_the_model_writes(client):
    response = chat(client, tools=TOOLS, tool_choice="auto", max_tokens=64)
    message = response.choices[0].message
    if message.tool_calls:  # the 135M model seldom calls on its own; when it does, the calls are parsed
        assert response.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            assert call.function.name in SCHEMAS and isinstance(json.loads(call.function.arguments), dict)
    else:
        assert message.content and "<tool_call>" not in message.content


def test_tool_choice_none_offers_no_tools(client):
    response = chat(client, tools=TOOLS, tool_choice="none", max_tokens=16)
    assert response.choices[0].message.tool_calls is None and response.choices[0].message.content
    assert "chat_template" in limbic_of(response) and limbic_of(response)["chat_template"] == "model"


def test_replayed_agent_transcript_is_accepted(client):
    transcript = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    response = chat(client, messages=transcript, tools=TOOLS, max_tokens=24)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    replayed = response.choices[0].message.model_dump()  # what the openai client sends back as history
    again = chat(
        client, messages=[*transcript, replayed, {"role": "user", "content": "Thanks"}], tools=TOOLS, max_tokens=8
    )
    assert again.usage.prompt_tokens > response.usage.prompt_tokens


def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_call(client):
    whole = chat(client, tools=TOOLS, tool_choice=NAMED).choices[0]
    chunks = list(chat(client, tools=TOOLS, tool_choice=NAMED, stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            call = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": None})
            call["id"] = call["id"] or delta.id
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert list(calls) == [0] and calls[0]["id"]
    assert calls[0]["name"] == whole.message.tool_calls[0].function.name
    assert calls[0]["arguments"] == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_schema_response_format_validates(client):
    schema = {
        "type": "object",
        "properties": {"mood": {"type": "string", "enum": ["calm", "tense"]}, "score": {"type": "integer"}},
        "required": ["mood", "score"],
        "additionalProperties": False,
    }
    response = chat(
        client,
        messages=[{"role": "user", "content": "Rate the mood of: 'the deadline is in an hour'"}],
        response_format={"type": "json_schema", "json_schema": {"name": "mood", "schema": schema, "strict": True}},
    )
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)
    json_object = chat(client, response_format={"type": "json_object"}, max_tokens=64)
    if json_object.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(json_object.choices[0].message.content), dict)


def test_n_choices_are_monitored_apart(client):
    response = chat(client, n=2, temperature=1.0, seed=11, max_tokens=10, extra_body={"limbic": {"token_scores": True}})
    assert [c.index for c in response.choices] == [0, 1]
    counts = []
    for choice in response.choices:
        ext = choice.model_extra["limbic"]
        assert ext["choice"] == choice.index and ext["generation"]
        counts.append(sum(t["phase"] == "generation" for t in ext["tokens"]))
        assert all(alert["choice"] == choice.index for alert in ext["alerts"])
    assert sum(counts) == response.usage.completion_tokens
    assert response.choices[0].message.content != response.choices[1].message.content  # seed + index differ
    again = chat(client, n=2, temperature=1.0, seed=11, max_tokens=10)
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]


def test_streamed_n_choices_each_finish(client):
    chunks = list(chat(client, n=2, temperature=1.0, max_tokens=6, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_chat_logprobs_match_the_returned_tokens(client):
    response = chat(client, logprobs=True, top_logprobs=3, max_tokens=8, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.token == entry.top_logprobs[0].token  # greedy
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)


def test_completion_logprobs_and_vllm_sampling_extensions(client):
    response = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=6,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = response.choices[0].logprobs
    assert "".join(lp.tokens) == response.choices[0].text and len(lp.top_logprobs[0]) == 2
    assert lp.text_offset[0] == 0
    streamed = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=6,
        temperature=0,
        logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    offsets = [
        o
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs
        for o in chunk.choices[0].logprobs.text_offset
    ]
    assert offsets == lp.text_offset  # the offsets run on across chunks
    top1 = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=6,
        temperature=1.0,
        seed=5,
        extra_body={"top_k": 1, "ignore_eos": True},
    )
    assert top1.choices[0].text == response.choices[0].text  # top_k=1 samples greedily
    forced = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=3,
        temperature=0,
        logit_bias={"28": 100},
        extra_body={"ignore_eos": True},
    )
    assert forced.choices[0].logprobs is None and forced.usage.completion_tokens == 3
    ids = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logit_bias={"2": 100}, extra_body={"min_tokens": 2}
    )
    assert ids.usage.completion_tokens == 3 and ids.choices[0].finish_reason == "stop"  # EOS held off 2 tokens


REFUSED_CHAT = [
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("web_search_options", {}),
    ("reasoning_effort", "high"),
    ("prediction", {"type": "content", "content": "x"}),
    ("store", True),
    ("frobnicate", 1),
    ("modalities", ["text", "audio"]),
    ("top_logprobs", 2),
    ("tool_choice", "required"),
    ("n", 17),
    ("seed", 2**63),
    ("logit_bias", {"999999": 5}),
    ("stop_token_ids", [-1]),
    ("temperature", 3),
    ("verbosity", "high"),
]


@pytest.mark.parametrize(("field", "value"), REFUSED_CHAT, ids=[f for f, _ in REFUSED_CHAT])
def test_refused_chat_fields_are_400s_naming_them(limbic_url, field, value):
    body = {"model": MODEL, "messages": ASK, field: value}
    response = httpx.post(f"{limbic_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] is not None and error["param"].split(".")[0] == field, error
    assert error["type"] == "invalid_request_error"


UNIQUE = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}  # xgrammar would not enforce it
REFUSED_OTHER = [
    ("tool_choice", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    ("response_format", {"tools": TOOLS, "response_format": {"type": "json_object"}}),
    (
        "response_format",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
    ),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("messages", {"messages": [{"role": "tool", "content": "result without an id"}]}),
    ("tools", {"tools": [{"type": "custom", "custom": {"name": "x"}}]}),
    ("min_tokens", {"max_tokens": 2, "min_tokens": 50}),
    ("min_tokens", {"response_format": {"type": "json_object"}, "min_tokens": 3}),
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": UNIQUE}}}),
    ("logit_bias", {"logit_bias": {"\u00b2": 1}}),
    ("messages", {"messages": [{"role": "user", "content": "hi \ud800"}]}),  # a lone surrogate
]


@pytest.mark.parametrize(("param", "extra"), REFUSED_OTHER)
def test_inconsistent_chat_requests_are_400s(limbic_url, param, extra):
    response = post_json(f"{limbic_url}/v1/chat/completions", {"model": MODEL, "messages": ASK} | extra)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == param


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("suffix", "end"),
        ("echo", True),
        ("best_of", 3),
        ("prompt", [1_000_000_000]),
        ("prompt", [-1]),
        ("prompt", "hi \ud800"),  # a lone surrogate
        ("logprobs", 21),
    ],
)
def test_refused_completion_fields_are_400s_naming_them(limbic_url, field, value):
    body = {"model": MODEL, "prompt": "Hello", field: value}
    response = post_json(f"{limbic_url}/v1/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == field


def test_health_and_model_card(limbic_url, client):
    assert httpx.get(f"{limbic_url}/health").status_code == 200
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["limbic"]["tool_call_parser"] == "hermes"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-a-model")
