"""The boundary between the service and a generation engine (vLLM for serving, transformers for research).

An engine turns prompt token ids into a stream of ``Step``s: decoded text deltas plus the per-token emotion
scores its hooks measured. The service never touches model internals; the monitor never touches text.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

if TYPE_CHECKING:  # the API side imports this module without torch: these two bring it in
    from limbic.monitors.mitigation import SteerTrigger
    from limbic.vectors.storage import EmotionVectors, ModelIdentity

Phase = Literal["prompt", "generation"]
PHASES: tuple[Phase, ...] = ("prompt", "generation")
FinishReason = Literal["stop", "length", "abort", "content_filter"]


@dataclass
class ScoredRows:
    """Scores and residual norms for consecutive token rows of one forward pass."""

    z: np.ndarray  # [n_tokens, n_emotions]
    norms: np.ndarray  # [n_tokens]
    scored_at: float = field(default_factory=time.perf_counter)  # when they were scored (vLLM: in the worker)


def scored(norms: np.ndarray, sink_norm: float) -> np.ndarray:
    """Which rows carry a meaningful score: not attention sinks (the first token of a sequence has about 100
    times the usual residual norm). The one rule serving, metrics, alerts, analysis and steering triggers apply."""
    return norms < sink_norm


@dataclass(frozen=True)
class JsonConstraint:
    """Constrained decoding: the output must be compact JSON matching ``schema`` (default: any object).

    Both engines compile it with xgrammar (vLLM through its structured-output backend), so a tool call
    forced by ``tool_choice`` or a ``response_format`` schema is valid by construction, even on a 135M model.
    """

    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and, if asked for, the most likely alternatives (raw logits)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class EngineStartupError(RuntimeError):
    """The engine came up but cannot serve; the message names the fix."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks, tests)
    # vLLM's sampling extensions, the same meaning in both engines (0 / 1.0 / empty: off).
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS and stop_token_ids are suppressed until this many tokens exist
    stop_token_ids: tuple[int, ...] = ()  # end like EOS (scored and counted, no text), even with ignore_eos
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's and the k most likely
    constraint: JsonConstraint | None = None
    # Steering at the monitored layer: emotion -> strength as a fraction of the typical residual norm there.
    # Scores are read before the addition, so they show how the model's own state responds to it.
    steer: Mapping[str, float] = field(default_factory=dict)
    # Steering that starts where an alert rule with action "steer" fires (limbic.monitors.mitigation).
    trigger: SteerTrigger | None = None


@dataclass
class Step:
    """What one engine step produced for one request.

    ``scores`` covers tokens ``score_start .. score_start + len`` of ``phase``: the prompt, then generated
    tokens. A generated token has a residual only once it is fed back in; engines run that forward before
    releasing the token (one extra forward after the last), so every returned token is scored.
    """

    text: str = ""
    token_ids: Sequence[int] = ()
    scores: ScoredRows | None = None
    phase: Phase = "generation"
    score_start: int = 0
    finish_reason: FinishReason | None = None
    logprobs: Sequence[TokenLogprob] | None = None  # one per token in ``token_ids`` when asked for


class Engine(Protocol):
    kind: str  # "vllm" or "transformers", for /healthz and logs
    model_name: str
    identity: ModelIdentity
    vectors: EmotionVectors
    context_length: int
    tokenizer: Any  # the model's Hugging Face tokenizer: chat templates, token texts, vocabulary size

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Step]: ...

    async def score(self, token_ids: list[int]) -> ScoredRows: ...

    def scoring_seconds(self) -> float: ...

    def forward_seconds(self) -> float: ...

    def recomputed_tokens(self) -> int:
        """Positions scored a second time because the engine recomputed them (vLLM preemption)."""
        return 0

    def prompt_tokens_cached(self) -> int:
        """Prompt positions served from the engine's prefix cache, their scores from limbic's prompt cache."""
        return 0

    def prompt_tokens_rescored(self) -> int:
        """Prompt positions the engine served from its cache but limbic's prompt cache had let go: scored again."""
        return 0

    async def readiness(self) -> dict[str, str]:
        """Each part the engine needs to serve (engine, score channel) -> "ok" or why it cannot."""
        ...

    async def start(self) -> None:
        """Called once inside the serving event loop, before the first request."""

    async def close(self) -> None: ...
