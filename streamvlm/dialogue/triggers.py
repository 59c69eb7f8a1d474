"""Trigger rules: decide, from a stream of yes/no probe scores, the moment a condition starts to hold.

A probe is a yes/no question about the current frame ("Is it true that the kettle is boiling right
now? Answer yes or no."); the engine scores it as ``p = P(yes)`` in ``[0, 1]``. A rule reads those
scores one at a time, with the stream time ``t`` of the frame they were computed on, and says when to
fire::

    rule = make_rule(TriggerSpec(kind="threshold", on=0.6, off=0.4, m=2, n=3, cooldown_s=5.0))
    for p, t in scored_frames:
        if rule.update(p, t):
            ...  # the condition has just started to hold at ``t``: tell the user

Every rule fires on a *rising edge*: once when its condition starts to hold, then it is disarmed
until the evidence falls back (the re-arm test differs per rule), so a condition that holds for a
minute fires once, not once per frame.

Cooldown (``cooldown_s``, all rules): a fire less than ``cooldown_s`` seconds after the previous fire
is *suppressed*: ``update`` returns False and the rule stays armed, so it fires at the first update
after the cooldown if its condition still holds then (a late fire rather than a lost event), and a
condition that flickered off again inside the cooldown is never reported. The per-rule notes say what
happens to the rest of the state while suppressed.

Pure computation: no clocks, no I/O. Time is whatever the caller passes as ``t``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError, InputError, TimestampError

__all__ = [
    "TriggerKind",
    "TriggerSpec",
    "TriggerRule",
    "ThresholdRule",
    "RunningSumRule",
    "ZScoreRule",
    "make_rule",
    "STD_FLOOR",
]

TriggerKind = Literal["threshold", "sum", "zscore"]

#: Smallest standard deviation a :class:`ZScoreRule` divides by, so a flat history cannot blow up z.
STD_FLOOR = 1e-3


# --------------------------------------------------------------------------- validation helpers


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_unit(value: object, field: str) -> None:
    _require(_is_real(value) and 0.0 <= value <= 1.0, field, f"must be a number in [0, 1], got {value!r}")


# Upper bounds: a rule's memory and work grow with its windows, so a client cannot ask for an unbounded one.
MAX_WINDOW = 10_000  # n (threshold votes) and window (zscore history), in scores
MAX_COOLDOWN_S = 7 * 24 * 3600.0


def _check_cooldown(cooldown_s: object) -> None:
    _require(_is_real(cooldown_s) and math.isfinite(cooldown_s) and 0 <= cooldown_s <= MAX_COOLDOWN_S, "cooldown_s",
             f"must be a number of seconds in [0, {MAX_COOLDOWN_S:g}], got {cooldown_s!r}")


def _check_threshold_params(on: object, off: object, m: object, n: object) -> None:
    _check_unit(on, "on")
    _check_unit(off, "off")
    _require(off <= on, "off", f"must be <= on (the hysteresis band), got off={off!r} > on={on!r}")
    _require(_is_int(n) and 1 <= n <= MAX_WINDOW, "n", f"must be an integer in [1, {MAX_WINDOW}], got {n!r}")
    _require(_is_int(m) and 1 <= m <= n, "m", f"must be an integer in [1, n={n}], got {m!r}")


def _check_sum_params(threshold: object, baseline: object) -> None:
    _require(_is_real(threshold) and math.isfinite(threshold) and threshold > 0, "threshold",
             f"must be a finite number > 0, got {threshold!r}")
    _require(_is_real(baseline) and 0.0 <= baseline < 1.0, "baseline", f"must be a number in [0, 1), got {baseline!r}")


def _check_zscore_params(z: object, window: object, min_history: object) -> None:
    _require(_is_real(z) and math.isfinite(z) and z > 0, "z", f"must be a finite number > 0, got {z!r}")
    _require(_is_int(window) and 2 <= window <= MAX_WINDOW, "window",
             f"must be an integer in [2, {MAX_WINDOW}], got {window!r}")
    _require(_is_int(min_history) and 2 <= min_history <= window, "min_history",
             f"must be an integer in [2, window={window}], got {min_history!r}")


def check_score(score: object, t: object, last_t: float | None, *, what: str = "score") -> None:
    """Raise unless ``score`` is a number in ``[0, 1]`` and ``t`` a finite time not before ``last_t``.

    :class:`~streamvlm.errors.InputError` for the score, :class:`~streamvlm.errors.TimestampError`
    for the time. Nothing is changed either way; the caller fixes the input and calls again.
    """
    if not (_is_real(score) and math.isfinite(score) and 0.0 <= score <= 1.0):
        raise InputError(f"{what}: must be a probability in [0, 1], got {score!r}")
    check_time(t, last_t)


def check_time(t: object, last_t: float | None) -> None:
    """Raise :class:`~streamvlm.errors.TimestampError` unless ``t`` is finite and ``>= last_t``."""
    if not (_is_real(t) and math.isfinite(t)):
        raise TimestampError(f"t: must be a finite number of seconds, got {t!r}")
    if last_t is not None and t < last_t:
        raise TimestampError(f"t: time went backwards, {t!r} < {last_t!r} already seen")


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class TriggerSpec:
    """Which trigger rule to use and its parameters; checked when built (:class:`ConfigError`).

    Every parameter is validated whatever the ``kind``, so the spec is always safe to switch kinds
    with :func:`dataclasses.replace`. Turn it into a live rule with :func:`make_rule`.
    """

    # "threshold" (:class:`ThresholdRule`), "sum" (:class:`RunningSumRule`) or "zscore" (:class:`ZScoreRule`).
    kind: TriggerKind = "threshold"
    # Minimum seconds between two fires; 0 = no cooldown.
    cooldown_s: float = 0.0
    # threshold: a score >= on counts as "yes".
    on: float = 0.6
    # threshold: a score < off re-arms the rule after a fire.
    off: float = 0.4
    # threshold: fire when at least m of the last n scores are "yes".
    m: int = 2
    # threshold: size of the voting window.
    n: int = 3
    # sum: fire when the running sum of (score - baseline) reaches this.
    threshold: float = 1.5
    # sum: scores above it add evidence, below it remove evidence; a score below it re-arms.
    baseline: float = 0.5
    # zscore: fire when the score is this many standard deviations above the recent mean.
    z: float = 2.5
    # zscore: how many past scores the mean and deviation are taken over.
    window: int = 30
    # zscore: no fire until this many past scores are known.
    min_history: int = 8

    def __post_init__(self) -> None:
        _require(self.kind in ("threshold", "sum", "zscore"), "kind",
                 f"must be 'threshold', 'sum' or 'zscore', got {self.kind!r}")
        _check_cooldown(self.cooldown_s)
        _check_threshold_params(self.on, self.off, self.m, self.n)
        _check_sum_params(self.threshold, self.baseline)
        _check_zscore_params(self.z, self.window, self.min_history)


# --------------------------------------------------------------------------- rules


class TriggerRule:
    """Base of the trigger rules: time and cooldown bookkeeping around a per-rule step.

    Call :meth:`update` with each new score and its time; when it returns True, act on the condition
    now (send the alert, answer the deferred question). Call :meth:`reset` to forget everything, as
    if newly built. ``last_fire_t`` and ``last_t`` are readable state.
    """

    def __init__(self, cooldown_s: float = 0.0) -> None:
        _check_cooldown(cooldown_s)
        # Minimum seconds between two fires.
        self.cooldown_s = float(cooldown_s)
        # Time of the last fire, or None if the rule has not fired since built or reset.
        self.last_fire_t: float | None = None
        # Time of the last update, or None.
        self.last_t: float | None = None

    def update(self, score: float, t: float) -> bool:
        """Feed one probe score ``score = P(yes)`` computed on the frame at stream time ``t``.

        Returns True when the rule fires now: the caller reports the condition as having started at
        ``t``. Raises :class:`InputError` for a score outside ``[0, 1]`` and :class:`TimestampError`
        for a time that is not finite or goes backwards; the rule is unchanged then.
        """
        check_score(score, t, self.last_t)
        score, t = float(score), float(t)
        self.last_t = t
        if not self._step(score):
            return False
        if self.last_fire_t is not None and t - self.last_fire_t < self.cooldown_s:
            self._suppressed()
            return False
        self.last_fire_t = t
        self._fired()
        return True

    def reset(self) -> None:
        """Forget all history and cooldown: the rule is armed and behaves as newly built."""
        self.last_fire_t = None
        self.last_t = None

    def in_cooldown(self, t: float) -> bool:
        """Whether a fire at time ``t`` would be suppressed by the cooldown."""
        return self.last_fire_t is not None and t - self.last_fire_t < self.cooldown_s

    # Subclasses: update state with one score and say whether the rule wants to fire.
    def _step(self, score: float) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # Subclasses: the fire went out; disarm / reset evidence.
    def _fired(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # Subclasses: the fire was suppressed by the cooldown; the rule stays armed.
    def _suppressed(self) -> None:
        pass


class ThresholdRule(TriggerRule):
    """Hysteresis over an m-of-n vote: fires when at least ``m`` of the last ``n`` scores are ``>= on``.

    After a fire the rule is disarmed; it re-arms on the first score ``< off``, and re-arming clears
    the vote window, so the next fire needs ``m`` fresh "yes" scores after the drop (old "yes" votes
    from before the drop do not count). With the defaults (on=0.6, off=0.4, m=2, n=3) a condition
    fires on its second "yes" frame, stays silent while it holds, and fires again only after a
    score below 0.4 followed by two more "yes" frames.

    Cooldown: a suppressed fire leaves the rule armed and the window intact, so it fires at the first
    update after the cooldown where the m-of-n vote still holds.
    """

    def __init__(self, on: float = 0.6, off: float = 0.4, m: int = 2, n: int = 3, cooldown_s: float = 0.0) -> None:
        _check_threshold_params(on, off, m, n)
        super().__init__(cooldown_s)
        self.on, self.off, self.m, self.n = float(on), float(off), m, n
        # True while a rising edge may fire.
        self.armed = True
        self._votes: deque[bool] = deque(maxlen=n)

    @property
    def votes(self) -> tuple[bool, ...]:
        """The window's "yes" votes (score >= on), oldest first, since the last re-arm."""
        return tuple(self._votes)

    def reset(self) -> None:
        super().reset()
        self.armed = True
        self._votes.clear()

    def _step(self, score: float) -> bool:
        if not self.armed and score < self.off:
            self.armed = True
            self._votes.clear()
        self._votes.append(score >= self.on)
        return self.armed and sum(self._votes) >= self.m

    def _fired(self) -> None:
        self.armed = False


