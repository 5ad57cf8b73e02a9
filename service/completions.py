"""Chat and text completions, streamed or not, with limbic's emotion results in an extension object.

Responses keep OpenAI's shape; additions live under ``limbic`` (which the openai client exposes through
``model_extra``): summaries of the prompt's and the generation's scores, the alerts raised, and, when the
request asks via ``extra_body={"limbic": {"token_scores": true}}``, every token's scores. A request with
``n`` choices runs ``n`` generations, each monitored on its own: every choice carries its own ``limbic``
object when n > 1, and each alert names its choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jinja2
from limbic.monitors.alerting.monitor import Monitor, RequestMonitor
from limbic.monitors.alerting.rules import AlertRule, RuleChangeError, tightened
from limbic.monitors.channel import Channel
from limbic.monitors.engine import Engine, JsonConstraint, SamplingParams, Step, TokenLogprob
from limbic.monitors.hf.constrained import check_json_schema
from limbic.monitors.mitigation import SteerTrigger
from limbic.service.chat_templates import ChatRenderer, TemplateError
from limbic.service.drain import Drain, ShuttingDown
from limbic.service.errors import APIError
from limbic.service.protocol import ChatCompletionRequest, CompletionRequest, LimbicOptions
from limbic.service.tools import ChatOutput, chat_output

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """One of the request's n generations: its sampling, its monitor, its output handling and results."""

    index: int
    params: SamplingParams
    monitor: RequestMonitor
    output: ChatOutput
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)  # per-token scores, when the request asks for them
    finish: str | None = None
    actions: list[dict] = field(default_factory=list)  # what limbic did on this choice's alerts
    called_tools: bool = False  # a tool-call delta was streamed
    logprob_chars: int = 0  # characters of token text whose log-probabilities were streamed

    def finish_reason(self, message: dict | None = None) -> str | None:
        called = self.called_tools if message is None else bool(message.get("tool_calls"))
        return "tool_calls" if called and self.finish == "stop" else self.finish


class _Format:
    """What differs between chat and text completions: object names, and choice and logprob shapes."""

    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def choice(self, c: Choice, logprobs: dict | None) -> dict:
        message = c.output.message("".join(c.text))
        return {"index": c.index, "message": message, "finish_reason": c.finish_reason(message), "logprobs": logprobs}

    def chunk_choice(self, index: int, delta: dict, finish: str | None, logprobs: dict | None) -> dict:
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}

    def logprobs(self, entries: Sequence[TokenLogprob], token_text: Any, offset: int = 0) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}


