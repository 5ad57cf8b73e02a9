"""The per-step (vectorised) monitoring paths against simple per-token references, on random data: alerts at
the same token positions with the same severities, runs and peaks; identical histogram bucket counts and
moving averages; identical summaries and per-token scores."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from limbic.monitors.alerting.monitor import Monitor, ScoreSummary, rounded
from limbic.monitors.alerting.rules import AlertRule, AlertTracker, Crossing
from limbic.monitors.alerting.sinks import MemorySink
from limbic.monitors.engine import ScoredRows, Step
from limbic.monitors.metrics import RECENT_HALF_LIFE_TOKENS, SCORE_BUCKETS, Metrics, ScoreHistograms

EMOTIONS = [f"e{i}" for i in range(6)]
INDEX = {e: i for i, e in enumerate(EMOTIONS)}


@dataclass
class _Level:
    run: int = 0
    run_start: int = 0
    peak: float = float("-inf")
    raised: bool = False


class ReferenceTracker:
    """The alert rules walked one token at a time, as the module docstring states them."""

    def __init__(self, rules: dict[str, AlertRule]) -> None:
        self.rules = rules
        self.state: dict[tuple[str, str], _Level] = {}
        self.phase: str | None = None

    def observe(self, z: np.ndarray, phase: str, start: int, keep: np.ndarray) -> list[Crossing]:
        if phase != self.phase:
            self.state.clear()
            self.phase = phase
        crossings = []
        for emotion, rule in self.rules.items():
            for severity, level in rule.levels():
                s = self.state.setdefault((emotion, severity), _Level())
                for offset in range(len(z)):
                    if not keep[offset]:
                        continue
                    score = float(z[offset, INDEX[emotion]])
                    if score >= level:
                        if s.run == 0:
                            s.run_start, s.peak = start + offset, score
                        s.run += 1
                        s.peak = max(s.peak, score)
                        if s.run >= rule.min_tokens and not s.raised:
                            s.raised = True
                            crossings.append(
                                Crossing(emotion, severity, level, phase, s.run_start, start + offset, s.peak)
                            )
                    else:
                        s.run = 0
                        if score < level - rule.hysteresis:
                            s.raised = False
        return crossings


def random_rules(rng: np.random.Generator) -> dict[str, AlertRule]:
    rules = {}
    for i in rng.choice(len(EMOTIONS), int(rng.integers(1, 4)), replace=False):
        warning = float(rng.normal(0.5, 0.5))
        critical = None if rng.random() < 0.3 else warning + float(rng.exponential(0.6))
        rules[EMOTIONS[i]] = AlertRule(
            warning=warning,
            critical=critical,
            min_tokens=int(rng.integers(1, 6)),
            hysteresis=float(rng.choice([0.0, 0.2, 0.5, 1.5])),
        )
    return rules


def random_steps(rng: np.random.Generator, count: int):
    """(z, phase, start, keep) steps: mixed sizes, a prompt then a generation, skipped rows, NaNs, ties."""
    positions = {"prompt": 0, "generation": 0}
    phase = "prompt"
    for _ in range(count):
        if phase == "prompt" and rng.random() < 0.2:
            phase = "generation"
        n = int(rng.choice([0, 1, 1, 1, 2, 3, 8, 17, 64]))
        z = rng.normal(0.8, 1.0, (n, len(EMOTIONS))).astype(np.float32)
        if n and rng.random() < 0.3:  # long stretches above a level, so runs cross step boundaries
            z[:, int(rng.integers(len(EMOTIONS)))] += 2.0
        if n and rng.random() < 0.1:
            z[int(rng.integers(n)), int(rng.integers(len(EMOTIONS)))] = np.nan
        keep = rng.random(n) > 0.1
        yield z, phase, positions[phase], keep
        positions[phase] += n


# The tracker walks short steps row by row and long ones with array operations: 0 forces the arrays on every
# step, a large value the rows, 4 mixes them (state passes from one to the other between steps).
WALKS = {"arrays": 0, "mixed": 4, "rows": 10**9}


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("seed", range(20))
def test_alert_tracker_matches_the_token_by_token_walk(seed, walk):
    rng = np.random.default_rng(seed)
    fired = 0
    for _ in range(5):  # fresh rules and trackers, several requests per seed
        rules = random_rules(rng)
        reference, tracker = ReferenceTracker(rules), AlertTracker(dict(rules), INDEX)
        tracker.ROW_BY_ROW = WALKS[walk]
        for z, phase, start, keep in random_steps(rng, 25):
            expected = reference.observe(z, phase, start, keep)
            got = tracker.observe(z, phase, start, keep)
            assert got == expected
            assert all(type(c.peak) is float and type(c.position) is int for c in got)
            fired += len(got)
    assert fired  # the data does raise alerts


def test_alert_tracker_ties_at_the_levels_and_runs_across_steps():
    """Scores exactly at the levels and at the hysteresis band's edge, split into steps every way."""
    rule = AlertRule(warning=2.0, critical=3.0, min_tokens=3, hysteresis=0.5)
    scores = [2.0, 3.0, 3.0, 1.6, 2.0, 2.0, 2.0, 1.4, 3.0, 3.0, 3.0, 3.0]  # exact levels, band edges
    z = np.zeros((len(scores), len(EMOTIONS)), np.float32)
    z[:, 0] = scores
    keep = np.ones(len(scores), bool)
    expected = ReferenceTracker({"e0": rule}).observe(z, "generation", 0, keep)
    assert [(c.severity, c.start, c.position, c.peak) for c in expected] == [
        ("warning", 0, 2, 3.0),  # then 1.6 breaks the run without re-arming: 2.0 x 3 does not fire again
        ("warning", 8, 10, 3.0),  # 1.4 re-armed it
        ("critical", 8, 10, 3.0),
    ]
    for size, walk in itertools.product((1, 2, 5, len(scores)), WALKS.values()):  # however the rows are split
        tracker = AlertTracker({"e0": rule}, INDEX)
        tracker.ROW_BY_ROW = walk
        got = []
        for at in range(0, len(scores), size):
            got += tracker.observe(z[at : at + size], "generation", at, keep[at : at + size])
        assert sorted(got, key=lambda c: (c.severity != "warning", c.position)) == expected


