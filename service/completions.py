"""Chat and text completions, streamed or not, with limbic's emotion results in an extension object.

Responses keep OpenAI's shape; additions live under ``limbic`` (which the openai client exposes through
``model_extra``): summaries of the prompt's and the generation's scores, the alerts raised, and, when the
request asks via ``extra_body={"limbic": {"token_scores": true}}``, every token's scores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from monitors.channel import Channel
from monitors.engine import Engine, Step
from monitors.session import Monitor, RequestMonitor
from service.errors import APIError
from service.protocol import ChatCompletionRequest, CompletionRequest, LimbicOptions


@dataclass
class _Format:
    """The few places where chat and text completions differ."""

    object_name: str
    chunk_object: str
    id_prefix: str

    def choice(self, text: str, finish: str | None) -> dict:
        raise NotImplementedError

    def delta(self, text: str, finish: str | None, first: bool) -> dict:
        raise NotImplementedError


class _ChatFormat(_Format):
    def choice(self, text: str, finish: str | None) -> dict:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }

    def delta(self, text: str, finish: str | None, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}


class _TextFormat(_Format):
    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def delta(self, text: str, finish: str | None, first: bool) -> dict:
        return self.choice(text, finish)


CHAT = _ChatFormat("chat.completion", "chat.completion.chunk", "chatcmpl")
TEXT = _TextFormat("text_completion", "text_completion", "cmpl")


@dataclass
class Completion:
    """One validated request, ready to run."""

    engine: Engine
    monitor: RequestMonitor
    fmt: _Format
    model: str
    prompt_ids: list[int]
    max_tokens: int
    request: ChatCompletionRequest | CompletionRequest
    steer: dict[str, float] = field(default_factory=dict)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def options(self) -> LimbicOptions:
        return self.request.limbic

    def base(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict:
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}

    def extension(self) -> dict:
        extension = {
            "layer": self.engine.vectors.manifest.layer,
            "prompt": self.monitor.summary("prompt"),
            "generation": self.monitor.summary("generation"),
            "alerts": self.monitor.alerts,
        }
        if self.steer:
            extension["steer"] = self.steer
        return extension

    def token_scores(self, step: Step) -> list[dict]:
        return self.monitor.token_scores(step, self.options.emotions) if self.options.token_scores else []

    async def steps(self) -> AsyncIterator[Step]:
        """The engine's steps, monitored as they are produced rather than as the client reads them.

        A separate task runs generation and monitoring, so a slow SSE reader delays neither alerts nor
        metrics; leaving this generator (a client disconnect) cancels the task, which aborts generation.
        """
        channel: Channel[Step] = Channel()

        async def monitored() -> None:
            try:
                params = self.request.sampling(self.max_tokens, self.steer)
                # aclosing: a cancelled task ends (and vLLM aborts) the engine's request now, not at GC.
                async with contextlib.aclosing(self.engine.generate(self.prompt_ids, params)) as steps:
                    async for step in steps:
                        await self.monitor.observe(step, self.prompt_ids)
                        channel.put(step)
            except Exception as exc:
                channel.fail(exc)
            finally:
                channel.close()

        task = asyncio.create_task(monitored())
        try:
            async for step in channel:
                yield step
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def prepare(
    engine: Engine,
    monitor: Monitor,
    request: ChatCompletionRequest | CompletionRequest,
    served_names: list[str],
    steer_defaults: Mapping[str, float] | None = None,
) -> Completion:
    if request.model not in served_names:
        raise APIError(404, f"The model `{request.model}` does not exist.", param="model", code="model_not_found")
    for param, named in (("limbic.emotions", request.limbic.emotions or ()), ("limbic.steer", request.limbic.steer)):
        unknown = sorted(set(named) - set(engine.vectors.emotions))
        if unknown:
            raise APIError(400, f"unknown emotions {unknown}", param=param, code="invalid_emotion")
    if isinstance(request, ChatCompletionRequest):
        fmt, prompt_ids = (
            CHAT,
            engine.chat_prompt_ids([{"role": m.role, "content": m.text()} for m in request.messages]),
        )
    else:
        fmt = TEXT
        prompt_ids = list(request.prompt) if isinstance(request.prompt, list) else engine.encode(request.prompt)
        if not prompt_ids:
            raise APIError(400, "prompt is empty", param="prompt")
    limit = engine.context_length
    wanted = request.requested_max_tokens
    if len(prompt_ids) + (wanted or 1) > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(prompt_ids) + (wanted or 0)} tokens ({len(prompt_ids)} in the prompt, {wanted or 0} in the "
            "completion). Please reduce the length of the prompt or the completion.",
            param="messages" if fmt is CHAT else "prompt",
            code="context_length_exceeded",
        )
    request_id = f"{fmt.id_prefix}-{uuid.uuid4().hex}"
    decode = engine.decode
    return Completion(
        engine=engine,
        monitor=monitor.request(request_id, decode),
        fmt=fmt,
        model=request.model,
        prompt_ids=prompt_ids,
        max_tokens=wanted or limit - len(prompt_ids),
        request=request,
        steer={**(steer_defaults or {}), **request.limbic.steer},
        id=request_id,
    )


async def complete(c: Completion) -> dict:
    text, finish, generated = [], None, 0
    tokens: list[dict] = []
    async for step in c.steps():
        text.append(step.text)
        generated += len(step.token_ids)
        finish = step.finish_reason or finish
        tokens += c.token_scores(step)
    extension = c.extension()
    if c.options.token_scores:
        extension["tokens"] = tokens
    return c.base(c.fmt.object_name) | {
        "choices": [c.fmt.choice("".join(text), finish)],
        "usage": c.usage(generated),
        "limbic": extension,
    }


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def stream(c: Completion) -> AsyncIterator[str]:
    first, generated = True, 0
    try:
        async for step in c.steps():
            generated += len(step.token_ids)
            tokens = c.token_scores(step)
            if step.finish_reason is None and not step.text and not tokens and not first:
                continue
            chunk = c.base(c.fmt.chunk_object) | {"choices": [c.fmt.delta(step.text, step.finish_reason, first)]}
            first = False
            extension = {"tokens": tokens} if tokens else {}
            if step.finish_reason is not None:
                extension |= c.extension()
            if extension:
                chunk["limbic"] = extension
            yield _sse(chunk)
        if c.request.include_usage:
            yield _sse(c.base(c.fmt.chunk_object) | {"choices": [], "usage": c.usage(generated)})
    except Exception as exc:  # the status line is gone; report in-band, as OpenAI's API does
        yield _sse(
            {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": None}}
        )
    yield "data: [DONE]\n\n"