class _TextFormat(_Format):
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def choice(self, c: Choice, logprobs: dict | None) -> dict:
        return {"index": c.index, "text": "".join(c.text), "finish_reason": c.finish, "logprobs": logprobs}

    def chunk_choice(self, index: int, delta: dict, finish: str | None, logprobs: dict | None) -> dict:
        return {"index": index, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": logprobs}

    def logprobs(self, entries: Sequence[TokenLogprob], token_text: Any, offset: int = 0) -> dict:
        tokens = [token_text(e.token_id) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }


CHAT = _Format()
TEXT = _TextFormat()


@dataclass
class Completion:
    """One validated request, ready to run."""

    engine: Engine
    fmt: _Format
    model: str
    prompt_ids: list[int]
    request: ChatCompletionRequest | CompletionRequest
    choices: list[Choice]
    steer: dict[str, float] = field(default_factory=dict)
    template: str | None = None  # which chat template rendered the prompt (chat only)
    id: str = ""
    conversation_id: str | None = None  # links this request to the turns before it
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_aborted: bool = False  # a prompt alert's action ended every choice
    drain: Drain | None = None  # the server's shutdown clock: ends this generation when it runs out

    @property
    def options(self) -> LimbicOptions:
        return self.request.limbic

    def base(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        n, generated = len(self.prompt_ids), sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": n, "completion_tokens": generated, "total_tokens": n + generated}

    def extension(self, choice: Choice) -> dict:
        """limbic's results for one choice (the prompt is scored once, by choice 0's generation)."""
        extension: dict[str, Any] = {
            "layer": self.engine.vectors.manifest.layer,
            "prompt": self.choices[0].monitor.summary("prompt"),
            "generation": choice.monitor.summary("generation"),
            "alerts": choice.monitor.alerts,
            "actions": choice.actions,
        }
        if self.conversation_id is not None:
            extension["conversation_id"] = self.conversation_id
        if len(self.choices) > 1:
            extension["choice"] = choice.index
        if self.steer:
            extension["steer"] = self.steer
        if self.template:
            extension["chat_template"] = self.template
        return extension

    def token_text(self, token_id: int) -> str:
        return self.engine.decode([token_id])

    def logprobs(self, entries: Sequence[TokenLogprob], offset: int = 0) -> dict | None:
        """The format's log-probabilities of ``entries``; ``offset``: characters of token text before them
        (text completions' ``text_offset`` runs on across a stream's chunks)."""
        if self.request.logprobs_count is None:
            return None
        return self.fmt.logprobs(entries, self.token_text, offset)

    @property
    def monitor(self) -> Monitor:
        return self.choices[0].monitor.monitor

    async def _observe(self, choice: Choice, step: Step) -> tuple[Step, list[dict]]:
        """Monitors one step; returns it (ended with ``content_filter`` if an alert's action aborts the
        generation) and the alert events it raised."""
        events: list[dict] = []
        if self.prompt_aborted and step.phase == "generation" and choice.index > 0:
            # Choice 0 found an abort in the prompt after this choice had started: none of its text goes out.
            step = replace(step, text="", token_ids=(), scores=None, logprobs=None)
        elif step.phase == "prompt" and choice.index > 0:
            pass  # every choice's engine request scores the prompt; choice 0 reports it
        else:
            events = await choice.monitor.observe(step, self.prompt_ids)
        choice.actions += [_action(event) for event in events if event["action"] != "observe"]
        aborts = [event for event in events if event["action"] == "abort"]
        if step.phase == "prompt" and aborts:
            self.prompt_aborted = True
        if aborts and step.phase == "generation":
            step = self._cut(choice, step, min(event["token_index"] for event in aborts))
        if aborts or self.prompt_aborted:
            step = replace(step, finish_reason="content_filter")
        if step.phase == "generation":
            choice.token_ids += step.token_ids
            choice.logprobs += step.logprobs or ()
        choice.finish = step.finish_reason or choice.finish
        if self.options.token_scores and not self.request.stream:  # a stream sends them step by step instead
            choice.scores += self.token_scores(choice, step)
        return step, events

    def _cut(self, choice: Choice, step: Step, last: int) -> Step:
        """The step up to generated token ``last``: under load vLLM hands over several tokens at once, and
        nothing after an abort's crossing token may reach the client."""
        keep = last - step.score_start + 1
        if keep >= len(step.token_ids):
            return step
        before = self.engine.decode(choice.token_ids)
        text = self.engine.decode([*choice.token_ids, *step.token_ids[:keep]])[len(before) :]
        scores = step.scores
        if scores is not None:
            scores = replace(scores, z=scores.z[:keep], norms=scores.norms[:keep])
        logprobs = None if step.logprobs is None else step.logprobs[:keep]
        return replace(step, text=text, token_ids=step.token_ids[:keep], scores=scores, logprobs=logprobs)

    def token_scores(self, choice: Choice, step: Step) -> list[dict]:
        if step.phase == "prompt" and choice.index > 0:
            return []  # choice 0 reports the prompt
        return choice.monitor.token_scores(step, self.options.emotions, self.token_text)

    async def steps(self) -> AsyncIterator[tuple[Choice, Step, list[dict]]]:
        """Every choice's engine steps, monitored as they are produced rather than as the client reads them,
        with the alert events each raised.

        A task per choice runs generation and monitoring, so a slow SSE reader delays neither alerts nor
        metrics; leaving this generator (a client disconnect) cancels the tasks, which aborts generation.
        When all choices end, review items and the conversation's turn are recorded.
        """
        channel: Channel[tuple[Choice, Step, list[dict]]] = Channel()
        running = len(self.choices)

        async def monitored(choice: Choice) -> None:
            nonlocal running
            try:
                # aclosing: a cancelled task ends (and vLLM aborts) the engine's request now, not at GC.
                async with contextlib.aclosing(self.engine.generate(self.prompt_ids, choice.params)) as steps:
                    async for step in steps:
                        observed, events = await self._observe(choice, step)
                        channel.put((choice, observed, events))
                        if observed.finish_reason == "content_filter":
                            break  # an alert's action ended this generation: leaving aborts the engine's request
            except Exception as exc:
                channel.fail(exc)
            finally:
                running -= 1
                if not running:
                    channel.close()

        tasks = [asyncio.create_task(monitored(choice)) for choice in self.choices]
        try:
            with self.drain.watching(channel) if self.drain else contextlib.nullcontext():
                async for item in channel:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            # Created before any await: a stream whose client left is cancelled again at every await here (an
            # anyio cancel scope), and must still leave its review items and its turn behind. A slow Redis
            # holds the answer FOLLOW_UP_WAIT_S at most; the rest finishes in the background.
            follow_up = asyncio.ensure_future(self._finish(tasks))
            _FOLLOW_UPS.add(follow_up)
            follow_up.add_done_callback(_FOLLOW_UPS.discard)
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(follow_up), FOLLOW_UP_WAIT_S)

    async def _finish(self, tasks: list[asyncio.Task]) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)  # their engine requests are aborted by now
        await self._follow_up()

    async def _follow_up(self) -> None:
        monitor = self.monitor
        for choice in self.choices:
            if any(event["action"] == "review" for event in choice.monitor.alerts):
                try:
                    await monitor.queue_review(self._review_fields(choice))
                except Exception:
                    log.exception("request %s: the review queue failed to store an item", self.id)
        if self.conversation_id is not None:
            try:
                await monitor.record_turn(self.conversation_id, self._turn())
            except Exception:
                log.exception("request %s: the conversation store failed to record a turn", self.id)

    def _review_fields(self, choice: Choice) -> dict:
        monitor = self.monitor
        fields = {
            "request_id": self.id,
            "choice": choice.index,
            "conversation_id": self.conversation_id,
            "alerts": ([] if choice.index == 0 else self.choices[0].monitor.alerts) + choice.monitor.alerts,
            "actions": choice.actions,
            "prompt": monitor.summaries(self.choices[0].monitor, "prompt"),
            "generation": monitor.summaries(choice.monitor, "generation"),
            "finish_reason": choice.finish_reason(),
            "tokens": {"prompt": len(self.prompt_ids), "generation": len(choice.token_ids)},
        }
        if monitor.review_include_text:  # the operator's opt-in
            fields["text"] = {
                "prompt": self.engine.decode(self.prompt_ids),
                "completion": self.engine.decode(choice.token_ids),
            }
        return fields

    def _turn(self) -> dict:
        first = self.choices[0]
        alerts = [alert for choice in self.choices for alert in choice.monitor.alerts]
        return {
            "request_id": self.id,
            "model": self.model,
            "prompt": self.monitor.summaries(first.monitor, "prompt"),
            "generation": self.monitor.summaries(first.monitor, "generation"),
            "alerts": [{k: a.get(k) for k in TURN_ALERT_FIELDS} for a in alerts],
            "finish_reason": first.finish_reason(),
        }


