"""API-side monitoring cost per token: ``RequestMonitor.observe`` (alert rules, summaries, score histograms,
token counter, scoring lag) and, optionally, the per-token scores a request may ask for, on synthetic steps of
1, 8 and 64 rows (one decode row per step under load; chunked prefill and catch-up steps carry more) through
generations of 256, 1024 and 4096 tokens. The per-token Python path it replaced (``legacy``, copied here
verbatim) runs interleaved with the current one on the same data, alternating which goes first.

    .venv/bin/python bench/api_overhead.py   # writes bench/results/api_overhead.json

Default alert rules (desperate and panicked, warning and critical, 3 tokens, hysteresis 0.5), the default
vector set's 171 emotions, the in-memory alert sink. Scores are N(0, 1) with a few raised stretches on the
rule emotions, so alerts fire now and then (``neutral``), or with the rule emotions around their warning
levels (``distressed``: runs and alerts all the time); the first row is an attention sink. Timed in process
CPU time, so other processes on a shared machine do not count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import record
from limbic.monitors.alerting import monitor as monitor_module
from limbic.monitors.alerting.monitor import Monitor, RequestMonitor
from limbic.monitors.alerting.rules import AlertRule, Crossing
from limbic.monitors.alerting.sinks import MemorySink
from limbic.monitors.engine import ScoredRows, Step, scored
from limbic.monitors.metrics import Metrics, ScoreHistograms

LENGTHS = (256, 1024, 4096)
ROWS = (1, 8, 64)
SINK_NORM = 100.0
RULES = {
    "desperate": AlertRule(warning=2.30, critical=3.30),
    "panicked": AlertRule(warning=2.62, critical=3.49),
}


# --- the per-token path before vectorisation (monitors/alerting/{rules,monitor}.py, monitors/metrics.py) ----
@dataclass
class _LevelState:
    run: int = 0
    run_start: int = 0
    peak: float = float("-inf")
    raised: bool = False


@dataclass
class LegacyTracker:
    rules: dict[str, AlertRule]
    emotion_index: dict[str, int]
    _state: dict[tuple[str, str], _LevelState] = field(default_factory=dict)
    _phase: str | None = None

    def observe(self, z: np.ndarray, phase: str, start: int, keep: np.ndarray) -> list[Crossing]:
        if phase != self._phase:
            self._state.clear()
            self._phase = phase
        crossings = []
        for emotion, rule in self.rules.items():
            column = z[:, self.emotion_index[emotion]]
            for severity, level in rule.levels():
                state = self._state.setdefault((emotion, severity), _LevelState())
                for offset in np.flatnonzero(keep).tolist():
                    score = float(column[offset])
                    if score >= level:
                        if state.run == 0:
                            state.run_start, state.peak = start + offset, score
                        state.run += 1
                        state.peak = max(state.peak, score)
                        if state.run >= rule.min_tokens and not state.raised:
                            state.raised = True
                            crossings.append(
                                Crossing(emotion, severity, level, phase, state.run_start, start + offset, state.peak)
                            )
                    else:
                        state.run = 0
                        if score < level - rule.hysteresis:
                            state.raised = False
        return crossings


@dataclass
class LegacySummary:
    count: int = 0
    total: np.ndarray | None = None
    peak: np.ndarray | None = None

    def add(self, z: np.ndarray) -> None:
        if not len(z):
            return
        self.count += len(z)
        self.total = z.sum(0, dtype=np.float64) + (0 if self.total is None else self.total)
        self.peak = z.max(0) if self.peak is None else np.maximum(self.peak, z.max(0))

    def as_dict(self, emotions: list[str]) -> dict[str, dict[str, float]]:
        if not self.count:
            return {}
        mean = self.total / self.count
        return {
            e: {"mean": round(float(mean[i]), 4), "max": round(float(self.peak[i]), 4)} for i, e in enumerate(emotions)
        }


def legacy_histogram_observe(self, model: str, phase: str, z: np.ndarray) -> None:
    if not len(z):
        return
    bucket = np.searchsorted(self._bounds, z, side="left")
    width = len(self._bounds) + 1
    flat = bucket + np.arange(z.shape[1]) * width
    counts = np.bincount(flat.ravel(), minlength=width * z.shape[1]).reshape(z.shape[1], width)
    with self._lock:
        key = (model, phase)
        self._counts[key] = self._counts.get(key, 0) + counts
        keep = self._decay ** len(z)
        previous = self._recent.get(key, z.mean(axis=0))
        self._recent[key] = keep * previous + (1 - keep) * z.mean(axis=0)


def legacy_observe_tokens(self, phase: str, z: np.ndarray) -> None:
    self.scores.observe(self.model, phase, z)
    self.tokens.labels(phase, self.model).inc(len(z))


async def legacy_observe(self, step: Step, prompt_ids=()) -> list[dict]:
    if step.phase == "prompt" and prompt_ids:
        self._tokens["prompt"] = list(prompt_ids)
    else:
        self._tokens.setdefault("generation", []).extend(step.token_ids)
    if step.scores is None or not len(step.scores.z):
        return []
    keep = scored(step.scores.norms, self.monitor.sink_norm)
    crossings = sorted(
        self._tracker.observe(step.scores.z, step.phase, step.score_start, keep), key=lambda c: c.position
    )
    aborts = [c.position for c in crossings if self.rules[c.emotion].action_for(c.severity) == "abort"]
    if aborts and step.phase == "generation":
        crossings = [c for c in crossings if c.position <= aborts[0]]
        keep = keep & (np.arange(len(keep)) + step.score_start <= aborts[0])
    kept = step.scores.z[keep]
    self._summaries.setdefault(step.phase, monitor_module.ScoreSummary()).add(kept)
    self.monitor.metrics.observe_tokens(step.phase, kept)
    events = [self._event(c) for c in crossings]
    for event in events:
        await self.monitor.dispatch(event)
    self.alerts.extend(events)
    lag = time.perf_counter() - step.scores.scored_at
    self.monitor.metrics.scoring_lag.labels(self.monitor.model).observe(lag)
    return events


def legacy_summary(self, phase: str) -> dict[str, dict[str, float]]:
    return self._summaries.get(phase, monitor_module.ScoreSummary()).as_dict(self.monitor.emotions)


def legacy_token_scores(self, step: Step, emotions=None, token_text=None) -> list[dict]:
    if step.scores is None:
        return []
    index = self.monitor.emotion_index
    chosen = [e for e in (emotions or self.monitor.emotions) if e in index]
    tokens = self._tokens.get(step.phase, [])
    rows = []
    keep = scored(step.scores.norms, self.monitor.sink_norm)
    for offset, (z, kept) in enumerate(zip(step.scores.z, keep, strict=True)):
        position = step.score_start + offset
        row = {
            "phase": step.phase,
            "index": position,
            "scores": {e: round(float(z[index[e]]), 4) for e in chosen} if kept else None,
        }
        if token_text is not None and position < len(tokens):
            row["text"] = token_text(tokens[position])
        rows.append(row)
    return rows


LEGACY = (
    (monitor_module, "AlertTracker", LegacyTracker),
    (monitor_module, "ScoreSummary", LegacySummary),
    (RequestMonitor, "observe", legacy_observe),
    (RequestMonitor, "summary", legacy_summary),
    (RequestMonitor, "token_scores", legacy_token_scores),
    (Metrics, "observe_tokens", legacy_observe_tokens),
    (ScoreHistograms, "observe", legacy_histogram_observe),
)


def install_legacy() -> Callable[[], None]:
    """Puts the old per-token path in place of the current one; returns what puts the current one back.
    Monitors created while it is in place keep its alert tracker; observing goes by whichever is in place."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in LEGACY]
    for owner, name, replacement in LEGACY:
        setattr(owner, name, replacement)

    def restore() -> None:
        for owner, name, original in saved:
            setattr(owner, name, original)

    return restore


