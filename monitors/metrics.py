"""Prometheus metrics. Labels are only emotion, phase, model and severity: never request or user ids.

Per-token score histograms are kept as numpy bucket counts and exported by a custom collector: a request
scores hundreds of tokens against up to 171 emotions, too many for one ``Histogram.observe`` call each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

# z-score bucket bounds: neutral text sits near 0, alerts start around 3.
SCORE_BUCKETS = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0)
# The recent-score gauge forgets with this half-life, in tokens.
RECENT_HALF_LIFE_TOKENS = 256


class ScoreHistograms(Collector):
    """``limbic_emotion_score``: per-token z-scores by emotion, phase and model.

    Scores go negative, so OpenMetrics forbids a ``_sum`` (it would not be a counter); ``_count`` is still
    exposed, and ``limbic_emotion_score_recent`` gives a moving average in its place.
    """

    def __init__(self, emotions: list[str]) -> None:
        self.emotions = emotions
        self._bounds = np.array(SCORE_BUCKETS)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], np.ndarray] = {}  # (model, phase) -> [E, buckets + 1]
        self._recent: dict[tuple[str, str], np.ndarray] = {}
        self._decay = 0.5 ** (1 / RECENT_HALF_LIFE_TOKENS)

    def observe(self, model: str, phase: str, z: np.ndarray) -> None:
        if not len(z):
            return
        bucket = np.searchsorted(self._bounds, z, side="left")  # first bound >= score: Prometheus's `le`
        width = len(self._bounds) + 1
        flat = bucket + np.arange(z.shape[1]) * width  # one bincount for every emotion at once
        counts = np.bincount(flat.ravel(), minlength=width * z.shape[1]).reshape(z.shape[1], width)
        with self._lock:
            key = (model, phase)
            self._counts[key] = self._counts.get(key, 0) + counts
            keep = self._decay ** len(z)  # one step of an exponential moving average per token, batched
            previous = self._recent.get(key, z.mean(axis=0))
            self._recent[key] = keep * previous + (1 - keep) * z.mean(axis=0)

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
                    recent.add_metric(values, float(self._recent[(model, phase)][e]))
        yield family
        yield recent


class _ScoringTime(Collector):
    def __init__(self, model: str, seconds: Callable[[], float]) -> None:
        self._model, self._seconds = model, seconds

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "limbic_scoring_seconds", "Time spent projecting activations onto emotion vectors.", labels=["model"]
        )
        family.add_metric([self._model], self._seconds())
        yield family


class Metrics:
    def __init__(self, emotions: list[str], model: str, scoring_seconds: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.scores = ScoreHistograms(emotions)
        self.registry.register(self.scores)
        self.registry.register(_ScoringTime(model, scoring_seconds))
        self.tokens = Counter(
            "limbic_tokens_monitored", "Tokens scored by the monitor.", ["phase", "model"], registry=self.registry
        )
        self.alerts = Counter(
            "limbic_alerts", "Alerts raised.", ["emotion", "severity", "phase", "model"], registry=self.registry
        )
        self.sink_errors = Counter(
            "limbic_alert_sink_errors", "Alert events the sink failed to store.", ["model"], registry=self.registry
        )

    def observe_tokens(self, phase: str, z: np.ndarray) -> None:
        self.scores.observe(self.model, phase, z)
        self.tokens.labels(phase, self.model).inc(len(z))
