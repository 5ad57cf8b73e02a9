"""OpenAI's Responses API (``POST /v1/responses``) as a translation layer over chat completions.

A Responses request becomes a chat completions body; the chat answer (or its chunks) becomes a Response object (or
its stream events) in OpenAI's exact shapes, so the openai client, its ``responses.stream()`` helper and the OpenAI
Agents SDK work unchanged. limbic's results keep their chat shape under a top-level ``limbic`` key: the summary on
the response object, per-token scores on the delta events that carry those tokens.

Fields OpenAI defines that limbic cannot honour are refused with a ValueError naming the field (a 400), never
silently ignored; unknown fields are refused too, so a typo cannot pass for a setting. ``previous_response_id``
needs the conversation's text kept server-side: see ``ResponseStore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Annotated, Any, Literal

from limbic.service.protocol import RefusedField, Strict
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)
from redis.exceptions import RedisError

# ---------------------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------------------

_MEDIA_PARTS = ("input_image", "input_file", "input_audio")


def _text_parts(value: Any) -> Any:
    """Content as a list of parts (a string is one text part); images, files and audio are refused clearly."""
    if isinstance(value, str):
        return [{"type": "input_text", "text": value}]
    for part in value if isinstance(value, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise ValueError(f"`{kind}` content is not supported by limbic: its models read text only")
    return value


class InputText(Strict):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # a caching hint: accepted, ignored


class OutputText(Strict):
    """An earlier answer's text, as clients replay it (annotations and logprobs are carried, not read)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] | None = None


class Refusal(Strict):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | OutputText | Refusal, Field(discriminator="type")]


def _part_text(part: InputText | OutputText | Refusal) -> str:
    return part.refusal if isinstance(part, Refusal) else part.text


def _joined(parts: Sequence[InputText | OutputText | Refusal]) -> str:
    return "".join(_part_text(p) for p in parts)


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Annotated[list[ContentPart], BeforeValidator(_text_parts)]  # a string on the wire
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: Annotated[list[InputText], BeforeValidator(_text_parts)]  # a string on the wire
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _item_kind(value: Any) -> str | None:
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]
_ITEMS: TypeAdapter[list[InputItem]] = TypeAdapter(list[InputItem])


class FunctionTool(Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormatText(Strict):
    type: Literal["text"]


class TextFormatJSONObject(Strict):
    type: Literal["json_object"]


class TextFormatJSONSchema(Strict):
    type: Literal["json_schema"]
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(Strict):
    format: Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")] = (
        Field(default_factory=lambda: TextFormatText(type="text"))
    )
    verbosity: Literal["medium"] | None = None

    @field_validator("verbosity", mode="before")
    @classmethod
    def _one_verbosity(cls, value: Any) -> Any:
        if value not in (None, "medium"):
            raise ValueError(f"`text.verbosity`={value!r} is not supported by limbic: omit it or send 'medium'")
        return value


class StreamOptions(Strict):
    # Obfuscation pads delta events with random characters so that their sizes do not leak the text over a
    # compressed, encrypted connection. It is only padding (it never changes the text or the events' meaning),
    # so limbic accepts the option, as clients send it by default, and sends no padding.
    include_obfuscation: bool | None = None