FOLLOW_UP_WAIT_S = 0.25
_FOLLOW_UPS: set[asyncio.Future] = set()  # running follow-ups, referenced until done (asyncio keeps none)


async def finish_follow_ups(timeout: float) -> None:
    """Waits (a bounded time) for review items and turns still being recorded: at shutdown, before the stores
    close."""
    if _FOLLOW_UPS:
        await asyncio.wait(set(_FOLLOW_UPS), timeout=timeout)


TURN_ALERT_FIELDS = ("id", "emotion", "severity", "phase", "action", "score", "choice", "token_index")


def _action(event: dict) -> dict:
    return {
        "action": event["action"],
        "alert_id": event["id"],
        "emotion": event["emotion"],
        "severity": event["severity"],
        "phase": event["phase"],
        "token_index": event["token_index"],
    }


def _check_token_ids(engine: Engine, fields: Mapping[str, list[int]]) -> None:
    vocabulary = len(engine.tokenizer)
    for param, ids in fields.items():
        bad = [i for i in ids if not 0 <= i < vocabulary]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary (0..{vocabulary - 1})", param=param)


def _check_constraint(request: ChatCompletionRequest | CompletionRequest, constraint: JsonConstraint) -> None:
    """The grammar generation will run under: enforceable, and compatible with the other fields."""
    param = "tools" if isinstance(request, ChatCompletionRequest) and request.tools_active else "response_format"
    if request.min_tokens:  # a finished grammar allows only EOS, which min_tokens forbids
        raise APIError(400, f"min_tokens cannot be combined with constrained output ({param})", param="min_tokens")
    try:
        check_json_schema(dict(constraint.schema))
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from exc


