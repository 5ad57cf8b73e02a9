"""Per-token cost of turning generated ids into text: limbic's windowed TextStream against decoding the whole
sequence at every token (what it did before), on the default model's tokenizer, at growing lengths.

    .venv/bin/python bench/detokenise.py   # writes bench/results/detokenise.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from limbic.monitors import model_source
from limbic.monitors.text_stream import TextStream
from transformers import AutoTokenizer

LENGTHS = (256, 1024, 4096)
REPEATS = 3


def full_decode(decode, ids: list[int]) -> None:
    for n in range(1, len(ids) + 1):
        decode(ids[:n])


def windowed(decode, ids: list[int]) -> None:
    stream = TextStream(decode)
    for token in ids:
        stream.push(token)


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_source.resolve(None).path)
    text = Path("README.md").read_text()
    base = tokenizer.encode(text, add_special_tokens=False)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    rows = []
    for length in LENGTHS:
        ids = (base * (length // len(base) + 1))[:length]
        timings: dict[str, list[float]] = {"full_decode": [], "windowed": []}
        for repeat in range(REPEATS):  # interleaved, alternating which goes first
            order = [("full_decode", full_decode), ("windowed", windowed)]
            for name, run in order if repeat % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                run(decode, ids)
                timings[name].append((time.perf_counter() - started) / length * 1e6)
        row = {"tokens": length} | {f"{k}_us_per_token": round(statistics.median(v), 2) for k, v in timings.items()}
        rows.append(row)
        print(row)
    out = {"command": "python " + " ".join(sys.argv), "repeats": REPEATS, "results": rows}
    Path("bench/results/detokenise.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