# Fields OpenAI defines of which limbic honours only these values: anything else is refused, naming the field.
_HONOURED: dict[str, tuple[tuple[Any, ...], str]] = {
    "truncation": ((None, "disabled"), "limbic never drops input to fit the context; omit it or send 'disabled'"),
    "background": ((None, False), "background responses are not supported"),
    "include": ((None, []), "there is nothing extra to include (no logprobs, reasoning or hosted tools)"),
    "top_logprobs": ((None, 0), "logprobs are not supported"),
    "conversation": ((None,), "conversations are not supported: chain responses with previous_response_id"),
    "prompt": ((None,), "stored prompt templates are not supported"),
    "service_tier": ((None, "auto", "default"), "limbic has a single service tier"),
    "context_management": ((None, []), "context compaction is not supported"),
    "moderation": ((None,), "OpenAI moderation is not available (limbic's alerts are in the `limbic` object)"),
    "image": ((None,), "image inputs are not supported"),
    "access_programs": ((None,), "access programs are not supported"),
    "background_options": ((None,), "background responses are not supported"),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ResponsesRequest(BaseModel):
    """A ``POST /v1/responses`` body. Every field OpenAI's clients send by default is accepted."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: list[InputItem]  # a string on the wire is one user message
    instructions: str | None = None
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Literal["auto", "none", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=0)  # counts hosted-tool calls; limbic has none
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool = True
    previous_response_id: str | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    # Identifiers for OpenAI's abuse detection and cache routing: accepted for compatibility, never stored.
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Prompt-cache hints: they change speed, never the answer, so they are accepted and ignored.
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled"] | None = None
    background: bool | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    conversation: Any = None
    prompt: Any = None
    service_tier: str | None = None
    context_management: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    background_options: Any = None
    limbic: dict[str, Any] | None = Field(default=None, description="limbic's extension object, passed to chat")

    @field_validator(*_HONOURED, mode="before")
    @classmethod
    def _refuse_unhonoured(cls, value: Any, info: ValidationInfo) -> Any:
        honoured, why = _HONOURED[info.field_name]
        if value not in honoured:
            raise ValueError(f"`{info.field_name}`={_short(value)} is not supported by limbic: {why}")
        return value

    @field_validator("reasoning", mode="before")
    @classmethod
    def _refuse_reasoning(cls, value: Any) -> Any:
        if isinstance(value, dict) and any(v is not None for v in value.values()):
            raise ValueError(f"`reasoning`={_short(value)} is not supported by limbic: it serves no reasoning models")
        return value

    @field_validator("stream", "store", "tools", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[info.field_name].get_default(call_default_factory=True) if value is None else value

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"type": "message", "role": "user", "content": value}]
        supported = ("message", "function_call", "function_call_output")
        for i, item in enumerate(value if isinstance(value, list) else ()):
            kind = _item_kind(item) if isinstance(item, dict) else None
            if kind is not None and kind not in supported:
                raise ValueError(
                    f"`input[{i}]`: items of type `{kind}` are not supported by limbic; "
                    f"send {', '.join(supported)} items"
                )
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _refuse_hosted_tools(cls, value: Any) -> Any:
        for i, tool in enumerate(value if isinstance(value, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"`tools[{i}]`: tools of type `{kind}` are not supported by limbic; only `function`")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _refuse_hosted_tool_choice(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError(
                f"`tool_choice`={_short(value)} is not supported by limbic: send auto, none, required or a function"
            )
        return value

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ResponsesRequest:
        names = [tool.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise RefusedField("tools", "two functions share a name")
        choice = self.tool_choice
        if choice == "required" and not names:
            raise RefusedField("tool_choice", "`required` needs at least one function in `tools`")
        if isinstance(choice, ToolChoiceFunction) and choice.name not in names:
            raise RefusedField("tool_choice", f"names the function `{choice.name}`, which is not in `tools`")
        return self


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------------------------
# Request -> chat completions body
# ---------------------------------------------------------------------------------------------------------------


def _without_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _items_to_messages(items: Sequence[MessageItem | FunctionCallItem | FunctionCallOutputItem]) -> list[dict]:
    """Chat messages for Responses items; a turn's function calls join its assistant message, as in chat."""
    messages: list[dict] = []
    for item in items:
        if isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _joined(item.output)})
        else:
            messages.append({"role": item.role, "content": _joined(item.content)})
    return messages


def conversation_messages(request: ResponsesRequest, history: list[dict] | None) -> list[dict]:
    """The conversation so far as chat messages: ``history`` then this request's input, without instructions.

    Instructions are not part of it: OpenAI does not carry them over to a response chained by
    ``previous_response_id``, so they are neither stored nor replayed.
    """
    return copy.deepcopy(history or []) + _items_to_messages(request.input)


def _chat_tool(tool: FunctionTool) -> dict:
    function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    return {"type": "function", "function": _without_none(function | {"strict": tool.strict})}


def _tool_fields(request: ResponsesRequest) -> dict[str, Any]:
    if not request.tools:  # chat refuses tool_choice and parallel_tool_calls without tools
        return {}
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        choice = {"type": "function", "function": {"name": choice.name}}
    return _without_none(
        {
            "tools": [_chat_tool(tool) for tool in request.tools],
            "tool_choice": choice,
            "parallel_tool_calls": request.parallel_tool_calls,
        }
    )


