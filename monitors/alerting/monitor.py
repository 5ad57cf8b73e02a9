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
from limbic.monitors.alerting.alertmanager import AlertmanagerPush
from limbic.monitors.alerting.conversations import (
    ConversationStore,
    MemoryConversationStore,
    TrendRule,
    trend_crossings,
)
from limbic.monitors.alerting.reviews import VERDICTS, MemoryReviewQueue, ReviewQueue, new_item
from limbic.monitors.alerting.rules import MITIGATIONS, AlertRule, AlertTracker, Crossing
from limbic.monitors.alerting.sinks import AlertSink
from limbic.monitors.engine import PHASES, Step, scored
from limbic.monitors.metrics import Metrics

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
    reviews: ReviewQueue = field(default_factory=lambda: MemoryReviewQueue(1000))
    conversations: ConversationStore = field(default_factory=lambda: MemoryConversationStore(86400.0, 200))
    trend_rules: dict[str, TrendRule] = field(default_factory=dict)
    headline: list[str] = field(default_factory=list)  # emotions summarised in conversation turns and reviews
    review_include_text: bool = False  # operator opt-in: review items carry the prompt and the response

    def __post_init__(self) -> None:
        self.emotion_index = {e: i for i, e in enumerate(self.emotions)}
        self.trend_rules = {e: r for e, r in self.trend_rules.items() if e in self.emotion_index}
        wanted = dict.fromkeys([*self.headline, *self.rules, *self.trend_rules])
        self.headline = [e for e in wanted if e in self.emotion_index]
        # Export every alert series the rules can raise at 0, so Prometheus has a sample before the first
        # alert: increase() in the alerting rules sees nothing in a series that is born at 1.
        m = self.metrics
        for emotion, rule in self.rules.items():
            for severity, _ in rule.levels():
                for phase in PHASES:
                    m.alerts.labels(emotion, severity, phase, self.model)
                for action in MITIGATIONS:  # a request may tighten a rule into any of them
                    m.mitigations.labels(emotion, severity, action, self.model)
        for emotion, trend in self.trend_rules.items():
            m.alerts.labels(emotion, trend.severity, "conversation", self.model)
        for verdict in VERDICTS:
            m.reviews_resolved.labels(verdict, self.model)
        self.scoring_lag = m.scoring_lag.labels(self.model)  # observed every step: the child, looked up once

    def request(
        self,
        request_id: str,
        decode: Callable[[Sequence[int]], str] | None = None,
        choice: int = 0,
        rules: dict[str, AlertRule] | None = None,
    ) -> RequestMonitor:
        """A choice's monitor; ``rules``: the request's own (the operator's, tightened), else the operator's."""
        return RequestMonitor(self, request_id, decode if self.include_text else None, choice, rules)

    async def dispatch(self, event: dict) -> None:
        """Log, count, store and push one alert event; a failing sink is counted, never fatal to the request."""
        log.warning(json.dumps({"msg": "limbic alert"} | event))
        self.metrics.alerts.labels(event["emotion"], event["severity"], event["phase"], self.model).inc()
        if event.get("action") in MITIGATIONS:
            self.metrics.mitigations.labels(event["emotion"], event["severity"], event["action"], self.model).inc()
        try:
            await self.sink.publish(event)
        except Exception:
            self.metrics.sink_errors.labels(self.model).inc()
            log.exception("alert sink %s failed to store event %s", self.sink.name, event["id"])
        if self.alertmanager is not None:
            self.alertmanager.submit(event)

    async def queue_review(self, fields: dict) -> dict:
        item = new_item({"model": self.model, **fields})
        open_items = await self.reviews.add(item)
        self.metrics.reviews_queued.labels(self.model).inc()
        self.metrics.reviews_open.labels(self.model).set(open_items)
        return item

    async def resolve_review(self, review_id: str, verdict: str, note: str | None) -> dict:
        item, open_items = await self.reviews.resolve(review_id, verdict, note)  # type: ignore[arg-type]
        self.metrics.reviews_resolved.labels(verdict, self.model).inc()
        self.metrics.reviews_open.labels(self.model).set(open_items)
        return item

    async def refresh_gauges(self) -> None:
        """Reads the shared review queue's depth (at scrape time: another replica may have changed it)."""
        try:
            self.metrics.reviews_open.labels(self.model).set(await self.reviews.open_count())
        except Exception:
            log.warning("review queue %s: could not read its depth", self.reviews.name, exc_info=True)

    async def record_turn(self, conversation_id: str, turn: dict) -> list[dict]:
        """Stores a conversation's turn, then raises the trend alerts it completes; returns their events."""
        longest = max((r.turns for r in self.trend_rules.values()), default=1)
        recent = await self.conversations.append(conversation_id, turn, longest + 1)
        events = []
        for emotion, rule, values in trend_crossings(recent, self.trend_rules):
            events.append(
                {
                    "id": uuid.uuid4().hex,
                    "time": _now(),
                    "kind": "trend",
                    "model": self.model,
                    "conversation_id": conversation_id,
                    "request_id": turn["request_id"],
                    "choice": 0,
                    "emotion": emotion,
                    "severity": rule.severity,
                    "phase": "conversation",
                    "statistic": rule.statistic,
                    "values": [round(v, 4) for v in values],
                    "score": round(values[-1], 4),
                    "threshold": rule.rise,
                    "action": "observe",
                }
            )
        for event in events:
            await self.dispatch(event)
        return events

    def summaries(self, monitor: RequestMonitor, phase: str) -> dict[str, dict[str, float]]:
        """A phase's summary restricted to the headline emotions (what turns and reviews keep)."""
        summary = monitor.summary(phase)
        return {e: summary[e] for e in self.headline if e in summary}

    async def close(self) -> None:
        if self.alertmanager is not None:
            await self.alertmanager.close()
        await self.reviews.close()
        await self.conversations.close()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class ScoreSummary:
    count: int = 0
    total: np.ndarray | None = None
    peak: np.ndarray | None = None

    def add(self, z: np.ndarray) -> None:
        if not len(z):
            return
        self.count += len(z)
        total, peak = np.add.reduce(z, 0, dtype=np.float64), np.maximum.reduce(z, 0)  # z.sum, z.max: fewer calls
        if self.total is None:
            self.total, self.peak = total, peak
        else:
            self.total += total
            self.peak = np.maximum(self.peak, peak)

    def as_dict(self, emotions: list[str]) -> dict[str, dict[str, float]]:
        if not self.count:
            return {}
        mean = (self.total / self.count).tolist()
        peak = self.peak.tolist()
        return {e: {"mean": round(mean[i], 4), "max": round(peak[i], 4)} for i, e in enumerate(emotions)}