def _chat_prompt(renderer: ChatRenderer, request: ChatCompletionRequest) -> tuple[list[int], str]:
    tools = [t.model_dump(exclude_none=True) for t in request.tools or ()] if request.tools_active else None
    try:
        return renderer.render([m.for_template() for m in request.messages], tools)
    except (TemplateError, jinja2.TemplateError) as exc:  # the model's own template may raise_exception
        raise APIError(400, str(exc), param="tools" if tools else "messages") from exc


def prepare(
    engine: Engine,
    monitor: Monitor,
    renderer: ChatRenderer,
    request: ChatCompletionRequest | CompletionRequest,
    served_names: list[str],
    steer_defaults: Mapping[str, float] | None = None,
    allow_looser_rules: bool = False,
    conversation_id: str | None = None,
) -> Completion:
    if request.model not in served_names:
        raise APIError(404, f"The model `{request.model}` does not exist.", param="model", code="model_not_found")
    for param, named in (("limbic.emotions", request.limbic.emotions or ()), ("limbic.steer", request.limbic.steer)):
        unknown = sorted(set(named) - set(engine.vectors.emotions))
        if unknown:
            raise APIError(400, f"unknown emotions {unknown}", param=param, code="invalid_emotion")
    _check_token_ids(engine, request.token_id_fields)
    rules = request_rules(monitor, request.limbic.rules, allow_looser_rules)
    trigger = SteerTrigger.from_rules(rules, monitor.sink_norm)
    template = None
    if isinstance(request, ChatCompletionRequest):
        fmt = CHAT
        prompt_ids, template = _chat_prompt(renderer, request)
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
    max_tokens = wanted or limit - len(prompt_ids)
    if request.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({request.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
    request_id = f"{fmt.id_prefix}-{uuid.uuid4().hex}"
    steer = {**(steer_defaults or {}), **request.limbic.steer}
    choices = []
    for index in range(request.n):
        try:
            output = (
                chat_output(request, renderer.tokenizer, renderer.tool_call_parser)
                if isinstance(request, ChatCompletionRequest)
                else ChatOutput()
            )
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice") from exc
        constraint = output.constraint or request.constraint()
        if index == 0 and constraint is not None:
            _check_constraint(request, constraint)
        params = replace(request.sampling(max_tokens, steer, constraint, seed_offset=index), trigger=trigger)
        choices.append(Choice(index, params, monitor.request(request_id, engine.decode, index, rules), output))
    return Completion(
        engine, fmt, request.model, prompt_ids, request, choices, steer, template, request_id, conversation_id
    )


def request_rules(
    monitor: Monitor, changes: Mapping[str, Mapping[str, Any]], allow_looser: bool
) -> dict[str, AlertRule]:
    """The operator's alert rules with the request's ``limbic.rules`` merged in; a 400 naming the field if
    one is invalid, names an unknown emotion, or loosens a rule the operator set (unless allowed)."""
    if not changes:
        return dict(monitor.rules)
    for emotion, change in changes.items():
        steer = change.get("steer")
        unknown = sorted(({emotion} | set(steer if isinstance(steer, dict) else ())) - set(monitor.emotions))
        if unknown:
            raise APIError(400, f"unknown emotions {unknown}", param=f"limbic.rules.{emotion}", code="invalid_emotion")
    try:
        return tightened(monitor.rules, changes, allow_looser)
    except RuleChangeError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc


async def complete(c: Completion) -> dict:
    try:
        async for choice, step, _ in c.steps():
            choice.text.append(step.text)
    except ShuttingDown as exc:
        raise APIError(503, str(exc), type="server_error", code="shutting_down") from exc
    first = c.choices[0]
    extension = c.extension(first)
    if len(c.choices) > 1:
        extension["alerts"] = [alert for choice in c.choices for alert in choice.monitor.alerts]
    if c.options.token_scores:
        extension["tokens"] = first.scores
    rendered = []
    for choice in c.choices:
        item = c.fmt.choice(choice, c.logprobs(choice.logprobs))
        if len(c.choices) > 1:
            item["limbic"] = c.extension(choice) | ({"tokens": choice.scores} if c.options.token_scores else {})
        rendered.append(item)
    return c.base(c.fmt.object_name) | {"choices": rendered, "usage": c.usage(), "limbic": extension}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def chunks(c: Completion) -> AsyncIterator[dict]:
    """The stream as chunk dicts: each choice's deltas as they are scored, then usage if asked for."""
    started: set[int] = set()
    try:
        async for choice, step, events in c.steps():
            if step.phase == "prompt" and choice.index > 0 and step.finish_reason is None:
                continue
            deltas = choice.output.push(step.text, step.token_ids)
            if step.finish_reason is not None:
                deltas += choice.output.finish()
            choice.called_tools |= any("tool_calls" in d for d in deltas)
            tokens = c.token_scores(choice, step) if c.options.token_scores else []
            entries = step.logprobs or ()
            if not deltas and (tokens or entries or events or step.finish_reason or choice.index not in started):
                deltas = [{}]
            for n, delta in enumerate(deltas):
                last = n == len(deltas) - 1
                if choice.index not in started and c.fmt is CHAT:
                    delta = {"role": "assistant"} | (delta or {"content": ""})
                started.add(choice.index)
                finish = choice.finish_reason() if last and step.finish_reason else None
                logprobs = c.logprobs(entries, choice.logprob_chars) if last and entries else None
                if logprobs is not None:
                    choice.logprob_chars += sum(len(c.token_text(e.token_id)) for e in entries)
                rendered = c.fmt.chunk_choice(choice.index, delta, finish, logprobs)
                chunk = c.base(c.fmt.chunk_object) | {"choices": [rendered]}
                extension: dict[str, Any] = {"tokens": tokens} if tokens and last else {}
                if events and last:  # as they happen: a client can react before the reply ends
                    extension["alerts"] = events
                if finish is not None:
                    extension |= c.extension(choice)
                if extension:
                    chunk["limbic"] = extension
                yield chunk
        if c.request.include_usage:
            yield c.base(c.fmt.chunk_object) | {"choices": [], "usage": c.usage()}
    except ShuttingDown as exc:
        yield {"error": {"message": str(exc), "type": "server_error", "param": None, "code": "shutting_down"}}
    except Exception as exc:  # the status line is gone; report in-band, as OpenAI's API does
        yield {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": None}}


async def stream(c: Completion) -> AsyncIterator[str]:
    async for chunk in chunks(c):
        yield sse(chunk)
        if "error" in chunk:
            return  # a failed stream ends with its error event, as OpenAI's do: no [DONE]
    yield "data: [DONE]\n\n"