def _format_fields(request: ResponsesRequest) -> dict[str, Any]:
    fmt = request.text.format if request.text else None
    if isinstance(fmt, TextFormatJSONObject):
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, TextFormatJSONSchema):
        schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
        return {"response_format": {"type": "json_schema", "json_schema": _without_none(schema)}}
    return {}


def to_chat(request: ResponsesRequest, history: list[dict] | None) -> dict:
    """The chat completions body for a request; ``history`` is the stored conversation of its previous response.

    The body is for a non-streamed call: to stream, the caller sets ``stream`` and
    ``stream_options={"include_usage": True}``, so that the response's usage arrives.
    """
    instructions = [{"role": "system", "content": request.instructions}] if request.instructions else []
    body = {
        "model": request.model,
        "messages": instructions + conversation_messages(request, history),
        "stream": False,
    }
    sampling = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_completion_tokens": request.max_output_tokens,
        "user": request.user,
        "limbic": request.limbic,
    }
    return body | _without_none(sampling) | _tool_fields(request) | _format_fields(request)


# ---------------------------------------------------------------------------------------------------------------
# Chat answer -> Response object
# ---------------------------------------------------------------------------------------------------------------

# Chat finish reasons that end a response early, and the reason OpenAI reports for them.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _status(finish: str | None) -> str:
    """The status of a response, and of its last output item, for the chat's finish reason."""
    return "incomplete" if finish in _INCOMPLETE else "completed"


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _shows_text(text: str, has_calls: bool) -> bool:
    """Whether the answer's text becomes a message item: whitespace around tool calls is not an answer."""
    return bool(text.strip()) or (bool(text) and not has_calls)


def _call_id(call: dict, chat_id: str, index: int) -> str:
    return call.get("id") or f"call_{chat_id.rpartition('-')[2]}_{index}"


class _Output:
    """A response's output items; their ids derive from the response id, so a streamed answer gets the same."""

    def __init__(self, response_id: str) -> None:
        self.suffix = response_id.removeprefix("resp_")
        self.items: list[dict] = []

    def _add(self, item: dict) -> tuple[int, dict]:
        self.items.append(item)
        return len(self.items) - 1, item

    def add_message(self) -> tuple[int, dict]:
        item_id = f"msg_{self.suffix}_{len(self.items)}"
        return self._add(
            {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}
        )

    def add_call(self, call_id: str, name: str) -> tuple[int, dict]:
        item_id = f"fc_{self.suffix}_{len(self.items)}"
        item = {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": ""}
        return self._add(item | {"status": "in_progress"})

    @classmethod
    def of(cls, chat: dict, response_id: str) -> _Output:
        """The items of a whole chat answer: its text, then its tool calls; the last one is cut short by a limit."""
        output = cls(response_id)
        choice = (chat.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        text, calls = message.get("content") or "", message.get("tool_calls") or []
        if _shows_text(text, bool(calls)):
            output.add_message()[1]["content"].append(_text_part(text))
        for index, call in enumerate(calls):
            function = call.get("function") or {}
            arguments = function.get("arguments", "")
            _, item = output.add_call(_call_id(call, chat.get("id", ""), index), function.get("name", ""))
            item["arguments"] = arguments if isinstance(arguments, str) else json.dumps(arguments)
        for item in output.items:
            item["status"] = "completed"
        if output.items:
            output.items[-1]["status"] = _status(choice.get("finish_reason"))
        return output


def _usage(usage: dict | None) -> dict | None:
    if not usage:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": usage.get("prompt_tokens", 0),
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": usage.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.get("total_tokens", 0),
    }


def _echo(request: ResponsesRequest) -> dict[str, Any]:
    """The request's settings as OpenAI's Response object reports them, defaults made explicit."""
    text = request.text or TextConfig()
    choice = request.tool_choice or "auto"
    return {
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": request.max_tool_calls,
        "metadata": request.metadata or {},
        "model": request.model,
        "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": request.store,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "text": {"format": text.format.model_dump(by_alias=True), "verbosity": "medium"},
        "tool_choice": choice.model_dump() if isinstance(choice, ToolChoiceFunction) else choice,
        "tools": [tool.model_dump() for tool in request.tools],
        "top_logprobs": 0,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": "disabled",
        "background": False,
        "user": request.user,
        "safety_identifier": request.safety_identifier,
        "prompt_cache_key": request.prompt_cache_key,
    }


def _response(
    request: ResponsesRequest,
    response_id: str,
    created_at: float,
    *,
    status: str,
    output: list[dict],
    finish: str | None = None,
    usage: dict | None = None,
    limbic: dict | None = None,
    error: dict | None = None,
) -> dict:
    response = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": _INCOMPLETE[finish]} if status == "incomplete" and finish else None,
        **_echo(request),
        "output": output,
        "usage": usage,
    }
    if limbic:
        response["limbic"] = limbic
    return response


