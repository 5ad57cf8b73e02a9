"""The Responses API translation (service/responses.py), without a server: requests become chat bodies, chat
answers and chunks become Response objects and events that OpenAI's own types, its client and the Agents SDK accept.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from limbic.service import responses
from limbic.service.responses import (
    MemoryResponseStore,
    RedisResponseStore,
    ResponseNotFound,
    ResponsesRequest,
    StoreUnavailable,
    conversation_messages,
    history_for,
    output_messages,
    remember,
    response_messages,
    stream_events,
    to_chat,
    to_response,
)
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

EVENTS = TypeAdapter(ResponseStreamEvent)
RESPONSE_ID = "resp_0123abcd"
CREATED = 1_700_000_000
SUMMARY = {"layer": 20, "prompt": {"max": {}}, "generation": {"max": {}}, "alerts": []}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "limbic-test", "input": "hi"} | fields)


def chat_answer(
    content: str | None,
    tool_calls: list[tuple[str, str, str]] = (),
    finish: str = "stop",
    limbic: dict | None = None,
) -> dict:
    """A chat.completion as limbic returns it; tool_calls are (id, name, arguments)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in tool_calls
        ]
    return {
        "id": "chatcmpl-feed",
        "object": "chat.completion",
        "created": CREATED,
        "model": "limbic-test",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
        "limbic": SUMMARY if limbic is None else limbic,
    }


def chunks_of(chat: dict, size: int = 3, tokens: bool = False) -> list[dict]:
    """The chat stream (with include_usage) that carries the same answer as ``chat``, in small pieces."""
    base = {"id": chat["id"], "object": "chat.completion.chunk", "created": CREATED, "model": chat["model"]}
    choice = chat["choices"][0]
    message = choice["message"]
    deltas: list[dict] = [{"role": "assistant", "content": ""}]
    text = message["content"] or ""
    deltas += [{"content": text[i : i + size]} for i in range(0, len(text), size)]
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call["function"]
        deltas.append(
            {
                "tool_calls": [
                    {"index": index, "id": call["id"], "type": "function", "function": {"name": function["name"]}}
                ]
            }
        )
        arguments = function["arguments"]
        deltas += [
            {"tool_calls": [{"index": index, "function": {"arguments": arguments[i : i + size]}}]}
            for i in range(0, len(arguments), size)
        ]
    chunks = [base | {"choices": [{"index": 0, "delta": d, "finish_reason": None, "logprobs": None}]} for d in deltas]
    if tokens:
        for n, chunk in enumerate(chunks[1:]):
            chunk["limbic"] = {"tokens": [{"token": n}]}
    chunks[-1]["choices"][0]["finish_reason"] = choice["finish_reason"]
    chunks[-1]["limbic"] = chunks[-1].get("limbic", {}) | chat["limbic"]
    return [*chunks, base | {"choices": [], "usage": chat["usage"]}]


async def _aiter(items: list[dict]):
    for item in items:
        yield item


def streamed(chunks: list[dict], req: ResponsesRequest) -> list[dict]:
    async def collect() -> list[dict]:
        return [event async for event in stream_events(_aiter(chunks), req, RESPONSE_ID, CREATED)]

    return asyncio.run(collect())


def check_events(events: list[dict]) -> None:
    """Every event parses as the OpenAI event of its type, numbered from 0 without gaps."""
    for event in events:
        assert type(EVENTS.validate_python(event)).model_fields["type"].annotation.__args__ == (event["type"],)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


# --- requests -> chat bodies -----------------------------------------------------------------------------------


def test_string_input_is_one_user_message():
    body = to_chat(request(input="Hello there"), None)
    assert body == {"model": "limbic-test", "messages": [{"role": "user", "content": "Hello there"}], "stream": False}