class RunningSumRule(TriggerRule):
    """CUSUM-style accumulator: ``acc = max(0, acc + score - baseline)``; fires when ``acc >= threshold``.

    Scores above ``baseline`` add evidence, scores below it take it away, so a steady run of
    moderately high scores fires as surely as one very high score. On a fire ``acc`` goes back to 0
    and the rule is disarmed (``acc`` stays 0) until a score ``< baseline`` re-arms it.

    Cooldown: a suppressed fire leaves the rule armed and clamps ``acc`` at ``threshold``, so it
    fires at the first update after the cooldown only if that score is still at least ``baseline``.
    """

    def __init__(self, threshold: float = 1.5, baseline: float = 0.5, cooldown_s: float = 0.0) -> None:
        _check_sum_params(threshold, baseline)
        super().__init__(cooldown_s)
        self.threshold, self.baseline = float(threshold), float(baseline)
        # True while a rising edge may fire.
        self.armed = True
        # The accumulated evidence.
        self.acc = 0.0

    def reset(self) -> None:
        super().reset()
        self.armed = True
        self.acc = 0.0

    def _step(self, score: float) -> bool:
        if not self.armed:
            if score < self.baseline:
                self.armed = True
            return False
        self.acc = max(0.0, self.acc + score - self.baseline)
        return self.acc >= self.threshold

    def _fired(self) -> None:
        self.acc = 0.0
        self.armed = False

    def _suppressed(self) -> None:
        self.acc = min(self.acc, self.threshold)


