"""Alert actions without a server: rule actions, request rules that may only tighten, and the steering
schedule both engines run (from the crossing row on, recomputation-safe)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from limbic.monitors.alerting.rules import AlertRule, RuleChangeError, tightened
from limbic.monitors.engine import SamplingParams
from limbic.monitors.hf.engine import TransformersEngine
from limbic.monitors.mitigation import SteeringSchedule, SteerTrigger
from limbic.service.app import conversation_id
from limbic.service.config import Settings
from limbic.service.errors import APIError
from limbic.service.protocol import ChatCompletionRequest
from pydantic import ValidationError
from starlette.requests import Request

INDEX = {"desperate": 0, "calm": 1}
OPERATOR = {"desperate": AlertRule(warning=2.0, critical=3.0, min_tokens=3, action={"critical": "review"})}


def test_actions_per_severity_and_steer_needs_a_map():
    rule = AlertRule(warning=2, critical=3, action={"warning": "steer", "critical": "abort"}, steer={"calm": 0.3})
    assert (rule.action_for("warning"), rule.action_for("critical")) == ("steer", "abort")
    assert AlertRule(warning=2).action_for("critical") == "observe"
    with pytest.raises(ValidationError, match="steer"):
        AlertRule(warning=2, action="steer")
    with pytest.raises(ValidationError):
        AlertRule(warning=2, action="explode")
    with pytest.raises(ValidationError):
        AlertRule(warning=2, steer={"calm": 5.0})  # beyond the steering limit


def test_requests_may_tighten_rules_and_add_their_own():
    merged = tightened(OPERATOR, {"desperate": {"warning": 1.0, "action": "abort"}, "calm": {"warning": 1.0}})
    assert merged["desperate"].warning == 1.0 and merged["desperate"].critical == 3.0
    assert merged["desperate"].action_for("critical") == "abort"
    assert merged["calm"].warning == 1.0
    assert OPERATOR["desperate"].warning == 2.0  # the operator's rule is not touched


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"warning": 2.5}, "limbic.rules.desperate.warning"),
        ({"critical": None}, "limbic.rules.desperate.critical"),
        ({"min_tokens": 5}, "limbic.rules.desperate.min_tokens"),
        ({"action": "observe"}, "limbic.rules.desperate.action"),  # critical was review
        ({"min_tokens": 0}, "limbic.rules.desperate.min_tokens"),  # invalid, not only looser
        ({"colour": "red"}, "limbic.rules.desperate.colour"),
        ({"critical": float("nan")}, "limbic.rules.desperate.critical"),  # NaN never fires
        ({"warning": float("-inf"), "critical": float("inf")}, "limbic.rules.desperate.warning"),
    ],
)
def test_a_request_cannot_loosen_or_break_a_rule(change, param):
    with pytest.raises(RuleChangeError) as raised:
        tightened(OPERATOR, {"desperate": change})
    assert raised.value.param == param


def test_the_operator_can_let_requests_loosen_rules():
    assert tightened(OPERATOR, {"desperate": {"warning": 9.0, "critical": 10.0}}, allow_looser=True)[
        "desperate"
    ].warning == (9.0)


def test_a_request_cannot_replace_the_operators_steering():
    operator = {"desperate": AlertRule(warning=2, action="steer", steer={"calm": 0.2})}
    with pytest.raises(RuleChangeError, match="steer"):
        tightened(operator, {"desperate": {"steer": {"calm": -1.0}}})
    assert tightened(operator, {"desperate": {"action": "abort"}})["desperate"].action_for("warning") == "abort"


def schedule(rules: dict[str, AlertRule], prompt_length: int) -> SteeringSchedule:
    trigger = SteerTrigger.from_rules(rules, sink_norm=100.0)
    assert trigger is not None
    return SteeringSchedule(trigger, INDEX, prompt_length, lambda strengths: torch.full((4,), strengths["calm"]))


def rows(desperate: list[float]) -> tuple[np.ndarray, np.ndarray]:
    z = np.zeros((len(desperate), 2), np.float32)
    z[:, 0] = desperate
    return z, np.ones(len(desperate), np.float32)


def test_steering_starts_at_the_row_that_completes_the_crossing():
    rule = AlertRule(warning=2.0, min_tokens=2, action="steer", steer={"calm": 0.5})
    s = schedule({"desperate": rule}, prompt_length=3)
    s.observe(*rows([0, 0, 0]), 0)  # the prompt: quiet
    assert s.addition(0, 3) is None
    s.observe(*rows([2.5, 0, 2.5, 2.5, 0]), 3)  # generation rows 0..4: the run completes at generation 3
    per_row = s.addition(3, 5)
    assert per_row.shape == (5, 4)
    assert per_row[:, 0].tolist() == [0, 0, 0, 0.5, 0.5]
    assert s.addition(8, 1).tolist() == [0.5] * 4  # every later row
    s.observe(*rows([0, 0, 0, 0]), 3)  # a recomputation of rows 3..6 changes nothing
    assert s.addition(3, 5)[:, 0].tolist() == [0, 0, 0, 0.5, 0.5]


def test_a_prompt_crossing_steers_from_its_row_and_rules_add_up():
    rules = {
        "desperate": AlertRule(warning=2.0, min_tokens=1, action="steer", steer={"calm": 0.5}),
        "calm": AlertRule(warning=-1.0, min_tokens=1, action={"critical": "steer"}, critical=9, steer={"calm": 1}),
    }
    s = schedule(rules, prompt_length=4)
    s.observe(*rows([0, 3.0, 0, 0]), 0)
    assert s.addition(0, 4)[:, 0].tolist() == [0, 0.5, 0.5, 0.5]
    z, norms = rows([0])
    z[0, 1] = 10  # calm's critical level: its steering adds to desperate's
    s.observe(z, norms, 4)
    assert s.addition(5, 1).tolist() == [1.5] * 4


def test_sink_rows_never_complete_a_crossing():
    rule = AlertRule(warning=2.0, min_tokens=1, action="steer", steer={"calm": 0.5})
    s = schedule({"desperate": rule}, prompt_length=2)
    z, norms = rows([50.0, 0])
    norms[0] = 1e4  # the attention sink's norm
    s.observe(z, norms, 0)
    assert not s.active


# --- the transformers engine, on a tiny random model ----------------------------------------------------
def run(engine: TransformersEngine, **params) -> list:
    prompt = engine.encode("Go")
    base = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}

    async def steps():
        return [s async for s in engine.generate(prompt, SamplingParams(**(base | params)))]

    return asyncio.run(steps())


def generation(steps: list) -> tuple[list[int], list[float], np.ndarray]:
    generated = [s for s in steps if s.phase == "generation"]
    tokens = [t for s in generated for t in s.token_ids]
    logprobs = [lp.logprob for s in generated for lp in s.logprobs]
    return tokens, logprobs, np.concatenate([s.scores.z for s in generated])


def trigger(warning: float, steer: dict[str, float], emotion: str = "calm") -> SteerTrigger:
    rule = AlertRule(warning=warning, min_tokens=1, action="steer", steer=steer)
    return SteerTrigger.from_rules({emotion: rule}, sink_norm=1e9)


STEER = {"desperate": 2.0}


def test_engine_steers_from_the_crossing_row_on(engine):
    plain = run(engine)
    tokens, logprobs, z = generation(plain)
    # A trigger that fires on the first prompt row equals steering every row; one that never fires, none.
    assert generation(run(engine, trigger=trigger(-1e9, STEER)))[0] == generation(run(engine, steer=STEER))[0]
    assert generation(run(engine, trigger=trigger(1e9, STEER)))[1] == logprobs
    # Mid-generation: the first generated row whose score beats every earlier row (prompt included).
    records = []
    for emotion, column in INDEX.items():
        prompt_peak = max(s.scores.z[:, column].max() for s in plain if s.phase == "prompt")
        records += [
            (g, emotion, column) for g in range(1, len(z) - 1) if z[g, column] > max(prompt_peak, *z[:g, column])
        ]
    assert records, "the random model's scores set no record in the generation"
    g, emotion, column = min(records)
    steered = run(engine, trigger=trigger(float(z[g, column]), STEER, emotion))
    steered_tokens, steered_logprobs, _ = generation(steered)
    # Tokens up to g come from rows before the crossing; token g + 1 is the first drawn from a steered row.
    assert steered_tokens[: g + 1] == tokens[: g + 1]
    assert steered_logprobs[: g + 1] == logprobs[: g + 1]
    assert steered_logprobs[g + 1] != pytest.approx(logprobs[g + 1], abs=1e-6)


# --- where a conversation id comes from -----------------------------------------------------------------
def request_with(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


@pytest.mark.parametrize(
    ("source", "headers", "body", "expected"),
    [
        ("header", {"X-Limbic-Conversation": "c-1"}, {"user": "u-9"}, "c-1"),
        ("header", {}, {"user": "u-9"}, None),
        ("user", {"X-Limbic-Conversation": "c-1"}, {"user": "u-9"}, "u-9"),
        ("metadata", {}, {"metadata": {"conversation_id": "m-3", "other": "x"}}, "m-3"),
        ("metadata", {}, {"metadata": {"other": "x"}}, None),
    ],
)
def test_the_operator_chooses_where_conversation_ids_come_from(source, headers, body, expected):
    settings = Settings(conversation_source=source)
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]} | body)
    assert conversation_id(settings, request_with(headers), chat) == expected


def test_a_conversation_id_must_be_short_and_printable():
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    for bad in ("x" * 257, "a\x00b"):
        with pytest.raises(APIError) as raised:
            conversation_id(Settings(), request_with({"X-Limbic-Conversation": bad}), chat)
        assert raised.value.param == "X-Limbic-Conversation"