def test_instructions_lead_and_are_not_part_of_the_stored_conversation():
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    req = request(
        instructions="Be brief.", input=[{"role": "user", "content": [{"type": "input_text", "text": "now"}]}]
    )
    messages = to_chat(req, history)["messages"]
    assert messages == [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "now"}]
    assert conversation_messages(req, history) == messages[1:]
    conversation_messages(req, history)[0]["content"] = "changed"
    assert history[0]["content"] == "earlier"  # the caller's (stored) history is never mutated


def test_replayed_agent_transcript():
    """The items an agent sends back after a tool turn: its output items, then the tools' outputs."""
    items = [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "c1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {
            "type": "function_call",
            "call_id": "c2",
            "name": "get_weather",
            "arguments": '{"city":"Rome"}',
            "status": "completed",
        },
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
        {"type": "function_call", "call_id": "c3", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "c3", "output": "snow"},
    ]

    def call(call_id: str, city: str) -> dict:
        arguments = json.dumps({"city": city}, separators=(",", ":"))
        return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}

    assert to_chat(request(input=items), None)["messages"] == [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("c1", "Paris"), call("c2", "Rome")]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "assistant", "content": None, "tool_calls": [call("c3", "Oslo")]},
        {"role": "tool", "tool_call_id": "c3", "content": "snow"},
    ]


def test_tools_tool_choice_and_sampling_map_to_chat_fields():
    req = request(
        tools=[WEATHER_TOOL, {"type": "function", "name": "now"}],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        temperature=0.2,
        top_p=0.9,
        max_output_tokens=64,
        user="u-1",
        limbic={"token_scores": True},
    )
    body = to_chat(req, None)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters", "strict")},
        },
        {"type": "function", "function": {"name": "now"}},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert (body["temperature"], body["top_p"], body["max_completion_tokens"]) == (0.2, 0.9, 64)
    assert (body["user"], body["limbic"]) == ("u-1", {"token_scores": True})
    assert to_chat(request(tools=[WEATHER_TOOL], tool_choice="required"), None)["tool_choice"] == "required"
    # chat refuses tool settings without tools, which the Agents SDK may send
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(
        to_chat(request(tools=[], tool_choice="auto"), None)
    )


def test_text_format_becomes_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    json_schema = {"format": {"type": "json_schema", "name": "final_output", "schema": schema, "strict": True}}
    assert to_chat(request(text=json_schema), None)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "final_output", "schema": schema, "strict": True},
    }
    json_object = request(text={"format": {"type": "json_object"}})
    assert to_chat(json_object, None)["response_format"] == {"type": "json_object"}
    assert "response_format" not in to_chat(request(text={"format": {"type": "text"}, "verbosity": "medium"}), None)


@pytest.mark.parametrize(
    "fields",
    [
        {"instructions": "Be brief.", "temperature": 0.2, "top_p": 0.9, "max_output_tokens": 5, "user": "u"},
        {
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
        },
        {"tools": [WEATHER_TOOL], "tool_choice": "required", "limbic": {"token_scores": True}},
        {"text": {"format": {"type": "json_schema", "name": "o", "schema": {"type": "object"}, "strict": True}}},
        {"text": {"format": {"type": "json_object"}}},
        {
            "tools": [WEATHER_TOOL],
            "input": [
                {"role": "user", "content": "Weather?"},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
        },
    ],
)
def test_chat_bodies_are_valid_limbic_chat_requests(fields):
    from limbic.service.protocol import ChatCompletionRequest

    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    body = to_chat(request(**fields), history) | {"stream": True, "stream_options": {"include_usage": True}}
    ChatCompletionRequest.model_validate(body)


def test_defaults_and_harmless_fields_are_accepted():
    req = request(
        stream=None,
        store=None,
        tools=None,
        include=[],
        reasoning={"effort": None, "summary": None},
        truncation="disabled",
        service_tier="auto",
        stream_options={"include_obfuscation": False},
        metadata={"run": "1"},
        safety_identifier="s",
        prompt_cache_key="k",
        prompt_cache_retention="24h",
    )
    assert (req.stream, req.store, req.tools) == (False, True, [])


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"temperatur": 0.5}, "temperatur"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file"}]}]},
            "input_file",
        ),
        ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "reasoning"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"truncation": "auto"}, "truncation"),
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_refusals_name_the_field(fields, named):
    with pytest.raises(ValidationError) as caught:
        request(**fields)
    assert named in str(caught.value)