def rounded(z: np.ndarray) -> list[list[float]]:
    """``round(float(x), 4)`` of every score, as nested lists, without a Python call per score.

    Scores are float32 (both engines): then x * 10**4 is exact in float64, so numpy's round (multiply, round
    half to even, divide) gives exactly the double Python's correctly rounded ``round`` does.
    """
    if z.dtype in (np.float32, np.float16):
        return np.round(z.astype(np.float64), 4).tolist()
    return [[round(x, 4) for x in row] for row in z.tolist()]


@dataclass
class RequestMonitor:
    monitor: Monitor
    request_id: str
    decode: Callable[[Sequence[int]], str] | None = None
    choice: int = 0  # which of the request's n choices this generation is
    rules: dict[str, AlertRule] | None = None  # None: the operator's
    alerts: list[dict] = field(default_factory=list)
    _summaries: dict[str, ScoreSummary] = field(default_factory=dict)
    _tokens: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = self.monitor
        if self.rules is None:
            self.rules = dict(m.rules)
        self._tracker = AlertTracker(dict(self.rules), m.emotion_index)

    async def observe(self, step: Step, prompt_ids: Sequence[int] = ()) -> list[dict]:
        """Takes one step's scores; returns the alert events it raised (already dispatched)."""
        if step.phase == "prompt" and prompt_ids:
            self._tokens["prompt"] = list(prompt_ids)
        else:
            self._tokens.setdefault("generation", []).extend(step.token_ids)
        if step.scores is None or not len(step.scores.z):
            return []
        scores = step.scores
        keep = scored(scores.norms, self.monitor.sink_norm)
        crossings = self._tracker.observe(scores.z, step.phase, step.score_start, keep)
        if crossings:
            crossings.sort(key=lambda c: c.position)
            aborts = [c.position for c in crossings if self.rules[c.emotion].action_for(c.severity) == "abort"]
            if aborts and step.phase == "generation":  # the generation ends at the first abort: nothing after counts
                crossings = [c for c in crossings if c.position <= aborts[0]]
                keep = keep & (np.arange(len(keep)) + step.score_start <= aborts[0])
        kept = scores.z if keep.all() else scores.z[keep]
        summary = self._summaries.get(step.phase)
        if summary is None:
            summary = self._summaries[step.phase] = ScoreSummary()
        summary.add(kept)
        self.monitor.metrics.observe_tokens(step.phase, kept)
        events = [self._event(c) for c in crossings]
        for event in events:
            await self.monitor.dispatch(event)
        self.alerts += events
        self.monitor.scoring_lag.observe(time.perf_counter() - scores.scored_at)
        return events

    def summary(self, phase: str) -> dict[str, dict[str, float]]:
        return self._summaries.get(phase, ScoreSummary()).as_dict(self.monitor.emotions)

    def token_scores(
        self,
        step: Step,
        emotions: Sequence[str] | None = None,
        token_text: Callable[[int], str] | None = None,
    ) -> list[dict]:
        """Per-token scores of a step for the API (sink tokens carry ``null`` scores), with each token's text
        when ``token_text`` is given: it goes back to the client that sent the text, nowhere else."""
        if step.scores is None:
            return []
        z = step.scores.z
        if emotions:
            index = self.monitor.emotion_index
            chosen = [e for e in emotions if e in index]
            z = z[:, [index[e] for e in chosen]]
        else:  # all of them, in the vectors' order: the columns as they are
            chosen = self.monitor.emotions
        tokens = self._tokens.get(step.phase, [])
        keep = scored(step.scores.norms, self.monitor.sink_norm).tolist()
        values = rounded(z)  # every score rounded at once, then one dict per token
        rows = []
        for offset, (row_values, kept) in enumerate(zip(values, keep, strict=True)):
            position = step.score_start + offset
            row = {
                "phase": step.phase,
                "index": position,
                "scores": dict(zip(chosen, row_values, strict=True)) if kept else None,
            }
            if token_text is not None and position < len(tokens):
                row["text"] = token_text(tokens[position])
            rows.append(row)
        return rows

    def _event(self, crossing: Crossing) -> dict:
        event = {
            "id": uuid.uuid4().hex,
            "time": _now(),
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
            "action": self.rules[crossing.emotion].action_for(crossing.severity),
        }
        if self.decode is not None:
            tokens = self._tokens.get(crossing.phase, [])
            event["text"] = self.decode(tokens[crossing.start : crossing.position + 1])
        return event
