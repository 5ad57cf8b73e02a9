"""Alert policy: per-emotion thresholds on z-scores, with a minimum run of tokens and hysteresis, and the
action each level takes when it fires.

An emotion alerts when ``min_tokens`` consecutive tokens score at or above its warning (or critical)
level. It stays raised, without re-alerting, until a score falls below ``level - hysteresis``; only then
can it fire again. Escalating from warning to critical raises a second, critical event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from limbic.monitors.steering import Strength
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SEVERITIES = ("warning", "critical")
Severity = Literal["warning", "critical"]
Action = Literal["observe", "review", "steer", "abort"]
# How strong each action is: a request may only move a rule up this order (see ``tightened``).
ACTION_RANK: dict[str, int] = {"observe": 0, "review": 1, "steer": 2, "abort": 3}
MITIGATIONS: tuple[Action, ...] = ("review", "steer", "abort")  # the actions that are counted


class AlertRule(BaseModel):
    # NaN would compare false both ways: a NaN threshold never fires and would pass as "no looser".
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    warning: float = Field(description="z-score that raises a warning")
    critical: float | None = Field(default=None, description="z-score that raises a critical alert")
    min_tokens: int = Field(default=3, ge=1, description="consecutive tokens at or above the level")
    hysteresis: float = Field(default=0.5, ge=0, description="drop below level - hysteresis to re-arm")
    action: Action | dict[Severity, Action] = Field(
        default="observe", description="what a crossing does: one action, or one per severity"
    )
    steer: dict[str, Strength] = Field(
        default_factory=dict, description="for action steer: emotion -> strength added from the crossing on"
    )

    @model_validator(mode="after")
    def _consistent(self) -> AlertRule:
        if self.critical is not None and self.critical < self.warning:
            raise ValueError(f"critical ({self.critical}) must not be below warning ({self.warning})")
        steers = any(self.action_for(severity) == "steer" for severity, _ in self.levels())
        if steers and not any(self.steer.values()):
            raise ValueError('action steer needs a `steer` map, e.g. {"calm": 0.3}')
        return self

    def levels(self) -> list[tuple[str, float]]:
        levels = [("warning", self.warning)]
        if self.critical is not None:
            levels.append(("critical", self.critical))
        return levels

    def action_for(self, severity: str) -> Action:
        if isinstance(self.action, str):
            return self.action
        return self.action.get(severity, "observe")  # type: ignore[call-overload]


class RuleChangeError(ValueError):
    """A request's rule change is invalid or loosens an operator's rule; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def tightened(
    operator: Mapping[str, AlertRule], request: Mapping[str, Mapping[str, object]], allow_looser: bool = False
) -> dict[str, AlertRule]:
    """The operator's rules with a request's changes merged in (each emotion's fields over the operator's).

    Unless ``allow_looser``, a change may only make a rule stricter: lower thresholds, a shorter run, stronger
    actions, and its own steering only where the operator's rule does not steer. Raises ``RuleChangeError``.
    """
    merged = dict(operator)
    for emotion, changes in request.items():
        base = operator.get(emotion)
        try:
            rule = AlertRule.model_validate((base.model_dump() if base else {}) | dict(changes))
        except ValidationError as exc:
            error = exc.errors()[0]
            param = ".".join(["limbic.rules", emotion, *(str(part) for part in error["loc"])])
            raise RuleChangeError(param, f"{param}: {error['msg']}") from exc
        if base is not None and not allow_looser:
            _check_stricter(emotion, base, rule, set(changes))
        merged[emotion] = rule
    return merged


def _check_stricter(emotion: str, base: AlertRule, rule: AlertRule, changed: set[str]) -> None:
    where = f"limbic.rules.{emotion}"
    hint = "requests may only make the operator's rules stricter (LIMBIC_ALLOW_REQUEST_RULES=true lets them loosen)"
    for name in ("warning", "critical", "min_tokens", "hysteresis"):
        before, after = getattr(base, name), getattr(rule, name)
        if name in changed and before is not None and not (after is not None and after <= before):
            message = f"{where}.{name} {after} is looser than the operator's {before}: {hint}"
            raise RuleChangeError(f"{where}.{name}", message)
    for severity, _ in base.levels():
        before, after = base.action_for(severity), rule.action_for(severity)
        if ACTION_RANK[after] < ACTION_RANK[before]:
            raise RuleChangeError(
                f"{where}.action",
                f"{where}.action {after!r} for {severity} is weaker than the operator's {before!r}: {hint}",
            )
    operator_steers = any(base.action_for(s) == "steer" for s, _ in base.levels())
    if "steer" in changed and operator_steers and rule.steer != base.steer:
        raise RuleChangeError(f"{where}.steer", f"{where}.steer would replace the operator's steering: {hint}")


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
