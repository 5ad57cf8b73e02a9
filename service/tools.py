"""Tool calling on chat completions: what a request's ``tool_choice`` constrains, and how the generated
text becomes OpenAI's ``tool_calls``, whole or as streamed deltas.

- a named function: the output is constrained to that function's parameters schema and *is* its arguments;
- ``required``: constrained to a JSON array of ``{"name", "arguments"}`` objects, one per call;
- ``auto``: the model writes what it likes; vLLM's tool parser for the template's format (``hermes`` for
  limbic's bundled ChatML template) finds the calls, in the complete text and incrementally while streaming.

Constrained modes are valid by construction (xgrammar), whatever the model's size; ``auto`` is as good as
the model. Every token, tool-call tokens included, is scored like any other.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from limbic.monitors.engine import JsonConstraint
from limbic.service.protocol import ChatCompletionRequest, NamedToolChoice

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatOutput:
    """Turns one choice's generated text into the assistant message; plain text here, tools in subclasses.

    ``push`` takes each text delta as generation goes and returns the message deltas to stream; ``finish``
    returns what was held back; ``message`` builds the whole message from the complete text.
    """

    constraint: JsonConstraint | None = None

    def push(self, text: str, token_ids: Sequence[int]) -> list[dict]:
        return [{"content": text}] if text else []

    def finish(self) -> list[dict]:
        return []

    def message(self, text: str) -> dict:
        return {"role": "assistant", "content": text}


def _call(index: int, name: str, arguments: str, with_header: bool = True) -> dict:
    delta: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if with_header:
        delta |= {"id": call_id(), "type": "function"}
        delta["function"] = {"name": name, "arguments": arguments}
    return delta


def _message_with_calls(calls: list[dict], content: str | None = None) -> dict:
    tool_calls = [{"id": c.get("id") or call_id(), "type": "function", "function": c["function"]} for c in calls]
    return {"role": "assistant", "content": content, "tool_calls": tool_calls}


class NamedCall(ChatOutput):
    """``tool_choice`` names a function: the whole output is that function's arguments."""

    def __init__(self, name: str, parameters: dict | None) -> None:
        self.name = name
        self.constraint = JsonConstraint(parameters or ANY_OBJECT)  # a function without parameters takes {}
        self._started = False

    def push(self, text: str, token_ids: Sequence[int]) -> list[dict]:
        if self._started and not text:
            return []
        delta = _call(0, self.name, text, with_header=not self._started)
        self._started = True
        return [{"tool_calls": [delta]}]

    def message(self, text: str) -> dict:
        return _message_with_calls([{"function": {"name": self.name, "arguments": text}}])


