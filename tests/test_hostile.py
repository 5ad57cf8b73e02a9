"""Hostile input gets a 4xx in OpenAI's error shape, never a 5xx: a table of named cases, then schemathesis
over every operation of the OpenAPI schema (bounded), against the real app on a tiny random model."""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from limbic.service.app import create_app
from limbic.service.config import Settings
from schemathesis import GenerationMode

MODEL = "tiny"
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def http(engine):
    with TestClient(create_app(Settings(max_body_bytes=LIMIT), engine)) as c:
        yield c


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | fields


RAW = {"content-type": "application/json"}
LOOKBEHIND = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}
CASES = [
    ("token ids beyond the vocabulary", "/v1/completions", {"model": MODEL, "prompt": [1_000_000_000]}, 400),
    ("a negative token id", "/v1/completions", {"model": MODEL, "prompt": [-1]}, 400),
    ("a token id past int64", "/v1/completions", {"model": MODEL, "prompt": [1, 2**63]}, 400),
    ("a seed past int64", "/v1/chat/completions", chat(seed=2**64), 400),
    (
        "a lone surrogate",
        "/v1/chat/completions",
        '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
    ),
    ("n of a thousand", "/v1/chat/completions", chat(n=1000), 400),
    ("max_tokens of zero", "/v1/chat/completions", chat(max_tokens=0), 400),
    ("max_tokens past the context", "/v1/chat/completions", chat(max_tokens=10**9), 400),
    ("an unknown field", "/v1/chat/completions", chat(frobnicate=True), 400),
    ("an unknown model", "/v1/chat/completions", chat(model="gpt-7"), 404),
    ("messages that are not a list", "/v1/chat/completions", chat(messages="hi"), 400),
    ("an empty body", "/v1/chat/completions", b"", 400),
    ("a JSON array", "/v1/chat/completions", b"[]", 400),
    ("broken JSON", "/v1/chat/completions", b'{"model": ', 400),
    ("invalid UTF-8", "/v1/chat/completions", b'{"model": "\xff\xfe"}', 400),
    ("JSON nested 10,000 deep", "/v1/chat/completions", b"[" * 10_000 + b"]" * 10_000, 400),
    ("a body over the limit", "/v1/chat/completions", b" " * (LIMIT + 1), 413),
    ("a logit bias key that is not a token id", "/v1/chat/completions", chat(logit_bias={"x": 1}), 400),
    ("an unknown emotion to steer", "/v1/chat/completions", chat(limbic={"steer": {"smug": 0.1}}), 400),
    ("steering past its bound", "/v1/chat/completions", chat(limbic={"steer": {"calm": 50}}), 400),
    ("a request loosening a rule", "/v1/chat/completions", chat(limbic={"rules": {"desperate": {"warning": 99}}}), 400),
    (
        "a schema xgrammar cannot enforce",
        "/v1/chat/completions",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}},
            }
        ),
        400,
    ),
    ("analysis of nothing", "/v1/analyze", {"texts": []}, 400),
    ("a review verdict outside the set", "/v1/reviews/rev_x", {"verdict": "meh"}, 400),
]


@pytest.mark.parametrize(("name", "path", "body", "status"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_by_name_never_a_5xx(http, name, path, body, status):
    if isinstance(body, dict):
        response = http.post(path, json=body)
    else:
        response = http.post(path, content=body.encode() if isinstance(body, str) else body, headers=RAW)
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["message"] and error["type"], name


def test_a_conversation_id_with_control_characters_is_a_400(http):
    response = http.post("/v1/chat/completions", json=chat(), headers={"X-Limbic-Conversation": "a\tb"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "X-Limbic-Conversation"


def test_no_operation_answers_generated_input_with_a_5xx(http):
    """Every operation in the OpenAPI schema, 25 valid and 25 invalid generated requests each (schemathesis,
    derandomised: the same cases every run)."""
    api = schemathesis.openapi.from_asgi("/openapi.json", http.app)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10
    for operation, mode in itertools.product(operations, GenerationMode):  # valid, then invalid input

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy(mode))
        def no_5xx(case) -> None:
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, str(case.body)[:300], response.text[:300])

        try:
            no_5xx()
        except Unsatisfiable:  # an operation without parameters or body: nothing invalid to send
            assert mode is GenerationMode.NEGATIVE, operation
