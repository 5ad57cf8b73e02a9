"""Load for profiling the API process: concurrent streamed chat completions through the official openai client.

    .venv/bin/python bench/results/profile/load.py --port 8151 --concurrency 8 --seconds 60 [--token-scores] [--pid PID]

Prints one JSON line: requests, completion tokens, tokens per second and, with ``--pid`` (the API process),
that process's CPU time per completion token (user + system, its own threads only: vLLM's engine core and
workers are other processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from openai import AsyncOpenAI

PROMPTS = [
    "I have nothing left, please help me.",
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "The deadline is in an hour and everything is broken. What do I do?",
]


async def worker(client: AsyncOpenAI, model: str, deadline: float, args: argparse.Namespace, totals: dict, n: int):
    i = n
    while time.monotonic() < deadline:
        extra = {"ignore_eos": True}
        if args.token_scores:
            extra["limbic"] = {"token_scores": True}
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=args.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        async for chunk in stream:
            if chunk.usage is not None:
                totals["tokens"] += chunk.usage.completion_tokens
            elif chunk.choices and chunk.choices[0].delta.content:
                totals["chunks"] += 1
        totals["requests"] += 1
        i += 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (its threads, not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(
    port: int, concurrency: int, seconds: float, max_tokens: int, token_scores: bool, pid: int | None
) -> dict:
    args = argparse.Namespace(max_tokens=max_tokens, token_scores=token_scores)
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    totals = {"requests": 0, "tokens": 0, "chunks": 0}
    cpu = cpu_seconds(pid) if pid else 0.0
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(worker(client, model, deadline, args, totals, n) for n in range(concurrency)))
    elapsed = time.monotonic() - started
    out = totals | {"seconds": round(elapsed, 1), "tokens_per_s": round(totals["tokens"] / elapsed, 1)}
    if pid:
        used = cpu_seconds(pid) - cpu
        out |= {"api_cpu_s": round(used, 2), "api_cpu_us_per_token": round(used / totals["tokens"] * 1e6, 1)}
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8151)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--token-scores", action="store_true")
    parser.add_argument("--pid", type=int, help="the API process: report its CPU time per token")
    args = parser.parse_args()
    out = await run(args.port, args.concurrency, args.seconds, args.max_tokens, args.token_scores, args.pid)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
