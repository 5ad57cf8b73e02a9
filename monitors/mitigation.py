"""Steering as a mitigation: start adding a rule's steering at the token where that rule's alert fires.

The engine applies it inside the forward pass, so it begins exactly at the row that completed the crossing
(no round trip to the API process, which learns of the crossing a step later). The decision uses the same
``AlertTracker`` on the same z-scores and sink rule as the API's alerts, so the alert event the API records
with ``action: "steer"`` names the very token where steering began.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from limbic.monitors.alerting.rules import AlertRule, AlertTracker
from limbic.monitors.engine import scored


@dataclass(frozen=True)
class SteerTrigger:
    """The steer-action rules of one request, and the sink rule: everything an engine needs, JSON-safe."""

    rules: Mapping[str, AlertRule]
    sink_norm: float

    @classmethod
    def from_rules(cls, rules: Mapping[str, AlertRule], sink_norm: float) -> SteerTrigger | None:
        steering = {e: r for e, r in rules.items() if any(r.action_for(s) == "steer" for s, _ in r.levels())}
        return cls(steering, sink_norm) if steering else None

    def to_json(self) -> dict[str, Any]:
        return {"rules": {e: r.model_dump() for e, r in self.rules.items()}, "sink_norm": self.sink_norm}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SteerTrigger:
        return cls({e: AlertRule.model_validate(r) for e, r in data["rules"].items()}, float(data["sink_norm"]))


class SteeringSchedule:
    """One request's triggered steering: fed its scored rows in position order, it answers which addition
    each row gets. Positions count from the first prompt token; recomputed rows (vLLM preemption) are not
    observed twice but get the same addition as the first time, so a recomputation reproduces the run."""

    def __init__(
        self,
        trigger: SteerTrigger,
        emotion_index: Mapping[str, int],
        prompt_length: int,
        vector_for: Callable[[Mapping[str, float]], Any],
    ) -> None:
        self.trigger = trigger
        self.prompt_length = prompt_length
        self._tracker = AlertTracker(dict(trigger.rules), dict(emotion_index))
        self._vector_for = vector_for
        self._next = 0  # the first position not yet observed
        self._started: dict[str, int] = {}  # emotion -> position its steering starts at
        self._steps: list[tuple[int, Any]] = []  # (from position, vector), in position order

    @property
    def active(self) -> bool:
        return bool(self._steps)

    def observe(self, z: np.ndarray, norms: np.ndarray, first_position: int) -> None:
        """Rows ``first_position ..`` of one forward pass; rows already observed are skipped."""
        skip = max(0, self._next - first_position)
        if skip >= len(z):
            return
        z, norms, first = z[skip:], norms[skip:], first_position + skip
        keep = scored(norms, self.trigger.sink_norm)
        split = min(max(self.prompt_length - first, 0), len(z))  # rows before it are prompt rows
        for phase, lo, hi, start in (
            ("prompt", 0, split, first),
            ("generation", split, len(z), first + split - self.prompt_length),
        ):
            if hi <= lo:
                continue
            for crossing in self._tracker.observe(z[lo:hi], phase, start, keep[lo:hi]):
                rule = self.trigger.rules[crossing.emotion]
                if rule.action_for(crossing.severity) != "steer" or crossing.emotion in self._started:
                    continue
                position = crossing.position + (self.prompt_length if phase == "generation" else 0)
                self._started[crossing.emotion] = position
                self._steps.append((position, self._vector_for(rule.steer)))
        self._next = first + len(z)

    def addition(self, first_position: int, rows: int) -> Any | None:
        """The addition for rows ``first_position .. + rows``: None, one vector for all, or one per row."""
        active = [(start, vector) for start, vector in self._steps if start < first_position + rows]
        if not active:
            return None
        if all(start <= first_position for start, _ in active):  # the usual case: steering began earlier
            return _total(vector for _, vector in active)
        positions = np.arange(first_position, first_position + rows)
        return _total(vector.unsqueeze(0) * _column(positions >= start, vector) for start, vector in active)


def _total(parts: Iterable[Any]) -> Any:
    total = None
    for part in parts:
        total = part if total is None else total + part
    return total


def _column(mask: np.ndarray, like: Any) -> Any:
    import torch

    return torch.as_tensor(mask, device=like.device).to(like.dtype).unsqueeze(1)