def to_response(chat: dict, request: ResponsesRequest, response_id: str, created_at: float) -> dict:
    """The Response object for a non-streamed ``chat.completion``; its ``limbic`` object is kept at top level."""
    finish = (chat.get("choices") or [{}])[0].get("finish_reason")
    return _response(
        request,
        response_id,
        created_at,
        status=_status(finish),
        output=_Output.of(chat, response_id).items,
        finish=finish,
        usage=_usage(chat.get("usage")),
        limbic=chat.get("limbic"),
    )


def output_messages(chat: dict) -> list[dict]:
    """The assistant's turn in a ``chat.completion`` as chat messages, to store for ``previous_response_id``."""
    return _items_to_messages(_ITEMS.validate_python(_Output.of(chat, "resp_").items))


def response_messages(response: dict) -> list[dict]:
    """The assistant's turn in a Response object (streamed or not) as chat messages, to store."""
    return _items_to_messages(_ITEMS.validate_python(response.get("output") or []))


# ---------------------------------------------------------------------------------------------------------------
# Chat chunks -> Responses stream events
# ---------------------------------------------------------------------------------------------------------------

_DELTAS = ("response.output_text.delta", "response.function_call_arguments.delta")


class _StreamError(Exception):
    """A chat stream that cannot be told as Responses events (a tool call resumed after the next began)."""


