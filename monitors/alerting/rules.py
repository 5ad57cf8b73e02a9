"""Alert policy: per-emotion thresholds on z-scores, with a minimum run of tokens and hysteresis, and the
action each level takes when it fires.

An emotion alerts when ``min_tokens`` consecutive tokens score at or above its warning (or critical)
level. It stays raised, without re-alerting, until a score falls below ``level - hysteresis``; only then
can it fire again. Escalating from warning to critical raises a second, critical event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
class AlertTracker:
    """Applies the rules to one request's token stream, in order; returns each new crossing once.

    Per step, not per token: a step whose rows all stay below every level (the usual step) is a handful of
    array operations over all (emotion, severity) levels at once; a step with rows at a level walks them,
    with array operations down each level's column when the step is long (a chunk of prefill) and row by
    row when it is short (a decode step, where the array operations' fixed cost exceeds the walk's). Either
    way the result is that of the token-by-token rules (tests/test_vectorised.py checks both against them).
    Per level it carries between steps: the length of the run at or above the level, where the run started
    and its peak, and whether the level is raised.
    """

    rules: dict[str, AlertRule]
    emotion_index: dict[str, int]
    _phase: str | None = None

    # Steps with up to this many kept rows are walked row by row: with a few levels, the fixed cost of some
    # thirty array operations repays itself only over a few hundred rows (measured on 2 CPU cores).
    ROW_BY_ROW = 256

    def __post_init__(self) -> None:
        self.rules = {e: r for e, r in self.rules.items() if e in self.emotion_index}
        # One entry per (emotion, severity) level, in rule order then severity order: crossings come out in
        # that order (then by position), as the token-by-token walk produced them.
        self._levels = [(e, s, level, r) for e, r in self.rules.items() for s, level in r.levels()]
        self._columns = np.array([self.emotion_index[e] for e, _, _, _ in self._levels], np.intp)
        self._threshold = np.array([level for _, _, level, _ in self._levels], np.float64)
        self._rearm = np.array([level - r.hysteresis for _, _, level, r in self._levels], np.float64)
        self._min_tokens = np.array([r.min_tokens for _, _, _, r in self._levels], np.int64)
        self._reset()

    def _reset(self) -> None:
        n = len(self._levels)
        self._run = [0] * n  # consecutive kept rows at or above the level, up to the last step
        self._run_start = [0] * n  # position of the run's first token
        self._peak = [float("-inf")] * n  # the run's highest score
        self._raised = [False] * n  # fired, and no score has dropped below level - hysteresis since
        self._idle = True  # no level has a run or is raised: a step with no score at a level changes nothing

    def observe(self, z: np.ndarray, phase: str, start: int, keep: np.ndarray) -> list[Crossing]:
        """``z`` [tokens, emotions] for positions ``start..``; rows where ``keep`` is False are skipped."""
        if phase != self._phase:
            # Each phase starts afresh: a run does not span the boundary, and a prompt's raised alert must not
            # mute the generation's (the model's own state is what the generation alerts are about).
            self._reset()
            self._phase = phase
        if not self._levels or not len(z):
            return []
        scores = z.take(self._columns, axis=1)  # [rows, levels]
        rows = None
        if not keep.all():  # skipped rows neither count nor break a run
            rows = np.flatnonzero(keep)
            scores = scores[rows]
            if not len(rows):
                return []
        above = scores >= self._threshold
        if not above.any():  # the usual step: every run ends, and a low enough score re-arms its level
            if not self._idle:
                rearmed = (scores < self._rearm).any(axis=0).tolist()
                self._run = [0] * len(self._levels)
                self._raised = [raised and not r for raised, r in zip(self._raised, rearmed, strict=True)]
                self._idle = not any(self._raised)
            return []
        positions = start + (np.arange(len(scores)) if rows is None else rows)
        if len(scores) <= self.ROW_BY_ROW:
            crossings = self._walk_rows(scores.tolist(), positions.tolist(), phase)
        else:
            crossings = self._walk(scores, above, scores < self._rearm, positions, phase)
        self._idle = not (any(self._raised) or any(self._run))
        return crossings

    def _walk_rows(self, scores: list[list[float]], positions: list[int], phase: str) -> list[Crossing]:
        """The rules, row by row: a few rows."""
        crossings = []
        for level, (emotion, severity, threshold, rule) in enumerate(self._levels):
            run, begin, peak, raised = self._run[level], self._run_start[level], self._peak[level], self._raised[level]
            rearm = threshold - rule.hysteresis
            for row, position in zip(scores, positions, strict=True):
                score = row[level]
                if score >= threshold:
                    if run == 0:
                        begin, peak = position, score
                    run += 1
                    peak = max(peak, score)
                    if run >= rule.min_tokens and not raised:
                        raised = True
                        crossings.append(Crossing(emotion, severity, threshold, phase, begin, position, peak))
                else:
                    run = 0
                    if score < rearm:
                        raised = False
            self._run[level], self._run_start[level], self._peak[level], self._raised[level] = run, begin, peak, raised
        return crossings

    def _walk(
        self, scores: np.ndarray, above: np.ndarray, rearm: np.ndarray, positions: np.ndarray, phase: str
    ) -> list[Crossing]:
        """The rules as array operations down each level's column: many rows."""
        n = len(scores)
        carried_run, carried_raised = np.array(self._run), np.array(self._raised)
        index = np.arange(n)[:, None]
        # The last row before each row (itself included) that is below the level: runs begin after it.
        below_at = np.maximum.accumulate(np.where(above, -1, index), axis=0)
        carried = below_at < 0  # the row belongs to a run that began in an earlier step (or at row 0)
        run = index - below_at + np.where(carried, carried_run, 0)  # run length at each row (above rows)
        reached = above & (run >= self._min_tokens)
        # A run's first row at min_tokens is where it may fire: it fires unless the level is raised then.
        first = reached.copy()
        first[1:] &= ~reached[:-1]
        # Raised at a candidate row: set by the previous candidate of its column (fired or already raised)
        # unless a re-arming row came between; before the first candidate, the carried state unless re-armed.
        rearmed = np.cumsum(rearm, axis=0)
        previous = np.maximum.accumulate(np.where(first, rearmed, -1), axis=0)
        previous = np.vstack([np.full((1, previous.shape[1]), -1), previous[:-1]])
        fires = first & np.where(previous >= 0, rearmed > previous, ~carried_raised | (rearmed > 0))

        crossings = []
        for level, row in zip(*np.nonzero(fires.T), strict=True):  # level-major, then by position
            emotion, severity, threshold, _ = self._levels[level]
            begin, peak = self._run_begin(scores, below_at, positions, level, row)
            crossings.append(Crossing(emotion, severity, threshold, phase, begin, int(positions[row]), peak))

        # The state carried into the next step.
        last_candidate = np.where(first.any(axis=0), n - 1 - np.argmax(first[::-1], axis=0), -1)
        last_rearm = np.where(rearm.any(axis=0), n - 1 - np.argmax(rearm[::-1], axis=0), -1)
        raised = np.where(
            last_candidate > last_rearm, True, np.where(last_rearm > last_candidate, False, carried_raised)
        )
        ongoing = above[-1]
        for level in np.flatnonzero(ongoing).tolist():
            self._run_start[level], self._peak[level] = self._run_begin(scores, below_at, positions, level, n - 1)
        self._run = np.where(ongoing, run[-1], 0).tolist()
        self._raised = raised.tolist()
        return crossings

    def _run_begin(
        self, scores: np.ndarray, below_at: np.ndarray, positions: np.ndarray, level: int, row: int
    ) -> tuple[int, float]:
        """Where the run through ``row`` of a level's column began, and its peak up to that row (the state
        carried from earlier steps is read as it was before this step)."""
        first = int(below_at[row, level]) + 1
        peak = float(scores[first : row + 1, level].max())
        if first == 0 and self._run[level] > 0:  # it continues a run carried from earlier steps
            return self._run_start[level], max(self._peak[level], peak)
        return int(positions[first]), peak
