"""Alert policy: per-emotion thresholds on z-scores, with a minimum run of tokens and hysteresis.

An emotion alerts when ``min_tokens`` consecutive tokens score at or above its warning (or critical)
level. It stays raised, without re-alerting, until a score falls below ``level - hysteresis``; only then
can it fire again. Escalating from warning to critical raises a second, critical event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field, model_validator

SEVERITIES = ("warning", "critical")


class AlertRule(BaseModel):
    warning: float = Field(description="z-score that raises a warning")
    critical: float | None = Field(default=None, description="z-score that raises a critical alert")
    min_tokens: int = Field(default=3, ge=1, description="consecutive tokens at or above the level")
    hysteresis: float = Field(default=0.5, ge=0, description="drop below level - hysteresis to re-arm")

    @model_validator(mode="after")
    def _critical_above_warning(self) -> AlertRule:
        if self.critical is not None and self.critical < self.warning:
            raise ValueError(f"critical ({self.critical}) must not be below warning ({self.warning})")
        return self

    def levels(self) -> list[tuple[str, float]]:
        levels = [("warning", self.warning)]
        if self.critical is not None:
            levels.append(("critical", self.critical))
        return levels


@dataclass(frozen=True)
class Crossing:
    """A threshold crossing found in a token stream (positions count prompt and generation separately)."""

    emotion: str
    severity: str
    threshold: float
    phase: str
    start: int  # first token of the run
    position: int  # token at which the run reached min_tokens
    peak: float


@dataclass
class _LevelState:
    run: int = 0
    run_start: int = 0
    peak: float = float("-inf")
    raised: bool = False


@dataclass
class AlertTracker:
    """Applies the rules to one request's token stream, in order; returns each new crossing once."""

    rules: dict[str, AlertRule]
    emotion_index: dict[str, int]
    _state: dict[tuple[str, str], _LevelState] = field(default_factory=dict)
    _phase: str | None = None

    def __post_init__(self) -> None:
        self.rules = {e: r for e, r in self.rules.items() if e in self.emotion_index}

    def observe(self, z: np.ndarray, phase: str, start: int, keep: np.ndarray) -> list[Crossing]:
        """``z`` [tokens, emotions] for positions ``start..``; rows where ``keep`` is False are skipped."""
        if phase != self._phase:
            # Each phase starts afresh: a run does not span the boundary, and a prompt's raised alert must not
            # mute the generation's (the model's own state is what the generation alerts are about).
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
