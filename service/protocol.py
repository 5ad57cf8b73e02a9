"""Request bodies of the OpenAI-compatible API, validated by pydantic (failures become 400s).

Fields OpenAI defines that limbic cannot honour (tools, logprobs, n > 1, ...) are refused with a clear
400 rather than silently ignored; unknown fields are ignored, as vLLM's server does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from monitors.engine import SamplingParams
from monitors.steering import Strength


class LimbicOptions(BaseModel):
    """The ``limbic`` extension object a client sends through ``extra_body``."""

    model_config = ConfigDict(extra="forbid")
    token_scores: bool = Field(default=False, description="return every token's scores")
    emotions: list[str] | None = Field(default=None, description="limit per-token scores to these emotions")
    steer: dict[str, Strength] = Field(
        default_factory=dict,
        description="emotion -> strength (fraction of the typical residual norm) added at the monitored layer; "
        "merged over the server's LIMBIC_STEER",
    )


class _Unsupported(BaseModel):
    """Refuses OpenAI features that limbic does not implement."""

    unsupported: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in cls.unsupported:
                if data.get(name) not in (None, False, [], {}):
                    raise ValueError(f"`{name}` is not supported by limbic")
        return data


class _Sampling(_Unsupported):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Literal[1] = Field(default=1, description="one choice per request")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = Field(default=False, description="vLLM's extension: generate until max_tokens")
    user: str | None = None  # accepted for compatibility; never stored or used as a label
    limbic: LimbicOptions = Field(default_factory=LimbicOptions)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling(self, max_tokens: int, steer: Mapping[str, float]) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
            steer=dict(steer),
        )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    unsupported = ("tools", "functions", "tool_choice", "logprobs", "top_logprobs", "audio", "logit_bias")
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    unsupported = ("logprobs", "suffix", "echo", "logit_bias")
    prompt: str | list[int] = Field(description="one prompt: text or token ids")
    max_tokens: int | None = Field(default=16, ge=1)
    best_of: Literal[1] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            return value[0]  # a batch of one
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            raise ValueError("batches of prompts are not supported: send one prompt per request")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class AnalyzeItem(BaseModel):
    id: Any = None
    text: str = Field(min_length=1)


class AnalyzeRequest(BaseModel):
    model: str | None = None
    texts: list[AnalyzeItem] = Field(min_length=1, max_length=256)
