"""Request bodies of the OpenAI-compatible API, validated by pydantic (failures become 400s naming the field).

Every field is honoured or refused: unknown fields are refused (``extra="forbid"``), and OpenAI fields that
limbic cannot honour are declared and refused by name when set. The compatibility table is docs/api.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from limbic.monitors.alerting.reviews import Verdict
from limbic.monitors.engine import JsonConstraint, SamplingParams
from limbic.monitors.hf.constrained import check_json_schema
from limbic.monitors.steering import Strength
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

INT64 = 2**63
MAX_CHOICES = 16  # n: every choice is a separate monitored generation
MAX_TOP_LOGPROBS = 20


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(v) for v in value.values())
    return isinstance(value, list) and any(_has_lone_surrogate(v) for v in value)


class Strict(BaseModel):
    """A request object: unknown keys are refused, not ignored; text must be valid Unicode."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"); no tokenizer can encode it.
        for key, item in value.items() if isinstance(value, dict) else ():
            if _has_lone_surrogate(item):
                raise FieldError(key, f"`{key}` holds a lone UTF-16 surrogate, which is not valid Unicode")
        return value


class LimbicOptions(Strict):
    """The ``limbic`` extension object a client sends through ``extra_body``."""

    token_scores: bool = Field(default=False, description="return every token's scores")
    emotions: list[str] | None = Field(default=None, description="limit per-token scores to these emotions")
    steer: dict[str, Strength] = Field(
        default_factory=dict,
        description="emotion -> strength (fraction of the typical residual norm) added at the monitored layer; "
        "merged over the server's LIMBIC_STEER",
    )
    rules: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="alert rules for this request (fields as in LIMBIC_ALERT_RULES), merged over the operator's; "
        "only stricter unless the operator sets LIMBIC_ALLOW_REQUEST_RULES",
    )


class _Refusing(Strict):
    """Declares OpenAI fields limbic cannot honour; setting one is a 400 that names it and says why."""

    refused: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in cls.refused.items():
                if data.get(name) not in (None, False, []):  # {} asks for a feature with its defaults
                    raise RefusedField(name, why)
        return data


