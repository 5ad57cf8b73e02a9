"""Settings, from the environment (``LIMBIC_*``, plus ``REDIS_URL``) and overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from limbic.monitors.alerting.conversations import TrendRule
from limbic.monitors.alerting.rules import AlertRule
from limbic.monitors.steering import Strength
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # An empty variable counts as unset: compose files pass optional settings through as `${VAR:-}`.
    model_config = SettingsConfigDict(env_prefix="LIMBIC_", extra="ignore", env_ignore_empty=True)

    model: str | None = Field(default=None, description="local HF folder or .gguf; None = the default model")
    vectors: Path | None = Field(default=None, description="vector set folder; None = the bundled set")
    served_model_name: str | None = Field(default=None, description="name clients send as `model`")
    host: str = Field(default="127.0.0.1", description="without API keys, only a loopback address is allowed")
    port: int = Field(default=8000, ge=1, le=65535)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # auto: vLLM where it is installed (continuous batching), else transformers (one request at a time).
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    vllm_enforce_eager: bool = Field(default=False, description="skip torch.compile: fast start, slower serving")
    vllm_kv_cache_gib: float = Field(default=1.0, gt=0, description="CPU: memory for vLLM's KV cache")
    vllm_gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="GPU: the share of the device's memory vLLM may take (weights and KV)"
    )
    vllm_max_model_len: int | None = Field(default=None, ge=16, description="None: the model's context length")
    vllm_max_num_seqs: int = Field(default=64, ge=1, description="requests vLLM batches at once")
    vllm_max_num_batched_tokens: int | None = Field(
        default=None, ge=16, description="tokens per forward pass; longer prompts are prefilled in chunks"
    )
    vllm_tensor_parallel_size: int = Field(default=1, ge=1)
    vllm_prompt_cache_mb: float = Field(
        default=256.0, ge=0, description="scores of prompt blocks vLLM may serve from its prefix cache; 0: off"
    )
    # Chat templates and tools (as vLLM's --chat-template and --tool-call-parser). Default: the model's own
    # template; for tools, limbic's bundled ChatML template with vLLM's `hermes` parser where the model's
    # own template has no tool support.
    chat_template: Path | None = Field(default=None, description="a Jinja chat template file for every chat")
    tool_call_parser: str | None = Field(default=None, description="vLLM's tool parser for tool_choice auto")
    responses_store_capacity: int = Field(default=1000, ge=0, description="Responses API: responses kept")
    responses_store_ttl_s: float = Field(default=3600.0, gt=0, description="Responses API: seconds kept")
    # Steering for every request, e.g. LIMBIC_STEER='{"calm": 0.1}' (a mitigation); requests can add their own.
    steer: dict[str, Strength] = Field(default_factory=dict)

    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("LIMBIC_REDIS_URL", "REDIS_URL"))
    redis_stream: str = "limbic:alerts"
    alert_capacity: int = Field(default=10_000, ge=1, description="events kept in the stream or ring buffer")
    # Events wait in a local file until Redis takes them (survives restarts); past the capacity the oldest go.
    alert_spool_dir: Path | None = Field(default=None, description="None: <cache dir>/spool")
    alert_spool_capacity: int = Field(default=100_000, ge=1, description="undelivered events kept locally")
    # JSON, e.g. LIMBIC_ALERT_RULES='{"desperate": {"warning": 2.5, "critical": 4, "min_tokens": 3}}';
    # it replaces the default rules: desperate and panicked at the vector set's calibrated thresholds.
    alert_rules: dict[str, AlertRule] | None = None
    alert_include_text: bool = Field(default=False, description="opt in: alert events carry the tokens' text")
    # Requests may add or tighten rules (extra_body.limbic.rules); with this, also loosen them.
    allow_request_rules: bool = Field(default=False, description="let requests loosen the operator's alert rules")
    review_capacity: int = Field(default=10_000, ge=1, description="review items kept (oldest dropped first)")
    review_include_text: bool = Field(default=False, description="opt in: review items carry prompt and response")
    # Conversations: where the id comes from (header X-Limbic-Conversation, the request's `user`, or
    # metadata[conversation_metadata_key]), how long turns are kept, and the trend rules over their turns.
    conversation_source: Literal["header", "user", "metadata"] = "header"
    conversation_metadata_key: str = "conversation_id"
    conversation_ttl_s: float = Field(default=7 * 86400.0, gt=0, description="seconds a conversation is kept")
    conversation_max_turns: int = Field(default=200, ge=1, description="turns kept per conversation (newest)")
    # JSON, e.g. LIMBIC_TREND_RULES='{"desperate": {"turns": 3, "rise": 0.5}}'; {} turns trend alerts off.
    trend_rules: dict[str, TrendRule] = Field(default_factory=lambda: {"desperate": TrendRule()})
    headline_emotions: list[str] = Field(
        default_factory=lambda: ["desperate", "panicked", "calm", "afraid"],
        description="emotions summarised in conversation turns and review items (plus every rule's)",
    )
    # Optional: also push each alert event to Alertmanager's API, for paging faster than scrape + rule evaluation.
    alertmanager_url: str | None = Field(default=None, description="e.g. http://alertmanager:9093; None = off")
    alertmanager_resolve_timeout: float = Field(
        default=300.0, gt=0, description="seconds after its last event that a pushed alert resolves"
    )
    alertmanager_timeout: float = Field(default=2.0, gt=0, description="seconds one push may take")
    # Access: bearer keys for inference endpoints and for admin ones (alerts, conversations, reviews), given
    # comma-separated or as files of `sha256:<hex>` digests (`limbic keys hash`). Without any, limbic serves
    # loopback only, unless the operator says --allow-unauthenticated.
    api_keys: str | None = Field(default=None, description="comma-separated keys for inference endpoints")
    admin_keys: str | None = Field(default=None, description="comma-separated keys for every endpoint")
    api_keys_file: Path | None = None
    admin_keys_file: Path | None = None
    protect_metrics: bool = Field(default=False, description="require an admin key for /metrics too")
    allow_unauthenticated: bool = Field(default=False, description="serve a non-loopback host without keys")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="larger request bodies get a 413")
    shutdown_drain_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM: seconds in-flight requests may finish before they are aborted"
    )
    log_level: str = "INFO"
