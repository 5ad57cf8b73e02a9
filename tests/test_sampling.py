"""The transformers engine's sampling controls and constrained decoding, on a tiny random Llama.

A random model writes noise, so whatever a constraint or a control guarantees shows plainly: JSON that
validates comes from the grammar alone, a forced token from the logit bias alone.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from limbic.monitors.engine import JsonConstraint, SamplingParams
from limbic.monitors.hf.engine import TransformersEngine

EOS = 2
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


def generate(engine: TransformersEngine, **params) -> list:
    prompt = engine.encode("Plan a trip")

    async def run():
        return [s async for s in engine.generate(prompt, SamplingParams(**params)) if s.phase == "generation"]

    return asyncio.run(run())


def tokens_of(steps) -> list[int]:
    return [t for s in steps for t in s.token_ids]


def test_json_schema_constraint_makes_a_random_model_write_valid_json(engine):
    for seed in range(3):
        steps = generate(engine, max_tokens=60, temperature=1.0, seed=seed, constraint=JsonConstraint(SCHEMA))
        text = "".join(s.text for s in steps)
        assert steps[-1].finish_reason == "stop", text  # the grammar ended it (EOS), not max_tokens
        jsonschema.validate(json.loads(text), SCHEMA)
        assert " " not in text.replace("Paris", "").replace("Tokyo", "")  # compact, like vLLM's


def test_json_object_constraint_without_schema(engine):
    steps = generate(engine, max_tokens=80, temperature=0.0, constraint=JsonConstraint())
    text = "".join(s.text for s in steps)
    assert text.startswith("{") and "\n" not in text  # an object, compact
    if steps[-1].finish_reason == "stop":  # a random model may also nest until max_tokens
        assert isinstance(json.loads(text), dict)


def test_logit_bias_forces_a_token_and_min_tokens_holds_off_eos(engine):
    steps = generate(engine, max_tokens=8, temperature=1.0, seed=0, logit_bias={EOS: 100.0}, min_tokens=3)
    tokens = tokens_of(steps)
    assert len(tokens) == 4 and tokens[-1] == EOS and EOS not in tokens[:3]
    assert steps[-1].finish_reason == "stop"


def test_stop_token_ids_end_generation_even_with_ignore_eos(engine):
    forced = 1000
    steps = generate(
        engine, max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias={forced: 100.0}, stop_token_ids=(forced,)
    )
    assert tokens_of(steps) == [forced] and steps[-1].finish_reason == "stop"


def test_logprobs_belong_to_the_returned_tokens(engine):
    steps = generate(engine, max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    entries = [lp for s in steps for lp in s.logprobs]
    assert [e.token_id for e in entries] == tokens_of(steps)
    for entry in entries:
        assert len(entry.top) == 3 and entry.top[0][0] == entry.token_id  # greedy: the sampled token is the best
        assert entry.logprob == pytest.approx(entry.top[0][1]) and entry.logprob <= 0
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)


def test_seed_repeats_and_top_k_one_is_greedy(engine):
    first = tokens_of(generate(engine, max_tokens=6, temperature=1.0, seed=7, ignore_eos=True))
    again = tokens_of(generate(engine, max_tokens=6, temperature=1.0, seed=7, ignore_eos=True))
    greedy = tokens_of(generate(engine, max_tokens=6, temperature=0.0, ignore_eos=True))
    top1 = tokens_of(generate(engine, max_tokens=6, temperature=1.0, seed=3, top_k=1, ignore_eos=True))
    assert first == again and top1 == greedy


def test_repetition_penalty_changes_the_output(engine):
    plain = tokens_of(generate(engine, max_tokens=12, temperature=0.0, ignore_eos=True))
    penalised = tokens_of(generate(engine, max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.8))
    assert plain != penalised


def test_transformers_engine_serves_forced_tool_calls_n_and_logprobs_through_the_app(engine):
    from fastapi.testclient import TestClient
    from limbic.service.app import create_app
    from limbic.service.config import Settings
    from openai import OpenAI

    tool = {"type": "function", "function": {"name": "plan", "parameters": SCHEMA}}
    with TestClient(create_app(Settings(), engine)) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        response = client.chat.completions.create(
            model=engine.model_name,
            messages=[{"role": "user", "content": "Plan a trip"}],
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": "plan"}},
            n=2,
            temperature=1.0,
            seed=1,
            max_tokens=48,  # the tiny model's context is 256 tokens; the tool prompt takes about 200
            logprobs=True,
        )
    assert len(response.choices) == 2
    for choice in response.choices:
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA)  # a random model, held to the schema
        assert choice.model_extra["limbic"]["choice"] == choice.index and choice.model_extra["limbic"]["generation"]
    assert response.usage.completion_tokens == sum(len(c.logprobs.content) for c in response.choices)
