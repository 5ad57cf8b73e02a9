"""The vLLM engine behind the live server: exact per-request scores under continuous batching.

The session server (conftest) serves with vLLM, compiled, in float32, with a 256-token budget per forward
pass so that longer prompts are prefilled in chunks. Tolerances, stated once:

- BATCH_TOLERANCE: a request's scores alone and in a batch of 16 come from the same kernels on different
  batch shapes; in float32 they differ by float rounding only (measured: < 1e-3 in z units); the API rounds
  scores to 4 decimals.
- PREEMPTION_TOLERANCE: a preempted request is recomputed by a prefill pass, whose kernels differ from the
  decode steps that first scored its generated tokens; still float32 rounding, a little more of it.
- ENGINE_TOLERANCE: vLLM and transformers compute the same model with different kernels (fused RMSNorm,
  paged attention, rotary tables); float32 rounding grows through 20 layers to ~1e-4 of the residual norm
  (~230 at layer 20), i.e. a few hundredths of a z unit for emotions whose calibration std is small.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time

import httpx
import numpy as np
import pytest
from conftest import running_limbic
from openai import AsyncOpenAI

pytestmark = pytest.mark.slow

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("LIMBIC_SETUP_VLLM") == "0":
        pytest.skip("vLLM deliberately not installed (LIMBIC_SETUP_VLLM=0)", allow_module_level=True)
    raise RuntimeError("vLLM is not installed: run scripts/setup --test")

MODEL = "SmolLM2-135M-Instruct"
BATCH_TOLERANCE = 2e-3
# A recomputed position comes from a prefill pass rather than the decode step that first scored it.
PREEMPTION_TOLERANCE = 5e-3
ENGINE_TOLERANCE = 0.1  # max |dz| over every token and emotion; the median is asserted far tighter below

TOPICS = [
    "the tides",
    "a lost umbrella",
    "sourdough bread",
    "the night shift at a hospital",
    "a chess endgame",
    "migrating geese",
    "a job interview that went badly",
    "paying rent late again",
    "a surprise birthday party",
    "an overdue library book",
    "a thunderstorm over the sea",
    "learning to ride a bicycle",
    "a missed flight",
    "the first day of school",
    "a broken laptop before a deadline",
    "a quiet Sunday morning",
]


def aclient(limbic_url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{limbic_url}/v1", api_key="unused", max_retries=0, timeout=300)


async def scored_chat(
    client: AsyncOpenAI, topic: str, max_tokens: int = 12, ignore_eos: bool = False, **limbic
) -> tuple[str, dict]:
    response = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Write two sentences about {topic}."}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": ignore_eos, "limbic": {"token_scores": True, **limbic}},
    )
    ext = response.model_extra["limbic"]
    assert response.usage.completion_tokens == sum(t["phase"] == "generation" for t in ext["tokens"])
    return response.choices[0].message.content, ext


def matrix(ext: dict, phase: str) -> np.ndarray:
    rows = [t["scores"] for t in ext["tokens"] if t["phase"] == phase and t["scores"] is not None]
    return np.array([[row[e] for e in sorted(row)] for row in rows])


def engine_counter(url: str, name: str) -> float:
    """One of the engine's counters (one series, labelled by model) from the server's /metrics."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}")