@contextlib.contextmanager
def legacy() -> Iterator[None]:
    """The old per-token path in place of the current one, inside the block."""
    restore = install_legacy()
    try:
        yield
    finally:
        restore()


# --- the benchmark ------------------------------------------------------------------------------------------
def make_monitor() -> Monitor:
    emotions = Path("vectors/emotions.txt").read_text().split()
    metrics = Metrics(emotions, "bench", lambda: 0.0, lambda: 0.0)
    return Monitor("bench", emotions, dict(RULES), metrics, MemorySink(), SINK_NORM)


def make_steps(monitor: Monitor, length: int, rows: int, scores: str, seed: int) -> list[Step]:
    """``neutral``: N(0, 1) scores with a few raised stretches on the rule emotions (a few alerts per thousand
    tokens); ``distressed``: the rule emotions hover around their warning levels, so runs, re-arming and
    alerts go on all the time."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((length, len(monitor.emotions)), dtype=np.float32)
    for emotion, rule in RULES.items():
        column = monitor.emotion_index[emotion]
        if scores == "distressed":
            z[:, column] += rule.warning
        else:
            for begin in rng.integers(0, length, max(1, length // 200)):
                z[begin : begin + 6, column] += 3.0
    norms = np.full(length, 10.0, np.float32)
    norms[0] = 1000.0  # the attention sink
    ids = rng.integers(0, 49152, length).tolist()
    return [
        Step(
            token_ids=ids[at : at + rows],
            scores=ScoredRows(z[at : at + rows], norms[at : at + rows], 0.0),
            score_start=at,
        )
        for at in range(0, length, rows)
    ]


async def run(monitor: Monitor, steps: list[Step], with_scores: bool) -> float:
    request = monitor.request("bench")
    started = time.process_time()
    for step in steps:
        await request.observe(step)
        if with_scores:
            request.token_scores(step)
    return time.process_time() - started


async def measure(repeats: int) -> list[dict]:
    logging.getLogger("limbic.alerts").setLevel(logging.ERROR)  # alert log lines: not what is measured
    monitor = make_monitor()
    paths = {"legacy": legacy, "current": contextlib.nullcontext}
    results = []
    cases = (("observe", "neutral"), ("observe", "distressed"), ("observe + token_scores (all emotions)", "neutral"))
    for measured, scores in cases:
        for rows in ROWS:
            for length in LENGTHS:
                steps = make_steps(monitor, length, rows, scores, seed=length + rows)
                timings: dict[str, list[float]] = {name: [] for name in paths}
                for repeat in range(repeats + 1):  # the first round warms up and is not counted
                    order = list(paths.items()) if repeat % 2 == 0 else list(paths.items())[::-1]
                    for name, path in order:
                        with path():
                            seconds = await run(monitor, steps, measured != "observe")
                        if repeat:
                            timings[name].append(seconds / length * 1e6)
                row = {"measured": measured, "scores": scores, "rows_per_step": rows, "tokens": length}
                row |= {f"{name}_us_per_token": round(statistics.median(t), 2) for name, t in timings.items()}
                row["speedup"] = round(row["legacy_us_per_token"] / row["current_us_per_token"], 1)
                results.append(row)
                print(row, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/api_overhead.json"))
    args = parser.parse_args()
    results = asyncio.run(measure(args.repeats))
    record.write(
        args.out,
        {
            "repeats": args.repeats,
            "emotions": 171,
            "clock": "process CPU time (the machine is shared: wall time would count other processes' turns)",
            "rules": {
                e: r.model_dump(include={"warning", "critical", "min_tokens", "hysteresis"}) for e, r in RULES.items()
            },
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