class RequiredCalls(ChatOutput):
    """``tool_choice: required``: a JSON array of calls, streamed whole once complete."""

    def __init__(self, tools: dict[str, dict | None], parallel: bool) -> None:
        definitions: dict[str, Any] = {}
        options = []
        for n, (name, parameters) in enumerate(tools.items()):
            arguments = _hoist_definitions(parameters or ANY_OBJECT, f"tool{n}_", definitions)
            options.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
        if definitions:
            schema["$defs"] = definitions
        if not parallel:
            schema["maxItems"] = 1
        self.constraint = JsonConstraint(schema)
        self._text: list[str] = []

    def push(self, text: str, token_ids: Sequence[int]) -> list[dict]:
        self._text.append(text)
        return []

    def finish(self) -> list[dict]:
        message = self.message("".join(self._text))
        if "tool_calls" not in message:
            return [{"content": message["content"]}] if message["content"] else []
        calls = [
            {"index": n, "id": c["id"], "type": "function", "function": c["function"]}
            for n, c in enumerate(message["tool_calls"])
        ]
        return [{"tool_calls": calls}]

    def message(self, text: str) -> dict:
        try:
            calls = json.loads(text)
        except ValueError:  # cut short by max_tokens: what was generated, as text
            return {"role": "assistant", "content": text}
        found = [{"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)} for c in calls]
        return _message_with_calls([{"function": f} for f in found])


def _hoist_definitions(schema: dict, prefix: str, definitions: dict[str, Any]) -> dict:
    """``schema`` with its ``$defs``/``definitions`` moved into ``definitions`` under ``prefix``ed names and its
    local ``$ref``s rewritten to them: a tool's schema nested in the array of calls keeps resolving."""
    local = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    if not local:
        return schema
    renamed = {f"#/{kind}/{name}": f"#/$defs/{prefix}{name}" for kind in ("$defs", "definitions") for name in local}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (renamed.get(v, v) if k == "$ref" else rewrite(v))
                for k, v in node.items()
                if k not in ("$defs", "definitions")
            }
        return [rewrite(v) for v in node] if isinstance(node, list) else node

    for name, definition in local.items():
        definitions[f"{prefix}{name}"] = rewrite(definition)
    return rewrite(schema)


class ParsedCalls(ChatOutput):
    """``tool_choice: auto``: vLLM's tool parser finds calls in free text (a fresh parser per choice)."""

    def __init__(self, parser_name: str, tokenizer: Any, request: ChatCompletionRequest) -> None:
        self._parallel = request.parallel_tool_calls is not False
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VLLMRequest
        from vllm.tool_parsers import ToolParserManager

        tools = [t.model_dump(exclude_none=True) for t in request.tools or ()]
        self._request = VLLMRequest.model_validate(
            {"model": request.model, "messages": [{"role": "user", "content": ""}], "tools": tools}
        )
        self._parser = ToolParserManager.get_tool_parser(parser_name)(tokenizer, self._request.tools)
        self._text = ""
        self._ids: list[int] = []
        self._content = ""  # content streamed so far

    def push(self, text: str, token_ids: Sequence[int]) -> list[dict]:
        previous_text, previous_ids = self._text, self._ids
        self._text, self._ids = previous_text + text, previous_ids + list(token_ids)
        if not text:
            return []
        delta = self._parser.extract_tool_calls_streaming(
            previous_text, self._text, text, previous_ids, self._ids, list(token_ids), self._request
        )
        return [] if delta is None else self._kept([_delta_dict(delta)])

    def finish(self) -> list[dict]:
        deltas = []
        rest = self._parser.get_remaining_unstreamed_args() if self._parser.prev_tool_call_arr else ""
        if rest:
            index = len(self._parser.prev_tool_call_arr) - 1
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": rest}}]})
        # Text the parser held back in case it began a tool call ("... if a <") that never came.
        content = self.message(self._text).get("content") or ""
        if content.startswith(self._content) and len(content) > len(self._content):
            deltas.append({"content": content[len(self._content) :]})
        return self._kept(deltas)

    def _kept(self, deltas: list[dict]) -> list[dict]:
        """Deltas without the calls past the first when parallel calls are off; records streamed content."""
        kept = []
        for delta in deltas:
            if not self._parallel and "tool_calls" in delta:
                delta = delta | {"tool_calls": [c for c in delta["tool_calls"] if c["index"] == 0]}
                if not delta["tool_calls"]:
                    del delta["tool_calls"]
            self._content += delta.get("content") or ""
            if delta:
                kept.append(delta)
        return kept

    def message(self, text: str) -> dict:
        parsed = self._parser.extract_tool_calls(text, self._request)
        if not parsed.tools_called:
            return {"role": "assistant", "content": text}
        found = parsed.tool_calls if self._parallel else parsed.tool_calls[:1]
        calls = [{"id": c.id, "function": c.function.model_dump()} for c in found]
        return _message_with_calls(calls, parsed.content)


def _delta_dict(delta: Any) -> dict:
    out: dict[str, Any] = {}
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        out["tool_calls"] = [c.model_dump(exclude_none=True) for c in delta.tool_calls]
    return out


def chat_output(request: ChatCompletionRequest, tokenizer: Any, parser_name: str | None) -> ChatOutput:
    """The output handling for one choice of ``request`` (a fresh object per choice: parsers keep state)."""
    if not request.tools_active:
        return ChatOutput()
    parameters = {t.function.name: t.function.parameters for t in request.tools or ()}
    choice = request.tool_choice or "auto"
    if isinstance(choice, NamedToolChoice):
        return NamedCall(choice.function.name, parameters[choice.function.name])
    if choice == "required":
        return RequiredCalls(parameters, parallel=request.parallel_tool_calls is not False)
    if parser_name is None:
        raise ValueError(
            "tool_choice `auto` needs a tool-call parser for this model's template: start limbic with "
            "--tool-call-parser NAME (one of vLLM's), or send tool_choice `required` or a named function"
        )
    return ParsedCalls(parser_name, tokenizer, request)
