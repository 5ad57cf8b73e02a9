"""Own and cumulative time per function from py-spy's raw (collapsed-stack) output.

    .venv/bin/python bench/results/profile/summarise.py PROFILE.raw --rate 200 --tokens N [--top 40]

A function's cumulative time counts each sample once, however often the function recurs in its stack.
Frames are grouped by function and file (line numbers dropped). With --tokens, µs per token as well.
The first table groups the API process's time into the parts of a streamed token's path.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def frame_name(frame: str) -> str:
    m = FRAME.match(frame)
    return f"{m['func']} ({short(m['file'])})" if m else frame


# The parts of the path, by a frame that marks them (a sample counts towards every part whose frame it has).
COMPONENTS = (
    ("event loop's own time (uvloop, C)", None),
    ("per choice: engine steps + monitoring", "Completion.steps.<locals>.monitored ("),
    ("  monitoring: RequestMonitor.observe", ("RequestMonitor.observe (", "legacy_observe (")),
    ("    alert rules", ("AlertTracker.observe (", "LegacyTracker.observe (")),
    ("    histograms + token counter", ("Metrics.observe_tokens (", "legacy_observe_tokens (")),
    ("    summaries", ("ScoreSummary.add (", "LegacySummary.add (")),
    ("  per-token scores (token_scores)", ("RequestMonitor.token_scores (", "legacy_token_scores (")),
    ("  engine: VLLMEngine.generate", "VLLMEngine.generate ("),
    ("    detokenising: Generation.push", "Generation.push ("),
    ("    waiting for scores: RequestScores.rows", "RequestScores.rows ("),
    ("score channel reader: ScoreReceiver._run", "ScoreReceiver._run ("),
    ("vLLM's output handler", "AsyncLLM._run_output_handler.<locals>.output_handler ("),
    ("streaming response (starlette)", "StreamingResponse.stream_response ("),
    ("  socket writes: RequestResponseCycle.send", "RequestResponseCycle.send ("),
    ("  chunk building: chunks", "chunks ("),
    ("  JSON: sse", "sse ("),
    ("vLLM's engine monitor thread (idle in select)", "MPClientEngineMonitor"),
    ("vLLM's renderer pool thread (idle in queue.get)", "ThreadPoolExecutor-"),
)


def components(lines: list[str]) -> list[tuple[str, int]]:
    counts = dict.fromkeys((name for name, _ in COMPONENTS), 0)
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        for name, marker in COMPONENTS:
            if marker is None:
                hit = frames[-1].startswith("Runner.run (")
            else:
                markers = (marker,) if isinstance(marker, str) else marker
                hit = any(m in frame for frame in frames for m in markers)
            if hit:
                counts[name] += int(count)
    return list(counts.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("raw", type=Path)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--tokens", type=float, default=0)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    own: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in args.raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total += n
        if frames[0].startswith("thread ") or frames[0].startswith("process "):
            threads[frames[0]] += n
            frames = frames[1:]
        names = [frame_name(f) for f in frames]
        if names:
            own[names[-1]] += n
        for name in set(names):
            cumulative[name] += n
    seconds = total / args.rate

    def fmt(n: int) -> str:
        s = n / args.rate
        per_token = f"  {s / args.tokens * 1e6:9.1f} µs/token" if args.tokens else ""
        return f"{n:6d} samples  {s:7.2f} s  {100 * n / total:5.1f}%{per_token}"

    print(f"profile: {args.raw.name}; {total} samples at {args.rate:g} Hz = {seconds:.2f} s of non-idle time")
    if args.tokens:
        print(f"completion tokens in the window: {args.tokens:g}; {seconds / args.tokens * 1e6:.1f} µs/token overall")
    print("\nby part of the path:")
    for name, n in components(args.raw.read_text().splitlines()):
        print(f"  {fmt(n)}  {name}")
    print("\nby thread:")
    for name, n in threads.most_common():
        print(f"  {fmt(n)}  {name}")
    for title, counter in (("own time", own), ("cumulative time", cumulative)):
        print(f"\ntop {args.top} by {title}:")
        for name, n in counter.most_common(args.top):
            print(f"  {fmt(n)}  {name}")


if __name__ == "__main__":
    main()