# --- chat answers -> Response objects --------------------------------------------------------------------------


def test_text_answer_is_a_completed_response():
    req = request(instructions="Be brief.", metadata={"run": "7"}, temperature=0.3)
    response = to_response(chat_answer("Hello!"), req, RESPONSE_ID, CREATED)
    parsed = Response.model_validate(response)
    assert (parsed.status, parsed.output_text, parsed.incomplete_details) == ("completed", "Hello!", None)
    assert (parsed.instructions, parsed.metadata, parsed.temperature) == ("Be brief.", {"run": "7"}, 0.3)
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens, parsed.usage.total_tokens) == (7, 5, 12)
    assert response["limbic"] == SUMMARY
    assert parsed.model_extra["limbic"] == SUMMARY  # how the openai client exposes it


def test_tool_call_answer_has_function_call_items():
    req = request(tools=[WEATHER_TOOL])
    chat = chat_answer(
        None, [("call_a", "get_weather", '{"city":"Paris"}'), ("call_b", "get_weather", "{}")], "tool_calls"
    )
    parsed = Response.model_validate(to_response(chat, req, RESPONSE_ID, CREATED))
    assert [(o.type, o.call_id, o.name, o.arguments, o.status) for o in parsed.output] == [
        ("function_call", "call_a", "get_weather", '{"city":"Paris"}', "completed"),
        ("function_call", "call_b", "get_weather", "{}", "completed"),
    ]
    assert parsed.status == "completed"
    assert parsed.tools[0].name == "get_weather" and parsed.tool_choice == "auto"


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_cut_short_answer_is_incomplete(finish, reason):
    response = to_response(
        chat_answer("Once upon a", finish=finish), request(max_output_tokens=3), RESPONSE_ID, CREATED
    )
    parsed = Response.model_validate(response)
    assert (parsed.status, parsed.incomplete_details.reason) == ("incomplete", reason)
    assert parsed.output[0].status == "incomplete" and parsed.max_output_tokens == 3


def test_whitespace_beside_tool_calls_is_not_an_answer():
    chat = chat_answer("\n\n", [("call_a", "get_weather", "{}")], "tool_calls")
    assert [o["type"] for o in to_response(chat, request(tools=[WEATHER_TOOL]), RESPONSE_ID, CREATED)["output"]] == [
        "function_call"
    ]


def test_output_messages_are_the_assistant_turn_in_chat_form():
    chat = chat_answer("Let me look.", [("call_a", "get_weather", '{"city":"Oslo"}')], "tool_calls")
    expected = [
        {"role": "assistant", "content": "Let me look.", "tool_calls": chat["choices"][0]["message"]["tool_calls"]}
    ]
    assert output_messages(chat) == expected
    assert response_messages(to_response(chat, request(tools=[WEATHER_TOOL]), RESPONSE_ID, CREATED)) == expected


# --- chat chunks -> stream events ------------------------------------------------------------------------------


def test_streamed_text_matches_the_non_streamed_response():
    req = request(instructions="Be brief.")
    chat = chat_answer("Hello, streaming world!")
    events = streamed(chunks_of(chat), req)
    check_events(events)
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello, streaming world!"
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert events[2]["item"]["status"] == "in_progress" and events[2]["item"]["content"] == []
    assert events[-1]["response"] == to_response(chat, req, RESPONSE_ID, CREATED)


