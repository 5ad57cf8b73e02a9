"""Before/after on one live server: alternates the legacy and current monitoring paths (``serve.py``'s
signals) between rounds of the same load, and reports the API process's CPU time per completion token in each.

    .venv/bin/python bench/results/profile/ab.py --pid PID [--rounds 4] [--seconds 30] [--token-scores]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time

import load


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--port", type=int, default=8151)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--token-scores", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"legacy": [], "current": []}
    for round_ in range(args.rounds):
        order = ["legacy", "current"] if round_ % 2 == 0 else ["current", "legacy"]
        for mode in order:
            os.kill(args.pid, signal.SIGUSR1 if mode == "legacy" else signal.SIGUSR2)
            time.sleep(0.5)
            out = await load.run(
                args.port, args.concurrency, args.seconds, args.max_tokens, args.token_scores, args.pid
            )
            results[mode].append(out["api_cpu_us_per_token"])
            print(json.dumps({"round": round_, "mode": mode} | out), flush=True)
    os.kill(args.pid, signal.SIGUSR2)
    summary = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "token_scores": args.token_scores,
        "api_cpu_us_per_token": {m: sorted(v) for m, v in results.items()},
        "median": {m: round(statistics.median(v), 1) for m, v in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
