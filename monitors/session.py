"""Per-request monitoring: turns an engine's scored steps into summaries, metrics and alert events."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from monitors.alertmanager import AlertmanagerPush
from monitors.alerts import AlertRule, AlertTracker, Crossing
from monitors.engine import PHASES, Step
from monitors.metrics import Metrics
from monitors.probe import scored
from monitors.sinks import AlertSink

log = logging.getLogger("limbic.alerts")


@dataclass
class Monitor:
    """What every request shares: the vectors' emotions, the alert rules, metrics and the sink."""

    model: str
    emotions: list[str]
    rules: dict[str, AlertRule]
    metrics: Metrics
    sink: AlertSink
    sink_norm: float
    include_text: bool = False  # operator opt-in: put the alerting tokens' text into events
    alertmanager: AlertmanagerPush | None = None  # optional direct push, faster than scrape + rule evaluation

    def __post_init__(self) -> None:
        self.emotion_index = {e: i for i, e in enumerate(self.emotions)}
        # Export every alert series the rules can raise at 0, so Prometheus has a sample before the first
        # alert: increase() in the alerting rules sees nothing in a series that is born at 1.
        for emotion, rule in self.rules.items():
            for severity, _ in rule.levels():
                for phase in PHASES:
                    self.metrics.alerts.labels(emotion, severity, phase, self.model)

    def request(
        self, request_id: str, decode: Callable[[Sequence[int]], str] | None = None, choice: int = 0
    ) -> RequestMonitor:
        return RequestMonitor(self, request_id, decode if self.include_text else None, choice)

    async def dispatch(self, event: dict) -> None:
        """Log, count, store and push one alert event; a failing sink is counted, never fatal to the request."""
        log.warning(json.dumps({"msg": "limbic alert"} | event))
        self.metrics.alerts.labels(event["emotion"], event["severity"], event["phase"], self.model).inc()
        try:
            await self.sink.publish(event)
        except Exception:
            self.metrics.sink_errors.labels(self.model).inc()
            log.exception("alert sink %s failed to store event %s", self.sink.name, event["id"])
        if self.alertmanager is not None:
            self.alertmanager.submit(event)

    async def close(self) -> None:
        if self.alertmanager is not None:
            await self.alertmanager.close()


@dataclass
class ScoreSummary:
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


@dataclass
class RequestMonitor:
    monitor: Monitor
    request_id: str
    decode: Callable[[Sequence[int]], str] | None = None
    choice: int = 0  # which of the request's n choices this generation is
    alerts: list[dict] = field(default_factory=list)
    _summaries: dict[str, ScoreSummary] = field(default_factory=dict)
    _tokens: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = self.monitor
        self._tracker = AlertTracker(dict(m.rules), m.emotion_index)

    async def observe(self, step: Step, prompt_ids: Sequence[int] = ()) -> list[dict]:
        """Takes one step's scores; returns the alert events it raised (already dispatched)."""
        if step.phase == "prompt" and prompt_ids:
            self._tokens["prompt"] = list(prompt_ids)
        else:
            self._tokens.setdefault("generation", []).extend(step.token_ids)
        if step.scores is None or not len(step.scores.z):
            return []
        keep = scored(step.scores.norms, self.monitor.sink_norm)
        kept = step.scores.z[keep]
        self._summaries.setdefault(step.phase, ScoreSummary()).add(kept)
        self.monitor.metrics.observe_tokens(step.phase, kept)
        events = [self._event(c) for c in self._tracker.observe(step.scores.z, step.phase, step.score_start, keep)]
        for event in events:
            await self.monitor.dispatch(event)
        self.alerts.extend(events)
        lag = time.perf_counter() - step.scores.scored_at
        self.monitor.metrics.scoring_lag.labels(self.monitor.model).observe(lag)
        return events

    def summary(self, phase: str) -> dict[str, dict[str, float]]:
        return self._summaries.get(phase, ScoreSummary()).as_dict(self.monitor.emotions)

    def token_scores(self, step: Step, emotions: Sequence[str] | None = None) -> list[dict]:
        """Per-token scores of a step for the API: sink tokens carry ``null`` scores."""
        if step.scores is None:
            return []
        index = self.monitor.emotion_index
        chosen = [e for e in (emotions or self.monitor.emotions) if e in index]
        rows = []
        keep = scored(step.scores.norms, self.monitor.sink_norm)
        for offset, (z, kept) in enumerate(zip(step.scores.z, keep, strict=True)):
            scores = {e: round(float(z[index[e]]), 4) for e in chosen} if kept else None
            rows.append({"phase": step.phase, "index": step.score_start + offset, "scores": scores})
        return rows

    def _event(self, crossing: Crossing) -> dict:
        event = {
            "id": uuid.uuid4().hex,
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "model": self.monitor.model,
            "request_id": self.request_id,
            "choice": self.choice,
            "emotion": crossing.emotion,
            "severity": crossing.severity,
            "phase": crossing.phase,
            "score": round(crossing.peak, 4),
            "threshold": crossing.threshold,
            "token_start": crossing.start,
            "token_index": crossing.position,
        }
        if self.decode is not None:
            tokens = self._tokens.get(crossing.phase, [])
            event["text"] = self.decode(tokens[crossing.start : crossing.position + 1])
        return event
