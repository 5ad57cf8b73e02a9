"""A bounded soak on vLLM (loopback only, a few minutes): rounds of 32 concurrent streaming clients with mixed
prompt and reply lengths, some steered (always or from an alert), some leaving mid-stream. Zero errors; every
finished reply's per-token scores match a solo rerun of the same request (no rows mixed between requests);
the server's resident memory and Redis's memory stay flat once warm."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import psutil
import pytest
import redis
from conftest import ROOT, free_port, running
from openai import AsyncOpenAI
from test_api import MODEL

pytestmark = [pytest.mark.slow, pytest.mark.soak]

CLIENTS = 32
WARM_ROUNDS, MEASURED_ROUNDS = 2, 3
TOLERANCE = 2e-3  # as the batch-invariance test: batched and solo forward passes differ in float rounding
EMOTIONS = ["desperate", "panicked", "calm"]
SUBJECTS = ["the tides", "a night train", "sourdough", "a chess endgame", "geese", "a lighthouse", "rain", "maps"]


def request(i: int) -> dict:
    """Client i's request: prompt and reply lengths vary, one in four is steered, one in eight leaves."""
    subject = SUBJECTS[i % len(SUBJECTS)]
    long = i % 3 == 0
    text = f"Write about {subject}." + (
        " Describe its history, its sounds and its people in detail." * 6 if long else ""
    )
    limbic: dict = {"token_scores": True, "emotions": EMOTIONS}
    if i % 4 == 1:
        limbic["steer"] = {"calm": 0.1}
    if i % 4 == 3:  # steering from wherever a low calm threshold is crossed
        limbic["rules"] = {"calm": {"warning": 0.5, "min_tokens": 1, "action": "steer", "steer": {"calm": 0.1}}}
    return {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8 + (i * 7) % 41,
        "extra_body": {"limbic": limbic},
        "leaves": i % 8 == 5,
    }


async def stream(client: AsyncOpenAI, spec: dict) -> dict:
    """Streams one request; returns its token ids' texts and per-token scores, or that it left early."""
    chunks = await client.chat.completions.create(
        model=MODEL,
        messages=spec["messages"],
        max_tokens=spec["max_tokens"],
        temperature=0,
        stream=True,
        extra_body=spec["extra_body"],
    )
    rows, finish = [], None
    async with chunks:
        async for n, chunk in _enumerate(chunks):
            extension = (chunk.model_extra or {}).get("limbic", {})
            rows += extension.get("tokens", [])
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if spec["leaves"] and n == 3:
                return {"left": True}
    return {"left": False, "rows": rows, "finish": finish}


async def _enumerate(chunks):
    n = 0
    async for chunk in chunks:
        yield n, chunk
        n += 1


def scores(rows: list[dict], phase: str) -> tuple[list[str], np.ndarray]:
    chosen = [r for r in rows if r["phase"] == phase]
    texts = [r.get("text", "") for r in chosen]
    values = np.array([[r["scores"][e] for e in EMOTIONS] if r["scores"] else [np.nan] * 3 for r in chosen])
    return texts, values


def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def test_soak_32_concurrent_streams(redis_url):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(ROOT / ".venv" / "bin" / "limbic"), "serve", "--port", str(port)]
    with running(command, f"{url}/healthz", {"REDIS_URL": redis_url}) as process:
        store = redis.Redis.from_url(redis_url)
        specs = [request(i) for i in range(CLIENTS)]

        async def soak() -> tuple[list[list[dict]], dict[int, dict], dict]:
            # One event loop for the whole soak: the client's connection pool belongs to it.
            client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
            for _ in range(WARM_ROUNDS):
                await asyncio.gather(*[stream(client, spec) for spec in specs])
            before = {"rss": tree_rss(process.pid), "redis": store.info("memory")["used_memory"]}
            results = [await asyncio.gather(*[stream(client, spec) for spec in specs]) for _ in range(MEASURED_ROUNDS)]
            after = {"rss": tree_rss(process.pid), "redis": store.info("memory")["used_memory"]}
            finished = [i for i, r in enumerate(results[-1]) if not r["left"]]
            alone = {i: await stream(client, specs[i] | {"leaves": False}) for i in finished}
            await client.close()
            return results, alone, {"before": before, "after": after}

        started = time.monotonic()
        results, alone, memory = asyncio.run(soak())
        soak_s = time.monotonic() - started
        rss_before, redis_before = memory["before"]["rss"], memory["before"]["redis"]
        rss_after, redis_after = memory["after"]["rss"], memory["after"]["redis"]
        last = results[-1]
        finished = sorted(alone)

        # Zero errors: every client that stayed got a whole reply.
        for outcome in (r for round_results in results for r in round_results):
            assert outcome["left"] or outcome["finish"] in ("stop", "length"), outcome.get("finish")
        # No mixing: each reply's rows equal its solo rerun's, up to the first token greedy decoding chose
        # differently (batched float rounding can flip a near tie; every row before it must still agree).
        identical = 0
        for i in finished:
            for phase in ("prompt", "generation"):
                texts_b, batched = scores(last[i]["rows"], phase)
                texts_a, single = scores(alone[i]["rows"], phase)
                same = next((k for k, (a, b) in enumerate(zip(texts_a, texts_b, strict=False)) if a != b), None)
                common = min(len(texts_a), len(texts_b)) if same is None else same
                assert common > 0 or phase == "generation", (i, phase)
                difference = np.nanmax(np.abs(batched[:common] - single[:common])) if common else 0.0
                assert difference < TOLERANCE, (i, phase, difference)
            identical += (
                last[i]["rows"] == alone[i]["rows"]
                or scores(last[i]["rows"], "generation")[0] == (scores(alone[i]["rows"], "generation")[0])
            )
        assert identical >= 0.8 * len(finished), f"only {identical}/{len(finished)} replies repeated solo"
        # Flat memory once warm: the server's process tree and Redis.
        rss_growth = (rss_after - rss_before) / rss_before
        redis_growth = redis_after - redis_before
        print(
            json.dumps(
                {
                    "clients": CLIENTS,
                    "rounds": WARM_ROUNDS + MEASURED_ROUNDS,
                    "soak_s": round(soak_s, 1),
                    "finished_compared": len(finished),
                    "identical_text": identical,
                    "rss_mb": [round(rss_before / 2**20), round(rss_after / 2**20)],
                    "redis_bytes": [redis_before, redis_after],
                }
            )
        )
        assert rss_growth < 0.05, (rss_before, rss_after)
        assert redis_growth < 2 * 2**20, (redis_before, redis_after)
        assert httpx_ok(url)


def httpx_ok(url: str) -> bool:
    import httpx

    return httpx.get(f"{url}/readyz").status_code == 200