def test_server_serves_with_vllm(limbic_url):
    health = httpx.get(f"{limbic_url}/healthz").json()
    assert health["engine"] == "vllm"
    ready = httpx.get(f"{limbic_url}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"engine": "ok", "score_channel": "ok", "alert_sink": "ok", "alert_spool": "ok"}


def test_batch_invariance_16_concurrent_requests(limbic_url):
    """Each request's scores in a batch of 16 equal its scores alone, token for token."""

    async def run() -> tuple[list, list]:
        client = aclient(limbic_url)
        together = await asyncio.gather(*[scored_chat(client, t) for t in TOPICS])
        alone = [await scored_chat(client, t) for t in TOPICS]
        return together, alone

    together, alone = asyncio.run(run())
    for topic, (text_b, ext_b), (text_a, ext_a) in zip(TOPICS, together, alone, strict=True):
        assert text_b == text_a, topic
        for phase in ("prompt", "generation"):
            batched, single = matrix(ext_b, phase), matrix(ext_a, phase)
            assert batched.shape == single.shape and len(single) > 0, (topic, phase)
            assert np.abs(batched - single).max() < BATCH_TOLERANCE, (topic, phase)
    # No request saw another's rows: prompts differ, so their prompt scores must too.
    firsts = {tuple(matrix(ext, "prompt")[-1].round(2)) for _, ext in together}
    assert len(firsts) == len(TOPICS)


def test_scores_agree_with_the_transformers_engine(limbic_url, client, default_model_path):
    """Same model, same tokens: vLLM's scores match the transformers engine's (chunked prefill included)."""
    from limbic.monitors.hf.engine import TransformersEngine
    from limbic.service.config import Settings
    from limbic.service.runtime import load_engine

    text = " ".join(
        [
            "Please, I am begging you, I have nothing left and the rent is due tonight.",
            "The garden was quiet; bees worked the lavender while the kettle ticked as it cooled.",
            "He slammed the door so hard the window cracked, shouting that nobody ever listened.",
        ]
        * 5
    )
    hf = load_engine(Settings(engine="transformers"))
    assert isinstance(hf, TransformersEngine)
    ids = hf.encode(text)
    assert len(ids) > 256  # more than one forward pass's budget: the prompt is prefilled in chunks
    expected = asyncio.run(hf.score(ids))
    asyncio.run(hf.close())

    response = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=1, temperature=0, extra_body={"limbic": {"token_scores": True}}
    )
    tokens = [t for t in response.model_extra["limbic"]["tokens"] if t["phase"] == "prompt"]
    assert [t["index"] for t in tokens] == list(range(len(ids)))
    emotions = hf.vectors.emotions
    keep = [i for i, t in enumerate(tokens) if t["scores"] is not None]
    assert keep == [i for i in range(len(ids)) if expected.norms[i] < hf.vectors.manifest.calibration.sink_norm]
    got = np.array([[tokens[i]["scores"][e] for e in emotions] for i in keep])
    diff = np.abs(got - expected.z[keep])
    assert np.median(diff) < 0.01
    assert diff.max() < ENGINE_TOLERANCE


def test_every_returned_token_is_scored_whatever_ends_generation(client):
    """Length, stop string and EOS: completion_tokens equals the scored generated tokens, streamed or not."""
    cases = [
        ({"max_tokens": 7}, "length"),
        ({"max_tokens": 64, "stop": ["."]}, "stop"),
        ({"max_tokens": 200}, "stop"),  # a short answer ends at EOS, which is counted and scored
    ]
    for kwargs, finish in cases:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in one short sentence."}]}
        extra = {"extra_body": {"limbic": {"token_scores": True, "emotions": ["calm"]}}}
        response = client.chat.completions.create(**body, **kwargs, temperature=0, **extra)
        tokens = response.model_extra["limbic"]["tokens"]
        assert response.choices[0].finish_reason == finish, kwargs
        generated = [t["index"] for t in tokens if t["phase"] == "generation"]
        assert generated == list(range(response.usage.completion_tokens)), kwargs

        stream = client.chat.completions.create(
            **body, **kwargs, temperature=0, stream=True, stream_options={"include_usage": True}, **extra
        )
        streamed, usage, text = [], None, []
        for chunk in stream:
            streamed += [t["index"] for t in (chunk.model_extra.get("limbic") or {}).get("tokens", [])]
            text += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(text) == response.choices[0].message.content
        assert usage.completion_tokens == response.usage.completion_tokens
        assert len(streamed) == usage.prompt_tokens + usage.completion_tokens


# About 420 tokens: three full blocks of vLLM's prefix cache (128 tokens on CPU) and a partial one.
LONG_PROMPT = " ".join(
    f"Line {i}: the quarterly report is due on Friday, the numbers look fine, and {TOPICS[i % len(TOPICS)]}."
    for i in range(24)
)


def prompt_scores(client, prompt: str = LONG_PROMPT) -> np.ndarray:
    response = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=1,
        extra_body={"limbic": {"token_scores": True, "emotions": ["calm", "desperate"]}},
    )
    tokens = [t for t in response.model_extra["limbic"]["tokens"] if t["phase"] == "prompt"]
    assert all(t["scores"] is not None for t in tokens[1:])
    return np.array([[t["scores"]["calm"], t["scores"]["desperate"]] for t in tokens[1:]])


def test_a_repeated_prompt_reads_vllms_prefix_cache_and_keeps_its_scores(client, limbic_url):
    """The second time, vLLM serves the prompt's full blocks from its KV cache (they are not run through the
    model); their scores come from limbic's prompt cache and equal the computed ones."""
    cached = lambda: engine_counter(limbic_url, "limbic_prompt_tokens_cached_total")  # noqa: E731
    before = cached()
    first = prompt_scores(client)
    served = cached() - before
    second = prompt_scores(client)
    assert len(first) == len(second) > 400
    assert cached() - before - served >= 384  # three blocks of 128 the second time
    np.testing.assert_allclose(second, first, atol=BATCH_TOLERANCE)