def test_streamed_tool_calls_match_the_non_streamed_response():
    req = request(tools=[WEATHER_TOOL])
    calls = [("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "get_weather", '{"city": "Rome"}')]
    chat = chat_answer("Checking both.", calls, "tool_calls")
    events = streamed(chunks_of(chat), req)
    check_events(events)
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [(i["type"], i.get("name")) for i in added] == [("message", None), *[("function_call", "get_weather")] * 2]
    for index, (call_id, _, arguments) in enumerate(calls, start=1):
        mine = [e for e in events if e.get("output_index") == index]
        assert [e["type"] for e in (mine[0], mine[-2], mine[-1])] == [
            "response.output_item.added",
            "response.function_call_arguments.done",
            "response.output_item.done",
        ]
        assert "".join(e["delta"] for e in mine if e["type"].endswith("arguments.delta")) == arguments
        assert mine[-1]["item"]["call_id"] == call_id
    # one item at a time, as OpenAI streams them: the message is done before the first call is added
    item_events = [(e["type"], e["output_index"]) for e in events if e["type"].startswith("response.output_item")]
    assert item_events == [
        (kind, i) for i in range(3) for kind in ("response.output_item.added", "response.output_item.done")
    ]
    assert events[-1]["response"] == to_response(chat, req, RESPONSE_ID, CREATED)


def test_stream_cut_short_ends_incomplete():
    req = request(max_output_tokens=4)
    chat = chat_answer("Once upon a", finish="length")
    events = streamed(chunks_of(chat), req)
    check_events(events)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"] == to_response(chat, req, RESPONSE_ID, CREATED)
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_token_scores_ride_on_the_delta_events_and_the_summary_on_the_response():
    chat = chat_answer("abcdefgh")
    chunks = chunks_of(chat, tokens=True)
    events = streamed(chunks, request())
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    # the first chunk (role only) has no scores; every later content chunk's scores are on its own delta event
    assert [d["limbic"]["tokens"] for d in deltas] == [[{"token": n}] for n in range(len(deltas))]
    final = events[-1]["response"]["limbic"]
    assert {k: v for k, v in final.items() if k != "tokens"} == SUMMARY
    assert final["tokens"] == [{"token": n} for n in range(len(deltas))]  # all of them, as in a non-streamed answer
    check_events(events)


def test_whitespace_before_a_streamed_tool_call_is_dropped():
    req = request(tools=[WEATHER_TOOL])
    chat = chat_answer("\n", [("call_a", "get_weather", "{}")], "tool_calls")
    events = streamed(chunks_of(chat), req)
    assert events[-1]["response"] == to_response(chat, req, RESPONSE_ID, CREATED)
    assert not [e for e in events if e["type"] == "response.output_text.delta"]


def test_an_error_chunk_fails_the_response():
    chunks = chunks_of(chat_answer("Partial answer"))[:3]
    error = {"message": "generation failed: boom", "type": "server_error", "param": None, "code": None}
    events = streamed([*chunks, {"error": error}], request())
    check_events(events)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["message"] == "generation failed: boom"
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert failed.output[0].status == "incomplete"


def test_interleaved_tool_calls_fail_clearly():
    """Items are streamed one at a time, so a call resumed after the next began cannot be told faithfully."""
    calls = [("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "get_weather", "{}")]
    chunks = chunks_of(chat_answer(None, calls, "tool_calls"))
    late = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")][1]
    events = streamed([*chunks[:-2], late, *chunks[-2:]], request(tools=[WEATHER_TOOL]))
    check_events(events)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert "tool call 0 continued" in events[-2]["message"]


def test_a_failing_chunk_stream_fails_the_response_and_is_closed():
    closed = []

    async def broken():
        try:
            yield chunks_of(chat_answer("x"))[0]
            raise RuntimeError("engine died")
        finally:
            closed.append(True)

    async def collect() -> list[dict]:
        return [e async for e in stream_events(broken(), request(), RESPONSE_ID, CREATED)]

    events = asyncio.run(collect())
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert "engine died" in events[-2]["message"]
    assert closed == [True]


def test_leaving_the_stream_closes_the_chat_stream():
    closed = []

    async def endless():
        try:
            while True:
                yield chunks_of(chat_answer("abc"))[1]
        finally:
            closed.append(True)

    async def leave_early() -> None:
        events = stream_events(endless(), request(), RESPONSE_ID, CREATED)
        async for event in events:
            if event["type"] == "response.output_text.delta":
                break
        await events.aclose()

    asyncio.run(leave_early())
    assert closed == [True]


def test_sse_names_the_event():
    event = {"type": "response.output_text.delta", "sequence_number": 3, "delta": "é"}
    data = json.dumps(event, separators=(",", ":"))
    assert responses.sse(event) == f"event: response.output_text.delta\ndata: {data}\n\n"


# --- the OpenAI client and the Agents SDK, against the translation through a mock transport ------------------


class FakeLimbic:
    """``/v1/responses`` over a scripted chat model: asks for the weather tool once, then answers."""

    def __init__(self) -> None:
        self.store = MemoryResponseStore(capacity=10, ttl_s=60)
        self.chat_bodies: list[dict] = []
        self.served = 0

    def chat(self, body: dict) -> dict:
        self.chat_bodies.append(body)
        if body.get("tools") and body["messages"][-1]["role"] != "tool":
            return chat_answer(None, [("call_w1", "get_weather", '{"city":"Paris"}')], "tool_calls")
        return chat_answer("It is sunny in Paris.")

    async def handle(self, http_request: httpx.Request) -> httpx.Response:
        assert http_request.url.path.endswith("/responses")
        req = ResponsesRequest.model_validate_json(http_request.content)
        history = await history_for(self.store, req)
        chat = self.chat(to_chat(req, history))
        self.served += 1
        response_id = f"resp_{self.served:04d}"
        if not req.stream:
            response = to_response(chat, req, response_id, CREATED)
            await remember(self.store, req, history, response)
            return httpx.Response(200, json=response)
        events = [e async for e in stream_events(_aiter(chunks_of(chat)), req, response_id, CREATED)]
        await remember(self.store, req, history, events[-1]["response"])
        body = "".join(responses.sse(e) for e in events)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())

    def client(self):
        from openai import AsyncOpenAI

        transport = httpx.MockTransport(self.handle)
        http_client = httpx.AsyncClient(transport=transport, base_url="http://limbic.test/v1")
        return AsyncOpenAI(base_url="http://limbic.test/v1", api_key="unused", http_client=http_client, max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_agents_sdk_runs_a_tool_turn_through_the_translation(stream):
    from agents import Agent, OpenAIResponsesModel, RunConfig, Runner, function_tool

    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    limbic = FakeLimbic()
    agent = Agent(
        name="weather",
        instructions="Answer with the weather.",
        model=OpenAIResponsesModel(model="limbic-test", openai_client=limbic.client()),
        tools=[get_weather],
    )

    async def run():
        config = RunConfig(tracing_disabled=True)
        if not stream:
            return await Runner.run(agent, "Weather in Paris?", run_config=config)
        result = Runner.run_streamed(agent, "Weather in Paris?", run_config=config)
        async for _ in result.stream_events():
            pass
        return result

    result = asyncio.run(run())
    assert result.final_output == "It is sunny in Paris."
    assert calls == ["Paris"]
    second = limbic.chat_bodies[1]["messages"]
    assert second[0] == {"role": "system", "content": "Answer with the weather."}
    assert second[-2]["tool_calls"][0]["id"] == "call_w1"
    assert second[-1] == {"role": "tool", "tool_call_id": "call_w1", "content": "sunny in Paris"}


def test_openai_stream_helper_and_previous_response_id():
    """``responses.stream()`` checks event order and item identities while it rebuilds the response."""
    limbic = FakeLimbic()

    async def run():
        client = limbic.client()
        async with client.responses.stream(model="limbic-test", input="Hi!", instructions="First rules.") as stream:
            async for _ in stream:
                pass
            first = await stream.get_final_response()
        second = await client.responses.create(
            model="limbic-test", input="And again?", instructions="New rules.", previous_response_id=first.id
        )
        return first, second

    first, second = asyncio.run(run())
    assert first.output_text == "It is sunny in Paris." and first.status == "completed"
    assert second.previous_response_id == first.id
    assert limbic.chat_bodies[1]["messages"] == [
        {"role": "system", "content": "New rules."},  # instructions are not carried over
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "It is sunny in Paris."},
        {"role": "user", "content": "And again?"},
    ]


# --- the store behind previous_response_id ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_memory_store_evicts_the_least_recently_used():
    store = MemoryResponseStore(capacity=2, ttl_s=60)

    async def run():
        await store.put("resp_a", [{"role": "user", "content": "a"}])
        await store.put("resp_b", [{"role": "user", "content": "b"}])
        assert await store.get("resp_a")  # now the most recently used
        await store.put("resp_c", [{"role": "user", "content": "c"}])
        return [await store.get(i) for i in ("resp_a", "resp_b", "resp_c")]

    a, b, c = asyncio.run(run())
    assert (a, b, c) == ([{"role": "user", "content": "a"}], None, [{"role": "user", "content": "c"}])


def test_memory_store_forgets_after_its_ttl_and_returns_copies():
    clock = Clock()
    store = MemoryResponseStore(capacity=5, ttl_s=10, clock=clock)

    async def run():
        await store.put("resp_a", [{"role": "user", "content": "a"}])
        got = await store.get("resp_a")
        got.append({"role": "user", "content": "mutated"})
        clock.now += 9.9
        kept = await store.get("resp_a")
        clock.now += 0.1
        return kept, await store.get("resp_a")

    kept, expired = asyncio.run(run())
    assert kept == [{"role": "user", "content": "a"}]
    assert expired is None


def test_history_for_unknown_or_missing_previous_response():
    store = MemoryResponseStore()
    assert asyncio.run(history_for(store, request())) is None
    with pytest.raises(ResponseNotFound, match="previous response not found: resp_gone") as caught:
        asyncio.run(history_for(store, request(previous_response_id="resp_gone")))
    assert isinstance(caught.value, KeyError)
    with pytest.raises(ResponseNotFound):
        asyncio.run(history_for(None, request(previous_response_id="resp_gone")))


def test_remember_respects_store_false_and_failures():
    store = MemoryResponseStore()
    answer = to_response(chat_answer("ok"), request(store=False), "resp_private", CREATED)
    asyncio.run(remember(store, request(store=False), None, answer))
    failed = to_response(chat_answer("ok"), request(), "resp_failed", CREATED) | {"status": "failed"}
    asyncio.run(remember(store, request(), None, failed))
    assert asyncio.run(store.get("resp_private")) is None and asyncio.run(store.get("resp_failed")) is None


def test_redis_store_round_trip_with_ttl(redis_url):
    import redis.asyncio

    async def run():
        client = redis.asyncio.from_url(redis_url)
        try:
            store = RedisResponseStore(client, ttl_s=120, timeout_s=5)
            messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []}]
            await store.put("resp_r1", messages)
            ttl = await client.ttl("limbic:responses:resp_r1")
            return await store.get("resp_r1"), await store.get("resp_none"), ttl
        finally:
            await client.aclose()

    got, missing, ttl = asyncio.run(run())
    assert got == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []}]
    assert missing is None and 110 < ttl <= 120


def test_redis_store_unreachable_or_hung_is_unavailable():
    import redis.asyncio
    from conftest import free_port

    class Hung:
        async def get(self, key):
            await asyncio.sleep(30)

    async def run(store):
        with pytest.raises(StoreUnavailable, match="Redis"):
            await store.get("resp_x")

    asyncio.run(run(RedisResponseStore(Hung(), timeout_s=0.05)))

    async def unreachable():
        client = redis.asyncio.from_url(f"redis://127.0.0.1:{free_port()}/0")
        try:
            await run(RedisResponseStore(client, timeout_s=2))
        finally:
            await client.aclose()

    asyncio.run(unreachable())
