from __future__ import annotations

import numpy as np
import pytest
from limbic.monitors.alerting.rules import AlertRule, AlertTracker
from pydantic import ValidationError

INDEX = {"desperate": 0, "calm": 1}


def track(rule: AlertRule, scores: list[float], phase: str = "generation", keep: list[bool] | None = None):
    tracker = AlertTracker({"desperate": rule}, INDEX)
    z = np.zeros((len(scores), 2), np.float32)
    z[:, 0] = scores
    mask = np.ones(len(scores), bool) if keep is None else np.array(keep)
    return tracker.observe(z, phase, 0, mask)


def test_needs_a_run_of_min_tokens():
    rule = AlertRule(warning=2.0, min_tokens=3)
    assert track(rule, [2.5, 2.5, 0.0, 2.5, 2.5]) == []
    (crossing,) = track(rule, [0.0, 2.5, 3.0, 2.2])
    assert (crossing.severity, crossing.start, crossing.position, crossing.peak) == ("warning", 1, 3, 3.0)


def test_hysteresis_stops_repeats_until_the_score_clears():
    rule = AlertRule(warning=2.0, min_tokens=1, hysteresis=1.0)
    # Dips to 1.5 (inside the hysteresis band) do not re-arm; 0.5 does.
    crossings = track(rule, [2.5, 1.5, 2.5, 1.5, 2.5, 0.5, 2.5])
    assert [c.position for c in crossings] == [0, 6]


def test_escalation_to_critical_raises_a_second_event():
    rule = AlertRule(warning=2.0, critical=4.0, min_tokens=2)
    crossings = track(rule, [2.5, 2.5, 4.5, 4.5])
    assert [(c.severity, c.position) for c in crossings] == [("warning", 1), ("critical", 3)]


def test_skipped_rows_neither_count_nor_break_a_run():
    rule = AlertRule(warning=2.0, min_tokens=2)
    assert track(rule, [50.0, 2.5], keep=[False, True]) == []
    assert len(track(rule, [2.5, 50.0, 2.5], keep=[True, False, True])) == 1


def test_runs_do_not_span_phases():
    tracker = AlertTracker({"desperate": AlertRule(warning=2.0, min_tokens=2)}, INDEX)
    high = np.full((1, 2), 3.0, np.float32)
    keep = np.ones(1, bool)
    assert tracker.observe(high, "prompt", 10, keep) == []
    assert tracker.observe(high, "generation", 0, keep) == []
    assert len(tracker.observe(high, "generation", 1, keep)) == 1


def test_a_prompt_alert_does_not_mute_the_generation():
    tracker = AlertTracker({"desperate": AlertRule(warning=2.0, min_tokens=1, hysteresis=1.0)}, INDEX)
    high = np.full((1, 2), 3.0, np.float32)
    keep = np.ones(1, bool)
    assert [c.phase for c in tracker.observe(high, "prompt", 5, keep)] == ["prompt"]
    # The generation's first token stays high (never below the hysteresis band), and still raises its own alert.
    assert [c.phase for c in tracker.observe(high, "generation", 0, keep)] == ["generation"]


def test_rules_for_unknown_emotions_are_ignored_and_bad_rules_refused():
    assert AlertTracker({"bored": AlertRule(warning=1.0)}, INDEX).rules == {}
    with pytest.raises(ValidationError, match="critical"):
        AlertRule(warning=3.0, critical=2.0)