class _Events:
    """The state of one streamed response: its items, the item receiving deltas, the next sequence number."""

    def __init__(self, request: ResponsesRequest, response_id: str, created_at: float) -> None:
        self.request, self.response_id, self.created_at = request, response_id, created_at
        self.output = _Output(response_id)
        self.sequence = 0
        self.open: tuple[int, dict] | None = None
        self.pending = ""  # whitespace not shown yet: dropped if a tool call follows (see _shows_text)
        self.calls: dict[int, tuple[int, dict]] = {}  # the chat's tool-call index -> (output index, item)
        self.finish: str | None = None
        self.finished = False
        self.usage: dict | None = None
        self.summary: dict = {}
        self.tokens: list = []
        self.unattached: list = []  # token scores waiting for the next delta event

    def event(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **copy.deepcopy(fields)}
        self.sequence += 1
        return event

    def response(self, status: str, error: dict | None = None) -> dict:
        limbic = self.summary | ({"tokens": self.tokens} if self.tokens else {})
        return _response(
            self.request,
            self.response_id,
            self.created_at,
            status=status,
            output=self.output.items,
            finish=self.finish,
            usage=self.usage,
            limbic=limbic,
            error=error,
        )

    def started(self) -> list[dict]:
        snapshot = self.response("in_progress") | {"output": []}
        return [
            self.event("response.created", response=snapshot),
            self.event("response.in_progress", response=snapshot),
        ]

    def feed(self, chunk: dict) -> list[dict]:
        limbic = chunk.get("limbic") or {}
        self.tokens += limbic.get("tokens") or []
        self.unattached += limbic.get("tokens") or []
        self.summary |= {key: value for key, value in limbic.items() if key != "tokens"}
        self.usage = _usage(chunk.get("usage")) or self.usage
        events: list[dict] = []
        for choice in chunk.get("choices") or []:
            if self.finished:
                break
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self.text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self.tool_call(call, chunk.get("id", ""))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                events += self.wrap_up()
        return self.attach_tokens(events)

    def attach_tokens(self, events: list[dict]) -> list[dict]:
        first_delta = next((event for event in events if event["type"] in _DELTAS), None)
        if first_delta is not None and self.unattached:
            first_delta["limbic"] = {"tokens": self.unattached}
            self.unattached = []
        return events

    def open_message(self) -> list[dict]:
        index, item = self.output.add_message()
        self.open = (index, item)
        part = _text_part("")
        added = self.event("response.output_item.added", output_index=index, item=item)
        item["content"].append(part)
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [added, self.event("response.content_part.added", **where, part=part)]

    def text(self, delta: str) -> list[dict]:
        events: list[dict] = []
        if self.open is None or self.open[1]["type"] != "message":
            self.pending += delta
            if not self.pending.strip():
                return []
            delta, self.pending = self.pending, ""
            events += self.close("completed") + self.open_message()
        index, item = self.open
        item["content"][0]["text"] += delta
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [*events, self.event("response.output_text.delta", **where, delta=delta, logprobs=[])]

    def tool_call(self, call: dict, chat_id: str) -> list[dict]:
        number, function = call.get("index", 0), call.get("function") or {}
        events: list[dict] = []
        if number not in self.calls:
            events += self.close("completed")
            self.pending = ""
            index, item = self.open = self.calls[number] = self.output.add_call(
                _call_id(call, chat_id, number), function.get("name") or ""
            )
            events.append(self.event("response.output_item.added", output_index=index, item=item))
        elif self.calls[number] is self.open:
            index, item = self.open
            item["name"] += function.get("name") or ""  # OpenAI sends it whole, first; others may not
        else:
            raise _StreamError(f"tool call {number} continued after the next output item began")
        if function.get("arguments"):
            item["arguments"] += function["arguments"]
            where = {"item_id": item["id"], "output_index": index}
            events.append(self.event("response.function_call_arguments.delta", **where, delta=function["arguments"]))
        return events

    def close(self, status: str) -> list[dict]:
        """The done events of the item receiving deltas, if any."""
        if self.open is None:
            return []
        (index, item), self.open = self.open, None
        item["status"] = status
        if item["type"] == "function_call":
            where = {"item_id": item["id"], "output_index": index}
            done = [self.event("response.function_call_arguments.done", **where, arguments=item["arguments"])]
        else:
            part, where = item["content"][0], {"item_id": item["id"], "output_index": index, "content_index": 0}
            done = [
                self.event("response.output_text.done", **where, text=part["text"], logprobs=[]),
                self.event("response.content_part.done", **where, part=part),
            ]
        return [*done, self.event("response.output_item.done", output_index=index, item=item)]

    def wrap_up(self) -> list[dict]:
        """Closes the answer: whitespace-only text counts when there was nothing else."""
        self.finished = True
        events: list[dict] = []
        if self.pending and not self.output.items:
            pending, self.pending = self.pending, ""
            events += self.open_message() + self.text(pending)
        return events + self.close(_status(self.finish))

    def ended(self) -> list[dict]:
        events = [] if self.finished else self.wrap_up()
        status = _status(self.finish)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return [*self.attach_tokens(events), self.event(kind, response=self.response(status))]

    def failed(self, error: dict) -> list[dict]:
        message = error.get("message") or "generation failed"
        if self.open is not None:
            self.open[1]["status"] = "incomplete"
        report = self.event(
            "error", code=error.get("code") or error.get("type"), message=message, param=error.get("param")
        )
        failed = self.response("failed", error={"code": "server_error", "message": message})
        return [report, self.event("response.failed", response=failed)]


@contextlib.asynccontextmanager
async def _closing(iterable: AsyncIterable[Any]) -> AsyncIterator[AsyncIterator[Any]]:
    """Iterates ``iterable`` and closes it after, so a client leaving now also ends the generation it reads."""
    iterator = aiter(iterable)
    try:
        yield iterator
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


async def stream_events(
    chunks: AsyncIterable[dict], request: ResponsesRequest, response_id: str, created_at: float
) -> AsyncIterator[dict]:
    """Responses stream events for a chat stream's chunks (requested with ``include_usage``), in OpenAI's order.

    The ``response.completed`` (or ``response.incomplete``) event's response equals what ``to_response`` builds
    for the same answer; an ``{"error": ...}`` chunk, or a failing stream, ends it with ``error`` and
    ``response.failed``.
    """
    state = _Events(request, response_id, created_at)
    for event in state.started():
        yield event
    events: list[dict] = []
    async with _closing(chunks) as source:
        try:
            async for chunk in source:
                if "error" in chunk:
                    events = state.failed(chunk["error"] or {})
                    break
                for event in state.feed(chunk):
                    yield event
            else:
                events = state.ended()
        except Exception as exc:  # the status line is gone: report in-band, as OpenAI does
            events = state.failed({"message": f"generation failed: {exc}", "type": "server_error"})
    for event in events:
        yield event