class FieldError(ValueError):
    """A problem with one field, raised where pydantic cannot locate it (a model validator): the app's 400
    names ``param`` (after the model's own location)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class RefusedField(FieldError):
    """A field limbic does not support."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(name, f"`{name}` is not supported by limbic: {why}")


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # constrained decoding is always strict

    @field_validator("schema_")
    @classmethod
    def _compiles(cls, schema: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(schema)
        return schema


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` is required with type json_schema, and only with it")
        return self

    def constraint(self) -> JsonConstraint | None:
        if self.type == "json_object":
            return JsonConstraint()
        if self.type == "json_schema" and self.json_schema is not None:
            return JsonConstraint(self.json_schema.schema_)
        return None


class StreamOptions(Strict):
    include_usage: bool = False
    # OpenAI pads events with random text against side channels; limbic's stream carries no secrets of
    # another's, so there is nothing to obfuscate. Accepted so clients that set it keep working.
    include_obfuscation: bool | None = None


class _Sampling(_Refusing):
    """What chat and text completions share: the model, sampling, stopping, streaming and limbic's options."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices, each generated and monitored apart")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's sampling extensions
    top_k: int = Field(default=0, ge=-1, description="0 or -1: off")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = Field(default=False, description="vLLM's extension: generate until max_tokens")
    # Identify the end user to OpenAI's abuse systems; accepted, never stored or used as a label.
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    metadata: dict[str, str] | None = Field(default=None, description="accepted; limbic stores no completions")
    limbic: LimbicOptions = Field(default_factory=LimbicOptions)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not re.fullmatch(r"-?[0-9]+", key):
                raise ValueError(f"keys are token ids, got {key!r}")
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def logprobs_count(self) -> int | None:
        """None: no log-probabilities; k: the sampled token's and the k most likely."""
        raise NotImplementedError

    def constraint(self) -> JsonConstraint | None:
        return self.response_format.constraint() if self.response_format else None

    def sampling(
        self, max_tokens: int, steer: Mapping[str, float], constraint: JsonConstraint | None, seed_offset: int = 0
    ) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop,
            # Choices of one seeded request differ from each other and repeat across requests. Kept in
            # [0, 2**63): vLLM reads a seed of -1 as "no seed".
            seed=None if self.seed is None else (self.seed + seed_offset) % INT64,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            logprobs=self.logprobs_count,
            constraint=constraint,
            steer=dict(steer),
        )

    @property
    def token_id_fields(self) -> dict[str, list[int]]:
        """Fields holding token ids, checked against the vocabulary before generation."""
        return {
            "logit_bias": [int(k) for k in self.logit_bias or {}],
            "stop_token_ids": list(self.stop_token_ids or ()),
        }


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # What the openai client echoes back when a response message is replayed as history.
    refusal: str | None = None
    annotations: list[Any] | None = None  # output-only citations; nothing to render
    audio: None = None
    function_call: None = Field(default=None, description="legacy: send tool_calls")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content parts of type {kind!r} are not supported: limbic serves text models")
        return content

    @model_validator(mode="after")
    def _shape_by_role(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs `tool_call_id`")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry `tool_calls`")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError("`content` is required (null only for an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content, tool-call arguments as objects."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name:
            message["name"] = self.name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": _json_or_text(call.function.arguments)},
                }
                for call in self.tool_calls
            ]
        return message


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # forced calls are always constrained to the schema

    @field_validator("parameters")
    @classmethod
    def _compiles(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            check_json_schema(schema)
        return schema


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(_Sampling):
    refused: ClassVar[Mapping[str, str]] = {
        "store": "limbic stores no chat completions",
        "prediction": "predicted outputs are not implemented",
        "audio": "limbic serves text models",
        "web_search_options": "limbic has no web search",
        "reasoning_effort": "the served model has no reasoning mode",
        "functions": "legacy function calling; send `tools` instead",
        "function_call": "legacy function calling; send `tool_choice` instead",
    }
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text"]] | None = None
    verbosity: Literal["medium"] | None = None  # only the default: limbic cannot steer verbosity
    # Declared so the refusal above names them; never set.
    audio: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    functions: Any = None
    function_call: Any = None
    prediction: Any = None
    store: Literal[False] | None = None

    @model_validator(mode="after")
    def _tools_agree(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise RefusedField("top_logprobs", "needs `logprobs: true`")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise RefusedField("tool_choice", "needs `tools`")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names:
            raise RefusedField("tool_choice", f"names `{choice.function.name}`, which is not in `tools`")
        names = self.tool_names
        if len(set(names)) != len(names):
            raise RefusedField("tools", "two tools share a name")
        if self.tools_active and self.response_format and self.response_format.type != "text":
            raise RefusedField("response_format", "cannot be combined with tools that may be called")
        return self

    @property
    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or ()]

    @property
    def tools_active(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    refused: ClassVar[Mapping[str, str]] = {
        "store": "limbic stores no completions",
        "prediction": "predicted outputs are not implemented",
        "suffix": "the served model has no fill-in-the-middle mode",
        "echo": "not implemented: the prompt's per-token scores are in `limbic.tokens`",
    }
    prompt: str | list[int] = Field(description="one prompt: text or token ids")
    max_tokens: int | None = Field(default=16, ge=1)
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: Any = None
    echo: bool = False
    prediction: Any = None
    store: Literal[False] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            return value[0]  # a batch of one
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            raise ValueError("batches of prompts are not supported: send one prompt per request")
        return value

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise RefusedField("best_of", "only best_of == n (every choice is returned and monitored)")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs

    @property
    def token_id_fields(self) -> dict[str, list[int]]:
        prompt = self.prompt if isinstance(self.prompt, list) else []
        return super().token_id_fields | {"prompt": prompt}


class AnalyzeMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


class AnalyzeItem(Strict):
    """Plain ``text``, scored as it is, or a transcript of ``messages``, rendered with the chat template."""

    id: Any = None
    text: str | None = Field(default=None, min_length=1)
    messages: list[AnalyzeMessage] | None = Field(default=None, min_length=1)
    tokens: Literal["all", "assistant", "user"] = Field(default="assistant", description="transcripts: whose")
    per_message: bool = Field(default=False, description="transcripts: each message's scores too")

    @model_validator(mode="after")
    def _text_or_messages(self) -> AnalyzeItem:
        if (self.text is None) == (self.messages is None):
            raise ValueError("give either `text` or `messages`")
        return self


class AnalyzeRequest(Strict):
    model: str | None = None
    texts: list[AnalyzeItem] = Field(min_length=1, max_length=256)


class ReviewVerdict(Strict):
    """``POST /v1/reviews/{id}``: a person's verdict on a queued response."""

    verdict: Verdict
    note: str | None = Field(default=None, max_length=4000)
