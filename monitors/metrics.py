"""Prometheus metrics. Labels are only emotion, phase, model and severity: never request or user ids.

Per-token score histograms are kept as numpy bucket counts and exported by a custom collector: a request
scores hundreds of tokens against up to 171 emotions, too many for one ``Histogram.observe`` call each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
from limbic.monitors.engine import PHASES
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

# z-score bucket bounds: neutral text sits near 0, alerts start around 3.
SCORE_BUCKETS = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0)
# The recent-score gauge forgets with this half-life, in tokens.
RECENT_HALF_LIFE_TOKENS = 256
# Scoring lag bounds, in seconds: on the event loop's heels normally; seconds means the monitor fell behind.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _ceiling_table(bounds: np.ndarray) -> np.ndarray | None:
    """For integer bounds: bucket index by ``ceil(score) - (bounds[0] - 1)``, scores clamped to one past
    either end. A score whose ceiling is c lies above exactly the bounds below c, when all bounds are integers."""
    if not np.all(bounds == np.round(bounds)):
        return None
    ceilings = np.arange(bounds[0] - 1, bounds[-1] + 2)
    return np.searchsorted(bounds, ceilings, side="left")


class ScoreHistograms(Collector):
    """``limbic_emotion_score``: per-token z-scores by emotion, phase and model.

    Scores go negative, so OpenMetrics forbids a ``_sum`` (it would not be a counter); ``_count`` is still
    exposed, and ``limbic_emotion_score_recent`` gives a moving average in its place.
    """

    def __init__(self, emotions: list[str]) -> None:
        self.emotions = emotions
        self._bounds = np.array(SCORE_BUCKETS)
        self._width = len(self._bounds) + 1
        self._offsets = np.arange(len(emotions)) * self._width  # emotion e's buckets in a flat [E * width] count
        self._table = _ceiling_table(self._bounds)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], np.ndarray] = {}  # (model, phase) -> [E, buckets + 1]
        self._recent: dict[tuple[str, str], np.ndarray] = {}
        self._decay = 0.5 ** (1 / RECENT_HALF_LIFE_TOKENS)

    def zero(self, model: str, phase: str) -> None:
        """Exports zero counts for (model, phase) until its first tokens (the moving average waits for them)."""
        with self._lock:
            self._counts.setdefault((model, phase), np.zeros((len(self.emotions), self._width), np.int64))

    def buckets(self, z: np.ndarray) -> np.ndarray:
        """Each score's bucket: the first bound at or above it (Prometheus's ``le``), past the last for NaN."""
        if self._table is None or z.size < 512:  # a binary search is cheaper on a few rows
            return np.searchsorted(self._bounds, z, side="left")
        # Integer bounds: the bucket depends only on the score's ceiling, clamped to one past either end (fmin
        # sends NaN to the top, where the search puts it).
        low = float(self._bounds[0]) - 1
        ceiling = np.fmin(np.ceil(z), float(self._bounds[-1]) + 1)
        np.maximum(ceiling, low, out=ceiling)
        ceiling -= low
        return self._table[ceiling.astype(np.intp)]

    def observe(self, model: str, phase: str, z: np.ndarray) -> None:
        """One step's rows at once: a bucket per score, every emotion's counts in one flat array."""
        if not len(z):
            return
        bucket = self.buckets(z)
        bucket += self._offsets
        mean = np.add.reduce(z, 0) / len(z) if z.dtype == np.float32 else z.mean(axis=0)  # z.mean, faster
        keep = self._decay ** len(z)  # one step of an exponential moving average per token, batched
        with self._lock:
            key = (model, phase)
            counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = np.zeros((len(self.emotions), self._width), np.int64)
            flat = counts.reshape(-1)
            if len(z) <= 8:
                np.add.at(flat, bucket.ravel(), 1)
            else:
                flat += np.bincount(bucket.ravel(), minlength=len(flat))
            # keep * previous + (1 - keep) * mean, in place (the same operations, so the same values)
            new = (1 - keep) * mean
            previous = self._recent.setdefault(key, mean)
            previous *= keep
            previous += new

    def collect(self) -> Iterator[Metric]:
        name = "limbic_emotion_score"
        labels = ["emotion", "phase", "model"]
        family = HistogramMetricFamily(
            name, "Per-token emotion scores (z-scores against neutral text) at the monitored layer.", labels=labels
        )
        recent = GaugeMetricFamily(
            f"{name}_recent",
            f"Moving average of per-token scores (half-life {RECENT_HALF_LIFE_TOKENS} tokens).",
            labels=labels,
        )
        with self._lock:
            for (model, phase), counts in self._counts.items():
                cumulative = counts.cumsum(axis=1)
                for e, emotion in enumerate(self.emotions):
                    values = [emotion, phase, model]
                    buckets = [(repr(b), float(c)) for b, c in zip(SCORE_BUCKETS, cumulative[e], strict=False)]
                    buckets.append(("+Inf", float(cumulative[e, -1])))
                    family.add_metric(values, buckets, sum_value=None)
                    count = float(cumulative[e, -1])
                    family.samples.append(Sample(f"{name}_count", dict(zip(labels, values, strict=True)), count))
                    if (model, phase) in self._recent:
                        recent.add_metric(values, float(self._recent[(model, phase)][e]))
        yield family
        yield recent


class _Reading(Collector):
    """A value kept elsewhere (the engine's worker thread, its workers' reports, the alert spool), read at
    scrape time."""

    def __init__(
        self, name: str, documentation: str, model: str, value: Callable[[], float], family: type = CounterMetricFamily
    ) -> None:
        self._name, self._documentation, self._model, self._value = name, documentation, model, value
        self._family = family

    def collect(self) -> Iterator[Metric]:
        family = self._family(self._name, self._documentation, labels=["model"])
        family.add_metric([self._model], self._value())
        yield family


class Metrics:
    def __init__(
        self,
        emotions: list[str],
        model: str,
        scoring_seconds: Callable[[], float],
        forward_seconds: Callable[[], float],
        recomputed_tokens: Callable[[], float] = lambda: 0.0,
        prompt_tokens_cached: Callable[[], float] = lambda: 0.0,
        prompt_tokens_rescored: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.scores = ScoreHistograms(emotions)
        self.registry.register(self.scores)
        engine_counters = (
            ("limbic_scoring_seconds", "Time spent projecting activations onto emotion vectors.", scoring_seconds),
            # Scoring runs inside the forward pass: scoring / forward seconds is the monitor's share of model time.
            ("limbic_engine_forward_seconds", "Time spent in model forward passes.", forward_seconds),
            # vLLM recomputes a preempted request from scratch: a rising rate means the KV cache is too small.
            ("limbic_recomputed_tokens", "Token positions scored again after vLLM recomputed them.", recomputed_tokens),
            # Shared prompt prefixes: served from vLLM's prefix cache, scored from limbic's prompt cache.
            ("limbic_prompt_tokens_cached", "Prompt tokens scored from the prompt cache.", prompt_tokens_cached),
            # A rising rate: LIMBIC_VLLM_PROMPT_CACHE_MB is small next to vLLM's KV cache.
            (
                "limbic_prompt_tokens_rescored",
                "Prompt tokens vLLM served from its cache that limbic scored again.",
                prompt_tokens_rescored,
            ),
        )
        for name, documentation, value in engine_counters:
            self.registry.register(_Reading(name, documentation, model, value))
        self.tokens = Counter(
            "limbic_tokens_monitored", "Tokens scored by the monitor.", ["phase", "model"], registry=self.registry
        )
        self.alerts = Counter(
            "limbic_alerts", "Alerts raised.", ["emotion", "severity", "phase", "model"], registry=self.registry
        )
        self.sink_errors = Counter(
            "limbic_alert_sink_errors", "Alert events the sink failed to store.", ["model"], registry=self.registry
        )
        self.push_errors = Counter(
            "limbic_alertmanager_push_errors",
            "Alert events that could not be pushed to Alertmanager.",
            ["model"],
            registry=self.registry,
        )
        self.scoring_lag = Histogram(
            "limbic_scoring_lag_seconds",
            "Time from the forward pass that scored a token to the end of its monitoring (metrics, alerts sent).",
            ["model"],
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.mitigations = Counter(
            "limbic_mitigations",
            "Actions taken on alerts (steer, abort, review).",
            ["emotion", "severity", "action", "model"],
            registry=self.registry,
        )
        self.reviews_queued = Counter(
            "limbic_reviews_queued", "Requests queued for human review.", ["model"], registry=self.registry
        )
        self.reviews_resolved = Counter(
            "limbic_reviews_resolved", "Reviews resolved, by verdict.", ["verdict", "model"], registry=self.registry
        )
        # The queue is shared through Redis: every replica reports the same number (aggregate with max).
        self.reviews_open = Gauge(
            "limbic_reviews_open", "Open items in the review queue.", ["model"], registry=self.registry
        )
        # Series from start-up, at zero: rate() and increase() cannot see the first event of a series born with it.
        for family in (self.sink_errors, self.push_errors, self.scoring_lag, self.reviews_queued, self.reviews_open):
            family.labels(model)
        # Counted every step: each phase's child, looked up once.
        self._token_counts = {phase: self.tokens.labels(phase, model) for phase in PHASES}
        for phase in PHASES:
            self.scores.zero(model, phase)

    def track_spool(self, depth: Callable[[], float], dropped: Callable[[], float]) -> None:
        """The alert spool's backlog and losses (Redis down longer than the spool holds)."""
        self.registry.register(
            _Reading(
                "limbic_alert_spool_depth",
                "Alert events held locally, not yet in Redis.",
                self.model,
                depth,
                GaugeMetricFamily,
            )
        )
        self.registry.register(
            _Reading("limbic_alert_spool_dropped", "Alert events dropped: the spool was full.", self.model, dropped)
        )

    def observe_tokens(self, phase: str, z: np.ndarray) -> None:
        self.scores.observe(self.model, phase, z)
        counter = self._token_counts.get(phase)
        (self.tokens.labels(phase, self.model) if counter is None else counter).inc(len(z))