def reference_histogram(z_steps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Bucket counts one score at a time (the first bound at or above it, NaN past the last) and the moving
    average one step at a time, as it was computed before (z.mean, then keep * previous + (1 - keep) * mean)."""
    counts = np.zeros((len(EMOTIONS), len(SCORE_BUCKETS) + 1), np.int64)
    recent = None
    decay = 0.5 ** (1 / RECENT_HALF_LIFE_TOKENS)
    for z in z_steps:
        for row in z:
            for e, score in enumerate(row.tolist()):
                bucket = next((i for i, bound in enumerate(SCORE_BUCKETS) if score <= bound), len(SCORE_BUCKETS))
                counts[e, bucket] += 1
        if len(z):
            keep = decay ** len(z)
            previous = z.mean(axis=0) if recent is None else recent
            recent = keep * previous + (1 - keep) * z.mean(axis=0)
    return counts, recent


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf in the means, as it ever was
@pytest.mark.parametrize("seed", range(10))
def test_histograms_count_every_score_in_its_bucket(seed):
    rng = np.random.default_rng(seed)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, -4.0, 15.0, 3.0, 2.9999998, 3.0000002, -5.0, 16.0])
    histograms = ScoreHistograms(EMOTIONS)
    steps = []
    for _ in range(30):
        n = int(rng.choice([0, 1, 2, 8, 40, 100, 300]))  # small steps search, large ones use the ceiling table
        z = (rng.standard_normal((n, len(EMOTIONS))) * 5).astype(np.float32)
        if n:
            z.flat[rng.integers(0, z.size, 5)] = rng.choice(specials.astype(np.float32), 5)
            exact = rng.random(z.shape) < 0.2  # scores exactly at a bound
            z[exact] = rng.integers(-6, 17, int(exact.sum()))
        histograms.observe("m", "generation", z)
        steps.append(z)
    counts, recent = reference_histogram(steps)
    assert np.array_equal(histograms._counts[("m", "generation")], counts)
    np.testing.assert_array_equal(histograms._recent[("m", "generation")], recent)


def test_scores_above_every_bound_and_nan_land_in_the_last_bucket():
    histograms = ScoreHistograms(EMOTIONS)
    for n in (1, 200):  # the search and the ceiling table
        z = np.full((n, len(EMOTIONS)), np.nan, np.float32)
        z[:, 1], z[:, 2], z[:, 3] = np.inf, -np.inf, 1e30
        assert histograms.buckets(z)[0].tolist() == [14, 14, 0, 14, 14, 14]


def test_summaries_match_per_token_accumulation():
    rng = np.random.default_rng(3)
    summary = ScoreSummary()
    rows = []
    for n in (1, 5, 0, 64, 1, 1, 30):
        z = rng.normal(0, 2, (n, len(EMOTIONS))).astype(np.float32)
        summary.add(z)
        rows += list(z)
    total = np.zeros(len(EMOTIONS), np.float64)
    for row in rows:  # per token: the same float64 sums, the same float32 maxima
        total += row.astype(np.float64)
    expected = {
        e: {"mean": round(float(total[i] / len(rows)), 4), "max": round(float(max(r[i] for r in rows)), 4)}
        for i, e in enumerate(EMOTIONS)
    }
    got = summary.as_dict(EMOTIONS)
    assert got.keys() == expected.keys()
    for e in EMOTIONS:  # summing in a different order may move the mean's last bits, never its 4 decimals
        assert got[e]["max"] == expected[e]["max"]
        assert got[e]["mean"] == pytest.approx(expected[e]["mean"], abs=1e-4)
    assert summary.count == len(rows)


def test_rounded_scores_equal_pythons_round():
    rng = np.random.default_rng(4)
    z = np.concatenate(
        [
            rng.normal(0, 3, 20000).astype(np.float32),
            (rng.integers(-100000, 100000, 20000) / 10000 + 0.00005).astype(np.float32),  # near-ties
            np.array([0.03125, -0.03125, 0.5, -0.0, 1e-8, 123.45675], np.float32),  # exact ties
        ]
    ).reshape(-1, 2)
    assert rounded(z) == [[round(float(x), 4) for x in row] for row in z]
    assert rounded(z.astype(np.float64)) == [[round(float(x), 4) for x in row] for row in z.astype(np.float64)]


def test_token_scores_match_the_per_token_rows():
    rng = np.random.default_rng(5)
    metrics = Metrics(EMOTIONS, "m", lambda: 0.0, lambda: 0.0)
    monitor = Monitor("m", EMOTIONS, {}, metrics, MemorySink(), sink_norm=100.0)
    request = monitor.request("r")
    z = rng.normal(0, 2, (9, len(EMOTIONS))).astype(np.float32)
    norms = np.full(9, 10.0, np.float32)
    norms[0] = 1000.0
    step = Step(token_ids=list(range(9)), scores=ScoredRows(z, norms), score_start=4)
    asyncio.run(request.observe(step))
    for emotions in (None, ["e3", "e1", "unknown"]):
        chosen = [e for e in (emotions or EMOTIONS) if e in INDEX]
        expected = [
            {
                "phase": "generation",
                "index": 4 + i,
                "scores": None if i == 0 else {e: round(float(z[i, INDEX[e]]), 4) for e in chosen},
            }
            for i in range(9)
        ]
        assert request.token_scores(step, emotions) == expected
