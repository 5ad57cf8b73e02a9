"""Scoring overhead of the transformers engine: time in the scoring hook against time in forward passes.

    .venv/bin/python bench/scoring_overhead.py [--requests 3] [--tokens 64] [--out bench/results/scoring_overhead.json]

Runs greedy generations on the default model with the bundled vectors (all emotions) and writes JSON with the
machine, the command and the figures. Both timings come from the same run, so machine noise cancels out.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import record
from limbic.monitors.engine import SamplingParams
from limbic.service import runtime
from limbic.service.config import Settings

PROMPTS = (
    "Tell me a story about a lighthouse.",
    "Please, I'm begging you, I have nothing left. If I lose this job my kids lose the house.",
    "What is the capital of France?",
)


async def measure(requests: int, tokens: int) -> dict:
    engine = runtime.load_engine(Settings(engine="transformers"))
    generated = 0
    started = time.perf_counter()
    for n in range(requests):
        ids = engine.chat_prompt_ids([{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}])
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        async for step in engine.generate(ids, params):
            generated += len(step.token_ids)
    wall = time.perf_counter() - started
    result = {
        "model": engine.model_name,
        "emotions": len(engine.vectors.emotions),
        "layer": engine.vectors.manifest.layer,
        "generated_tokens": generated,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(generated / wall, 2),
        "forward_seconds": round(engine.forward_seconds(), 3),
        "scoring_seconds": round(engine.scoring_seconds(), 4),
        "scoring_share_of_forward": round(engine.scoring_seconds() / engine.forward_seconds(), 5),
    }
    await engine.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scoring_overhead.json"))
    args = parser.parse_args()
    figures = asyncio.run(measure(args.requests, args.tokens))
    record.write(args.out, {"results": figures})


if __name__ == "__main__":
    main()
