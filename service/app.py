"""The FastAPI application: OpenAI-compatible endpoints plus metrics, alerts and analysis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from limbic.monitors.alerting.monitor import Monitor
from limbic.monitors.alerting.reviews import AlreadyResolved, ReviewNotFound
from limbic.monitors.engine import Engine
from limbic.service import analysis, completions, errors, responses, runtime, ui
from limbic.service.analysis import TextTooLong
from limbic.service.chat_templates import ChatRenderer
from limbic.service.config import Settings
from limbic.service.drain import Drain
from limbic.service.errors import APIError
from limbic.service.guard import BodyLimit, KeyGuard
from limbic.service.protocol import AnalyzeRequest, ChatCompletionRequest, CompletionRequest, ReviewVerdict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client left before a non-streamed answer was ready; its generation was cancelled."""


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Runs ``work``, cancelling it (which aborts the engine's requests) if the client disconnects first.

    Starlette cancels a streaming response when its client leaves, but not a handler that is still computing
    a whole answer: without this, an abandoned request would generate to the end.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@dataclass
class State:
    settings: Settings
    engine: Engine
    monitor: Monitor
    renderer: ChatRenderer
    response_store: responses.ResponseStore | None
    served_names: list[str]
    started: float


def create_app(settings: Settings, engine: Engine | None = None, close_engine: bool | None = None) -> FastAPI:
    """The app; ``engine`` lets a caller reuse a loaded engine (otherwise the lifespan loads one).

    The engine is closed at shutdown if the app loaded it or ``close_engine`` says so: vLLM's engine
    processes must not outlive the server.
    """
    if close_engine is None:
        close_engine = engine is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        active = engine or await asyncio.to_thread(runtime.load_engine, settings)
        try:
            await active.start()
            sink = await runtime.open_sink(settings)
            monitor = runtime.build_monitor(settings, active, sink)
            renderer = runtime.chat_renderer(settings, active)
            store = runtime.open_response_store(settings)
            app.state.limbic = State(settings, active, monitor, renderer, store, [active.model_name], time.time())
            app.state.drain.loop = asyncio.get_running_loop()
            try:
                yield
            finally:
                await completions.finish_follow_ups(timeout=5.0)  # last review items and turns, then close
                await monitor.close()
                await sink.close()
        finally:
            if close_engine:
                await active.close()

    app = FastAPI(title="limbic", version="0.1.0", lifespan=lifespan)
    app.state.drain = Drain()  # the CLI's server starts its clock on SIGTERM
    errors.install(app)
    ui.mount(app)
    # The last added runs first: keys are checked before any of the body is read.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(KeyGuard, keys=runtime.key_ring(settings))

    @app.exception_handler(RedisError)
    async def _store_down(request: Request, exc: RedisError) -> Response:
        # Alerts, conversations and reviews live in Redis: while it is down or hung, say so (not a 500).
        message = f"the shared store (Redis) is unavailable: {exc.__class__.__name__}; retry shortly"
        return errors.error_response(503, message, type="server_error", code="store_unavailable")

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody is there to read it

    def state(request: Request) -> State:
        return request.app.state.limbic

    def prepare(request: Request, body: ChatCompletionRequest | CompletionRequest) -> completions.Completion:
        s = state(request)
        completion = completions.prepare(
            s.engine,
            s.monitor,
            s.renderer,
            body,
            s.served_names,
            s.settings.steer,
            s.settings.allow_request_rules,
            conversation_id(s.settings, request, body),
        )
        completion.drain = request.app.state.drain
        return completion

    async def _run(request: Request, body: ChatCompletionRequest | CompletionRequest) -> Response:
        completion = prepare(request, body)
        if body.stream:
            return StreamingResponse(
                completions.stream(completion),
                media_type="text/event-stream",
                headers={"X-Request-Id": completion.id, "Cache-Control": "no-cache"},
            )
        result = await unless_disconnected(request, completions.complete(completion))
        return JSONResponse(result, headers={"X-Request-Id": completion.id})

    @app.post("/v1/responses")
    async def create_response(request: Request, body: responses.ResponsesRequest) -> Response:
        """The Responses API, translated to a chat completion and back (limbic.service.responses)."""
        s = state(request)
        try:
            history = await responses.history_for(s.response_store, body)
        except responses.ResponseNotFound as exc:
            raise APIError(404, str(exc), param="previous_response_id", code="response_not_found") from exc
        except responses.StoreUnavailable as exc:
            raise APIError(503, str(exc), type="server_error") from exc
        chat_body = responses.to_chat(body, history)
        if body.stream:
            chat_body |= {"stream": True, "stream_options": {"include_usage": True}}
        try:
            chat = ChatCompletionRequest.model_validate(chat_body)
        except ValidationError as exc:
            message, param = errors.describe(exc.errors()[0])
            raise APIError(400, message, param=param) from exc
        completion = prepare(request, chat)
        response_id, created = responses.new_response_id(), time.time()

        async def remember(response: dict) -> None:
            try:
                await responses.remember(s.response_store, body, history, response)
            except responses.StoreUnavailable:  # the answer stands; only chaining onto it will fail
                log.warning("response %s not stored: the response store is unavailable", response["id"])

        if body.stream:

            async def events() -> AsyncIterator[str]:
                chunks = completions.chunks(completion)
                async for event in responses.stream_events(chunks, body, response_id, created):
                    if event["type"] in ("response.completed", "response.incomplete"):
                        await remember(event["response"])
                    yield responses.sse(event)

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        chat_result = await unless_disconnected(request, completions.complete(completion))
        result = responses.to_response(chat_result, body, response_id, created)
        await remember(result)
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await _run(request, body)

    @app.post("/v1/completions")
    async def text_completions(request: Request, body: CompletionRequest) -> Response:
        return await _run(request, body)

    def model_card(s: State, name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": int(s.started),
            "owned_by": "limbic",
            "max_model_len": s.engine.context_length,
            "limbic": {
                "layer": s.engine.vectors.manifest.layer,
                "emotions": len(s.engine.vectors.emotions),
                "tool_chat_template": s.renderer.tool_template_name,
                "tool_call_parser": s.renderer.tool_call_parser,
            },
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        s = state(request)
        return {"object": "list", "data": [model_card(s, name) for name in s.served_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict:
        s = state(request)
        if model_id not in s.served_names:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return model_card(s, model_id)

    @app.post("/v1/analyze")
    async def analyze(request: Request, body: AnalyzeRequest) -> dict:
        s = state(request)
        if body.model is not None and body.model not in s.served_names:
            raise APIError(404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found")
        results = []
        for n, item in enumerate(body.texts):
            try:
                results.append(await analysis.analyze_item(s.engine, item))
            except (TextTooLong, ValueError) as exc:
                raise APIError(400, f"texts[{n}]: {exc}", param=f"texts.{n}") from exc
        return {"object": "list", "model": s.engine.model_name, "data": results}

    @app.get("/v1/alerts")
    async def alerts(
        request: Request,
        limit: int = Query(default=100, ge=1, le=1000),
        emotion: str | None = None,
        severity: str | None = Query(default=None, pattern="^(warning|critical)$"),
    ) -> dict:
        s = state(request)
        # Filters apply to the newest `alert_capacity` events; fetch enough to fill `limit` after them.
        fetch = limit if emotion is None and severity is None else s.settings.alert_capacity
        events = [
            e
            for e in await s.monitor.sink.recent(fetch)
            if (emotion is None or e["emotion"] == emotion) and (severity is None or e["severity"] == severity)
        ]
        return {"object": "list", "sink": s.monitor.sink.name, "data": events[:limit]}

    @app.get("/v1/conversations")
    async def conversations(
        request: Request, flagged: bool = False, limit: int = Query(default=50, ge=1, le=1000)
    ) -> dict:
        s = state(request)
        data = await s.monitor.conversations.recent(flagged, limit)
        return {"object": "list", "store": s.monitor.conversations.name, "data": data}

    @app.get("/v1/conversations/{conversation_id}")
    async def conversation(request: Request, conversation_id: str) -> dict:
        found = await state(request).monitor.conversations.get(conversation_id)
        if found is None:
            raise APIError(404, f"No conversation `{conversation_id}` (unknown or expired).", param="conversation_id")
        return {"object": "conversation", **found}

    @app.get("/v1/reviews")
    async def reviews(
        request: Request,
        status: Literal["open", "resolved", "all"] = "open",
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict:
        s = state(request)
        return {"object": "list", "queue": s.monitor.reviews.name, "data": await s.monitor.reviews.items(status, limit)}

    @app.get("/v1/reviews/{review_id}")
    async def review(request: Request, review_id: str) -> dict:
        try:
            return await state(request).monitor.reviews.get(review_id)
        except ReviewNotFound as exc:
            raise APIError(404, f"No review `{review_id}`.", param="review_id") from exc

    @app.post("/v1/reviews/{review_id}")
    async def resolve_review(request: Request, review_id: str, body: ReviewVerdict) -> dict:
        try:
            return await state(request).monitor.resolve_review(review_id, body.verdict, body.note)
        except ReviewNotFound as exc:
            raise APIError(404, f"No review `{review_id}`.", param="review_id") from exc
        except AlreadyResolved as exc:
            raise APIError(409, f"Review `{review_id}` is already resolved.", param="review_id") from exc

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        monitor = state(request).monitor
        await monitor.refresh_gauges()
        return Response(generate_latest(monitor.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health(request: Request) -> Response:
        """vLLM's probe (benchmark clients such as guidellm check it): 200 with an empty body once serving,
        503 once the engine has died (as vLLM's own)."""
        engine = (await state(request).engine.readiness())["engine"]
        return Response(status_code=200 if engine == "ok" else 503)

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: 200 when every part can serve, else 503 naming what cannot (liveness is /healthz)."""
        s = state(request)
        checks = await s.engine.readiness()
        try:
            await s.monitor.sink.check()
            checks["alert_sink"] = "ok"
        except Exception as exc:
            checks["alert_sink"] = f"{s.monitor.sink.name} unreachable: {exc!r}"
        spool = getattr(s.monitor.sink, "spool", None)
        if spool is not None:
            full = spool.depth >= spool.capacity
            checks["alert_spool"] = (
                "delivery stopped: events are held, not sent"
                if not spool.delivering
                else f"full ({spool.depth} events held; the oldest are dropped)"
                if full
                else "ok"
            )
        ready = all(value == "ok" for value in checks.values())
        body = {"status": "ready" if ready else "not ready", "engine": s.engine.kind, "checks": checks}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        """Liveness: 503 once the engine has died (a restart is the cure); what else could stop serving is
        /readyz's business."""
        s = state(request)
        engine = (await s.engine.readiness())["engine"]
        body = {
            "status": "ok" if engine == "ok" else f"engine down: {engine}",
            "model": s.engine.model_name,
            "engine": s.engine.kind,
            "fingerprint": s.engine.identity.fingerprint,
            "layer": s.engine.vectors.manifest.layer,
            "emotions": len(s.engine.vectors.emotions),
            "alert_sink": s.monitor.sink.name,
            "uptime_s": round(time.time() - s.started, 1),
        }
        return JSONResponse(body, status_code=200 if engine == "ok" else 503)

    return app


CONVERSATION_HEADER = "X-Limbic-Conversation"


def conversation_id(
    settings: Settings, request: Request, body: ChatCompletionRequest | CompletionRequest
) -> str | None:
    """The request's conversation id, from where the operator chose (LIMBIC_CONVERSATION_SOURCE)."""
    if settings.conversation_source == "header":
        value, param = request.headers.get(CONVERSATION_HEADER), CONVERSATION_HEADER
    elif settings.conversation_source == "user":
        value, param = body.user, "user"
    else:
        key = settings.conversation_metadata_key
        value, param = (body.metadata or {}).get(key), f"metadata.{key}"
    if value is None:
        return None
    if not 1 <= len(value) <= 256 or not value.isprintable():
        raise APIError(400, f"{param}: a conversation id is 1-256 printable characters", param=param)
    return value
