"""Turning generated text into tool calls, without a server: vLLM's hermes parser behind ``ParsedCalls``,
the required-calls array, and streamed deltas that reassemble to the whole message."""

from __future__ import annotations

import json

import pytest
from limbic.service.protocol import ChatCompletionRequest
from limbic.service.tools import NamedCall, ParsedCalls, RequiredCalls, chat_output
from transformers import AutoTokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
MODEL_TEXT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return AutoTokenizer.from_pretrained(default_model_path)


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS} | fields
    )


def reassemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", ()):
            entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            entry["name"] += call.get("function", {}).get("name") or ""
            entry["arguments"] += call.get("function", {}).get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)]


def stream(output, text: str, tokenizer) -> list[dict]:
    deltas = []
    for piece in (text[i : i + 3] for i in range(0, len(text), 3)):  # 3 characters at a time
        deltas += output.push(piece, tokenizer.encode(piece, add_special_tokens=False))
    return deltas + output.finish()


def test_auto_finds_hermes_calls_in_whole_and_streamed_text(tokenizer):
    whole = ParsedCalls("hermes", tokenizer, request()).message(MODEL_TEXT)
    assert whole["content"].strip() == "Let me check."
    found = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"]]
    assert found == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})]
    content, calls = reassemble(stream(ParsedCalls("hermes", tokenizer, request()), MODEL_TEXT, tokenizer))
    assert content.strip() == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == found


def test_auto_without_a_call_is_plain_content(tokenizer):
    output = ParsedCalls("hermes", tokenizer, request())
    assert output.message("Sunny, I think.") == {"role": "assistant", "content": "Sunny, I think."}


def test_named_and_required_outputs(tokenizer):
    named = chat_output(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}), tokenizer, None)
    assert isinstance(named, NamedCall) and named.constraint.schema == TOOLS[0]["function"]["parameters"]
    _, calls = reassemble(stream(named, '{"city":"Paris"}', tokenizer))
    assert calls == [{"name": "get_weather", "arguments": '{"city":"Paris"}'}]
    required = chat_output(request(tool_choice="required", parallel_tool_calls=False), tokenizer, None)
    assert isinstance(required, RequiredCalls) and required.constraint.schema["maxItems"] == 1
    text = '[{"name":"get_weather","arguments":{"city":"Oslo"}}]'
    assert json.loads(required.message(text)["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    _, streamed = reassemble(stream(required, text, tokenizer))
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [("get_weather", {"city": "Oslo"})]
    assert required.message('[{"name":"get_wea')["content"] == '[{"name":"get_wea'  # cut short: left as text


def test_auto_needs_a_parser():
    with pytest.raises(ValueError, match="tool-call-parser"):
        chat_output(request(tool_choice="auto"), None, None)


def test_auto_with_parallel_calls_off_keeps_the_first_call_whole_and_streamed(tokenizer):
    single = request(parallel_tool_calls=False)
    whole = ParsedCalls("hermes", tokenizer, single).message(MODEL_TEXT)
    assert [json.loads(c["function"]["arguments"]) for c in whole["tool_calls"]] == [{"city": "Paris"}]
    _, calls = reassemble(stream(ParsedCalls("hermes", tokenizer, single), MODEL_TEXT, tokenizer))
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}]


def test_text_held_back_as_a_possible_tag_is_released_at_the_end(tokenizer):
    text = "Use the form if a <"
    content, calls = reassemble(stream(ParsedCalls("hermes", tokenizer, request()), text, tokenizer))
    assert content == text and calls == []