def test_blocks_the_prompt_cache_let_go_are_scored_again():
    """A prompt cache smaller than vLLM's: vLLM still serves a prompt's blocks after limbic's cache dropped
    their scores, so limbic scores them in a pass of their own; the scores are those of the first time."""
    other = LONG_PROMPT.replace("quarterly report", "annual budget")
    with running_limbic({"LIMBIC_VLLM_PROMPT_CACHE_MB": "0.3"}) as url:  # room for ~3 blocks of 171 scores
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        first = prompt_scores(client)
        prompt_scores(client, other)  # its blocks push the first prompt's out of limbic's cache, not vLLM's
        rescored = engine_counter(url, "limbic_prompt_tokens_rescored_total")
        again = prompt_scores(client)
        assert engine_counter(url, "limbic_prompt_tokens_rescored_total") - rescored >= 384
    np.testing.assert_allclose(again, first, atol=BATCH_TOLERANCE)


def test_steering_changes_only_the_steered_request(limbic_url):
    """+desperate steers one request of a concurrent pair; the other is untouched, and prompts read the same."""

    async def run() -> tuple:
        client = aclient(limbic_url)
        plain = await scored_chat(client, "a walk in the park")
        steered, neighbour = await asyncio.gather(
            scored_chat(client, "a walk in the park", steer={"desperate": 0.5}),
            scored_chat(client, "a walk in the park"),
        )
        return plain, steered, neighbour

    plain, steered, neighbour = asyncio.run(run())
    assert steered[0] != plain[0]  # the steered text changed ...
    assert neighbour[0] == plain[0]  # ... its batch neighbour's did not
    assert steered[1]["steer"] == {"desperate": 0.5}
    # Scores are read before the addition at the monitored layer: the prompt reads identically.
    np.testing.assert_allclose(matrix(steered[1], "prompt"), matrix(plain[1], "prompt"), atol=BATCH_TOLERANCE)


def test_steering_refuses_unknown_emotions_and_wild_strengths(client):
    import openai

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(**body, extra_body={"limbic": {"steer": {"smug-ish": 0.1}}})
    assert unknown.value.body["param"] == "limbic.steer"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**body, extra_body={"limbic": {"steer": {"calm": 50}}})


def test_disconnect_aborts_the_vllm_request(client, limbic_url):
    """After a client leaves, the worker stops computing for it (its forward-time counter goes flat)."""

    def forward_seconds() -> float:
        return engine_counter(limbic_url, "limbic_engine_forward_seconds_total")

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a very long story."}],
        max_tokens=3000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()
    time.sleep(1.0)
    idle_from = forward_seconds()
    time.sleep(2.0)
    # 3,000 tokens would keep the worker busy for a minute; aborted, it does nothing.
    assert forward_seconds() - idle_from < 0.05


def test_preempted_requests_are_recomputed_and_keep_their_scores():
    """A KV cache for about two requests and six at once: vLLM preempts and recomputes, scores stay exact."""
    tight = {"LIMBIC_VLLM_KV_CACHE_GIB": "0.02", "LIMBIC_VLLM_MAX_MODEL_LEN": "256"}  # 3 blocks of 128 tokens

    def recomputed(url: str) -> float:
        return engine_counter(url, "limbic_recomputed_tokens_total")

    async def run(url: str) -> tuple[list, list, float]:
        client = aclient(url)

        def long_chat(topic: str):  # 100 tokens each, whatever the model would say: ~135 tokens of KV
            return scored_chat(client, topic, max_tokens=100, ignore_eos=True, emotions=["desperate", "calm"])

        alone = [await long_chat(t) for t in TOPICS[:6]]
        before = recomputed(url)
        together = await asyncio.gather(*[long_chat(t) for t in TOPICS[:6]])
        return alone, together, recomputed(url) - before

    with running_limbic(tight) as url:
        alone, together, again = asyncio.run(run(url))
    assert again > 0  # vLLM did preempt: positions arrived a second time
    for topic, (text_a, ext_a), (text_b, ext_b) in zip(TOPICS, alone, together, strict=False):
        assert text_b == text_a, topic
        for phase in ("prompt", "generation"):
            np.testing.assert_allclose(matrix(ext_b, phase), matrix(ext_a, phase), atol=PREEMPTION_TOLERANCE)