class ZScoreRule(TriggerRule):
    """Fires on a score that stands out from the watch's own recent scores (MMDuet-style).

    ``z = (score - mean) / max(std, STD_FLOOR)`` over the previous ``window`` scores (the current one
    excluded; population standard deviation). Nothing fires until ``min_history`` scores are known.
    Fires when ``z >= self.z`` while armed; re-arms when a later score has ``z < 1``. Because the
    reference is the probe's own history, a probe that is always high (or always low) never fires:
    only a jump does. Every score enters the history, fired or not.

    Cooldown: a suppressed fire leaves the rule armed; it fires after the cooldown if a score then
    still stands out against the history (which by then includes the suppressed scores).
    """

    def __init__(self, z: float = 2.5, window: int = 30, min_history: int = 8, cooldown_s: float = 0.0) -> None:
        _check_zscore_params(z, window, min_history)
        super().__init__(cooldown_s)
        self.z, self.window, self.min_history = float(z), window, min_history
        # True while a rising edge may fire.
        self.armed = True
        # The z-score of the last update, or None while the history is too short.
        self.last_z: float | None = None
        self._history: deque[float] = deque(maxlen=window)

    @property
    def history(self) -> tuple[float, ...]:
        """The past scores the z-score is taken against, oldest first."""
        return tuple(self._history)

    def reset(self) -> None:
        super().reset()
        self.armed = True
        self.last_z = None
        self._history.clear()

    def _step(self, score: float) -> bool:
        wants = False
        self.last_z = None
        if len(self._history) >= self.min_history:
            count = len(self._history)
            mean = sum(self._history) / count
            std = math.sqrt(sum((x - mean) ** 2 for x in self._history) / count)
            self.last_z = (score - mean) / max(std, STD_FLOOR)
            if self.armed:
                wants = self.last_z >= self.z
            elif self.last_z < 1.0:
                self.armed = True
        self._history.append(score)
        return wants

    def _fired(self) -> None:
        self.armed = False


def make_rule(spec: TriggerSpec) -> TriggerRule:
    """Build a fresh, armed rule from ``spec``; the caller feeds it with :meth:`TriggerRule.update`."""
    if not isinstance(spec, TriggerSpec):
        raise ConfigError(f"spec: must be a TriggerSpec, got {type(spec).__name__}")
    if spec.kind == "threshold":
        return ThresholdRule(on=spec.on, off=spec.off, m=spec.m, n=spec.n, cooldown_s=spec.cooldown_s)
    if spec.kind == "sum":
        return RunningSumRule(threshold=spec.threshold, baseline=spec.baseline, cooldown_s=spec.cooldown_s)
    return ZScoreRule(z=spec.z, window=spec.window, min_history=spec.min_history, cooldown_s=spec.cooldown_s)
