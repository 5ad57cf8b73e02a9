"""The scoring hook against a hand computation from ``output_hidden_states`` on a tiny random Llama."""

from __future__ import annotations

import asyncio

import pytest
import torch
from limbic.monitors.engine import SamplingParams
from limbic.monitors.hf.engine import TransformersEngine
from limbic.monitors.probe import Readout
from tiny import loaded, random_vectors, tiny_llama

LAYER = 2
EMOTIONS = ["desperate", "panicked", "calm", "afraid"]


@pytest.fixture(scope="module")
def engine(default_model_path):
    model = loaded(tiny_llama(), default_model_path)
    engine = TransformersEngine(model, random_vectors(model.identity, LAYER, EMOTIONS))
    yield engine
    asyncio.run(engine.close())


def by_hand(engine: TransformersEngine, token_ids: list[int]) -> torch.Tensor:
    """z-scores from the residual after decoder layer LAYER (hidden_states[LAYER + 1]), computed directly."""
    with torch.no_grad():
        out = engine.loaded.model(torch.tensor([token_ids]), output_hidden_states=True)
    residual = out.hidden_states[LAYER + 1][0]
    calibration = engine.vectors.manifest.calibration
    raw = residual @ engine.vectors.directions.T
    return (raw - torch.tensor(calibration.mean)) / torch.tensor(calibration.std)


def test_readout_is_the_calibrated_projection(engine):
    rows = torch.randn(5, engine.identity.hidden_size)
    c = engine.vectors.manifest.calibration
    expected = (rows @ engine.vectors.directions.T - torch.tensor(c.mean)) / torch.tensor(c.std)
    assert torch.allclose(Readout(engine.vectors)(rows), expected, atol=1e-5)


def test_scoring_text_matches_hidden_states(engine):
    ids = engine.encode("The deadline is tonight and nothing works.")
    scored = asyncio.run(engine.score(ids))
    assert scored.z.shape == (len(ids), len(EMOTIONS))
    assert torch.allclose(torch.from_numpy(scored.z), by_hand(engine, ids), atol=1e-4)


def test_every_prompt_and_generated_token_is_scored_in_place(engine):
    prompt = engine.encode("Tell me about the weather in spring")

    async def run():
        return [s async for s in engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0))]

    steps = asyncio.run(run())
    prompt_step, generated = steps[0], steps[1:]
    assert prompt_step.phase == "prompt" and prompt_step.scores.z.shape[0] == len(prompt)
    tokens = [t for s in generated for t in s.token_ids]
    assert len(tokens) == 12 and generated[-1].finish_reason == "length"
    # One score row per returned token, positioned by score_start, including the last token.
    assert [s.score_start for s in generated] == list(range(12))
    scored = torch.cat([torch.from_numpy(s.scores.z) for s in steps])
    expected = by_hand(engine, prompt + tokens)
    # KV-cached decoding and a single full forward differ only by float rounding.
    assert torch.allclose(scored, expected, atol=1e-3), (scored - expected).abs().max()


def test_greedy_generation_matches_transformers_generate(engine):
    prompt = engine.encode("Once upon a time")

    async def run():
        return [
            t async for s in engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0)) for t in s.token_ids
        ]

    ours = asyncio.run(run())
    with torch.no_grad():
        reference = engine.loaded.model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert ours == reference


def generated_tokens(engine: TransformersEngine, prompt: list[int], **params) -> list:
    async def run():
        return [s async for s in engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, **params))]

    return asyncio.run(run())


def test_steering_changes_generation_but_not_the_monitored_layers_reading(engine):
    prompt = engine.encode("Tell me about the weather in spring")
    plain = generated_tokens(engine, prompt)
    steered = generated_tokens(engine, prompt, steer={"calm": 0.01})
    again = generated_tokens(engine, prompt)
    tokens = [[t for s in run[1:] for t in s.token_ids] for run in (plain, steered, again)]
    assert tokens[1] != tokens[0]
    assert tokens[2] == tokens[0]  # the steering hook left with its request
    # The addition comes after the read at the monitored layer: the prompt reads the same steered or not.
    assert torch.allclose(torch.from_numpy(steered[0].scores.z), torch.from_numpy(plain[0].scores.z), atol=1e-5)


def test_server_wide_steering_applies_to_every_request_and_requests_can_override_it(engine):
    from fastapi.testclient import TestClient
    from limbic.service.app import create_app
    from limbic.service.config import Settings
    from openai import OpenAI

    app = create_app(Settings(steer={"calm": 0.01}), engine)
    with TestClient(app) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)

        def complete(**limbic):
            response = client.completions.create(
                model=engine.model_name,
                prompt="Tell me about the weather in spring",
                max_tokens=8,
                temperature=0,
                extra_body={"limbic": limbic},
            )
            return response.choices[0].text, response.model_extra["limbic"].get("steer")

        steered_text, steer = complete()
        assert steer == {"calm": 0.01}
        plain_text, steer = complete(steer={"calm": 0.0})
        assert steer == {"calm": 0.0}
    expected = engine.decode(
        [
            t
            for s in generated_tokens(engine, engine.encode("Tell me about the weather in spring"))[1:]
            for t in s.token_ids
        ]
    )
    assert plain_text == expected and steered_text != plain_text