def sse(event: dict) -> str:
    """One Server-Sent Event, named after the event's type as OpenAI's stream does."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------------------------
# Conversations kept for previous_response_id
# ---------------------------------------------------------------------------------------------------------------


class StoreUnavailable(RuntimeError):
    """The response store did not answer (in time): the request cannot be chained or remembered."""


class ResponseNotFound(KeyError):
    """``previous_response_id`` names no stored response (never stored, expired or evicted)."""

    def __str__(self) -> str:
        return f"previous response not found: {self.args[0]}"


class ResponseStore(ABC):
    """Conversations by response id, as chat messages, for ``previous_response_id``.

    Chaining needs the conversation's text on the server, so it is stored, but only when the request lets it
    (``store``, true by default as in OpenAI's API), for ``ttl_s`` seconds at most, and in bounded space.
    """

    @abstractmethod
    async def get(self, response_id: str) -> list[dict] | None: ...

    @abstractmethod
    async def put(self, response_id: str, messages: list[dict]) -> None: ...


class MemoryResponseStore(ResponseStore):
    """One process's store: the ``capacity`` most recently used conversations, each for ``ttl_s`` seconds."""

    def __init__(self, capacity: int = 1000, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        if capacity < 1 or ttl_s <= 0:
            raise ValueError("the response store needs a positive capacity and TTL")
        self.capacity, self.ttl_s, self.clock = capacity, ttl_s, clock
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def get(self, response_id: str) -> list[dict] | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        expires, value = entry
        if self.clock() >= expires:
            del self._entries[response_id]
            return None
        self._entries.move_to_end(response_id)
        return json.loads(value)  # a copy, as from Redis: callers may extend it

    async def put(self, response_id: str, messages: list[dict]) -> None:
        self._entries[response_id] = (self.clock() + self.ttl_s, json.dumps(messages))
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


class RedisResponseStore(ResponseStore):
    """A store shared by replicas: JSON under ``limbic:responses:<id>``, expired by Redis after ``ttl_s``.

    Every call is bounded by ``timeout_s``, so a hung Redis fails a request (``StoreUnavailable``) instead of
    hanging it.
    """

    prefix = "limbic:responses:"

    def __init__(self, client: Any, ttl_s: float = 3600.0, timeout_s: float = 2.0) -> None:
        if ttl_s < 1:
            raise ValueError("the response store's TTL must be at least one second")
        self.client, self.ttl_s, self.timeout_s = client, ttl_s, timeout_s

    async def _call(self, what: str, call: Any) -> Any:
        try:
            return await asyncio.wait_for(call, self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"the response store (Redis) failed to {what}: {type(exc).__name__}") from exc

    async def get(self, response_id: str) -> list[dict] | None:
        value = await self._call("read", self.client.get(self.prefix + response_id))
        return None if value is None else json.loads(value)

    async def put(self, response_id: str, messages: list[dict]) -> None:
        value = json.dumps(messages)
        await self._call("write", self.client.set(self.prefix + response_id, value, ex=round(self.ttl_s)))


async def history_for(store: ResponseStore | None, request: ResponsesRequest) -> list[dict] | None:
    """The stored conversation ``previous_response_id`` continues; ``ResponseNotFound`` (a 404) if there is none."""
    if request.previous_response_id is None:
        return None
    history = await store.get(request.previous_response_id) if store is not None else None
    if history is None:
        raise ResponseNotFound(request.previous_response_id)
    return history


async def remember(
    store: ResponseStore | None, request: ResponsesRequest, history: list[dict] | None, response: dict
) -> None:
    """Stores the conversation up to this response (without instructions), if the request allows it."""
    if store is None or not request.store or response.get("status") == "failed":
        return
    await store.put(response["id"], conversation_messages(request, history) + response_messages(response))
