"""Trigger rules: decide, from a stream of yes/no probe scores, the moment a condition starts to hold.

A probe is a yes/no question about the current frame ("Is it true that the kettle is boiling right
now? Answer yes or no."); the engine scores it as ``p = P(yes)`` in ``[0, 1]``. A rule reads those
scores one at a time, with the stream time ``t`` of the frame they were computed on, and says when to
fire::

    rule = make_rule(TriggerSpec(kind="threshold", on=0.6, off=0.4, hold_s=0.8, window_s=3.0, cooldown_s=5.0))
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

Stream seconds, not frames: every window, history and hold is a duration on the stream clock, so a
rule means the same at 1, 2 or 10 probes per second. Each score stands for the time since the
previous score, at most :data:`MAX_SPAN_S` (1 s; the first score after a reset counts for 1 s), so
a probe every 0.1 s needs ten "yes" scores where a probe every second needs one, and a probe slower
than 1/s still needs as many scores as it did at 1/s. The old count fields (``m``/``n``, ``window``,
``min_history``) are still accepted and read as probes at one per second: see :class:`TriggerSpec`.

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
    "MAX_SPAN_S",
    "DEFAULT_HOLD_S",
]

TriggerKind = Literal["threshold", "sum", "zscore"]

#: Smallest standard deviation a :class:`ZScoreRule` divides by, so a flat history cannot blow up z.
STD_FLOOR = 1e-3

#: The threshold rule's default hold (seconds of "yes" in its window): chosen on validation episodes at 1, 2 and
#: 10 frames per second together (docs/dialogue.md); the model's "yes" often lasts only about a second at 10 fps.
DEFAULT_HOLD_S = 0.8

#: The most stream time one score stands for (seconds): after a gap in the probes, a single score does
#: not count as seconds of evidence.
MAX_SPAN_S = 1.0


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
MAX_WINDOW = 10_000  # old count fields (n, window) and the scores a rule keeps at most
MAX_WINDOW_S = 600.0  # window_s, history_s, in seconds
MAX_COOLDOWN_S = 7 * 24 * 3600.0


def _check_seconds(value: object, field: str, low: float, high: float, *, open_low: bool = True) -> None:
    ok = _is_real(value) and math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
    _require(ok, field, f"must be a number of seconds in {'(' if open_low else '['}{low:g}, {high:g}], got {value!r}")


def _check_cooldown(cooldown_s: object) -> None:
    _require(_is_real(cooldown_s) and math.isfinite(cooldown_s) and 0 <= cooldown_s <= MAX_COOLDOWN_S, "cooldown_s",
             f"must be a number of seconds in [0, {MAX_COOLDOWN_S:g}], got {cooldown_s!r}")


def _check_threshold_params(on: object, off: object, hold_s: object, window_s: object, rearm_s: object) -> None:
    _check_unit(on, "on")
    _check_unit(off, "off")
    _require(off <= on, "off", f"must be <= on (the hysteresis band), got off={off!r} > on={on!r}")
    _check_seconds(window_s, "window_s", 0.0, MAX_WINDOW_S)
    _check_seconds(hold_s, "hold_s", 0.0, window_s)
    _check_seconds(rearm_s, "rearm_s", 0.0, window_s)


def _check_counts(m: object, n: object) -> None:
    _require(_is_int(n) and 1 <= n <= MAX_WINDOW, "n", f"must be an integer in [1, {MAX_WINDOW}], got {n!r}")
    _require(_is_int(m) and 1 <= m <= n, "m", f"must be an integer in [1, n={n}], got {m!r}")


def _check_sum_params(threshold: object, baseline: object) -> None:
    _require(_is_real(threshold) and math.isfinite(threshold) and threshold > 0, "threshold",
             f"must be a finite number > 0, got {threshold!r}")
    _require(_is_real(baseline) and 0.0 <= baseline < 1.0, "baseline", f"must be a number in [0, 1), got {baseline!r}")


def _check_zscore_params(z: object, history_s: object, min_history_s: object) -> None:
    _require(_is_real(z) and math.isfinite(z) and z > 0, "z", f"must be a finite number > 0, got {z!r}")
    _check_seconds(history_s, "history_s", 0.0, MAX_WINDOW_S)
    _check_seconds(min_history_s, "min_history_s", 0.0, history_s, open_low=False)


def _check_history_counts(window: object, min_history: object) -> None:
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
    """Which trigger rule to use and its parameters, in stream seconds; checked when built (:class:`ConfigError`).

    Every parameter is validated whatever the ``kind``, so the spec is always safe to switch kinds
    with :func:`dataclasses.replace`. Turn it into a live rule with :func:`make_rule`.

    Old count fields, accepted and converted (deprecated): ``m``/``n`` ("m of the last n scores") become
    ``hold_s = m - 0.5`` and ``window_s = n``; ``window``/``min_history`` (z-score history in scores)
    become ``history_s = window`` and ``min_history_s = min_history``. At one probe per second that is
    exactly the old rule; at any other rate it is the same rule in seconds. After the conversion the
    count fields read None, so ``TriggerSpec(m=2, n=3) == TriggerSpec(hold_s=1.5, window_s=3.0)``.

    The default threshold rule (``hold_s=0.8``, ``window_s=3``, ``rearm_s=1``, ``on=0.6``, ``off=0.4``) was
    chosen on 48 ShapeWorld validation episodes streamed at 1, 2 and 10 frames per second (docs/dialogue.md):
    at one probe per second one "yes" fires it; at ten, 0.8 s of "yes".
    Giving a count field and its seconds field together is a ConfigError.
    """

    # "threshold" (:class:`ThresholdRule`), "sum" (:class:`RunningSumRule`) or "zscore" (:class:`ZScoreRule`).
    kind: TriggerKind = "threshold"
    # Minimum seconds between two fires; 0 = no cooldown.
    cooldown_s: float = 0.0
    # threshold: a score >= on counts as "yes".
    on: float = 0.6
    # threshold: a score < off counts as "no"; enough "no" re-arms the rule after a fire.
    off: float = 0.4
    # threshold: fire when "yes" scores cover at least hold_s seconds of the last window_s seconds (default 0.8).
    hold_s: float | None = None
    # threshold: the voting window, in seconds.
    window_s: float | None = None
    # threshold: after a fire, re-arm once "no" scores cover rearm_s seconds of the last window_s.
    rearm_s: float = 1.0
    # sum: fire when the running sum of (score - baseline) x seconds reaches this.
    threshold: float = 1.5
    # sum: scores above it add evidence, below it remove evidence; a score below it re-arms.
    baseline: float = 0.5
    # zscore: fire when the score is this many standard deviations above the recent mean.
    z: float = 2.5
    # zscore: how many seconds of past scores the mean and deviation are taken over.
    history_s: float | None = None
    # zscore: no fire until past scores cover this many seconds.
    min_history_s: float | None = None
    # Deprecated counts (probes at one per second); converted as said above, then None.
    m: int | None = None
    n: int | None = None
    window: int | None = None
    min_history: int | None = None

    def __post_init__(self) -> None:
        _require(self.kind in ("threshold", "sum", "zscore"), "kind",
                 f"must be 'threshold', 'sum' or 'zscore', got {self.kind!r}")
        _check_cooldown(self.cooldown_s)
        if self.m is not None or self.n is not None:
            _require(self.hold_s is None and self.window_s is None, "m",
                     "give either m/n (probes, deprecated) or hold_s/window_s (seconds), not both")
            m, n = (2 if self.m is None else self.m), (3 if self.n is None else self.n)
            _check_counts(m, n)
            object.__setattr__(self, "hold_s", m - 0.5)
            object.__setattr__(self, "window_s", float(n))
        if self.window is not None or self.min_history is not None:
            _require(self.history_s is None and self.min_history_s is None, "window",
                     "give either window/min_history (probes, deprecated) or history_s/min_history_s (seconds), not both")
            window, least = (30 if self.window is None else self.window), (8 if self.min_history is None else self.min_history)
            _check_history_counts(window, least)
            object.__setattr__(self, "history_s", float(window))
            object.__setattr__(self, "min_history_s", float(least))
        for name in ("m", "n", "window", "min_history"):
            object.__setattr__(self, name, None)
        if self.hold_s is None:
            object.__setattr__(self, "hold_s", DEFAULT_HOLD_S)
        if self.window_s is None:
            object.__setattr__(self, "window_s", 3.0)
        if self.history_s is None:
            object.__setattr__(self, "history_s", 30.0)
        if self.min_history_s is None:
            object.__setattr__(self, "min_history_s", 8.0)
        _check_threshold_params(self.on, self.off, self.hold_s, self.window_s, self.rearm_s)
        _check_sum_params(self.threshold, self.baseline)
        _check_zscore_params(self.z, self.history_s, self.min_history_s)


# --------------------------------------------------------------------------- rules


class TriggerRule:
    """Base of the trigger rules: time and cooldown bookkeeping around a per-rule step.

    Call :meth:`update` with each new score and its time; when it returns True, act on the condition
    now (send the alert, answer the deferred question). Call :meth:`reset` to forget everything, as
    if newly built. ``last_fire_t`` and ``last_t`` are readable state.
    """

    # See __init__ (a class default too: controller snapshots from before it load with None).
    last_fire_since: float | None = None

    def __init__(self, cooldown_s: float = 0.0) -> None:
        _check_cooldown(cooldown_s)
        # Minimum seconds between two fires.
        self.cooldown_s = float(cooldown_s)
        # Time of the last fire, or None if the rule has not fired since built or reset.
        self.last_fire_t: float | None = None
        # Time of the last update, or None.
        self.last_t: float | None = None
        # Where the evidence behind the last fire starts, or None: the condition began after this time
        # (the score before the first one that counted) and was seen by ``last_fire_t``.
        self.last_fire_since: float | None = None

    def update(self, score: float, t: float) -> bool:
        """Feed one probe score ``score = P(yes)`` computed on the frame at stream time ``t``.

        Returns True when the rule fires now: the caller reports the condition as having started at
        ``t``. Raises :class:`InputError` for a score outside ``[0, 1]`` and :class:`TimestampError`
        for a time that is not finite or goes backwards; the rule is unchanged then.
        """
        check_score(score, t, self.last_t)
        score, t = float(score), float(t)
        span = MAX_SPAN_S if self.last_t is None else min(t - self.last_t, MAX_SPAN_S)
        self.last_t = t
        if not self._step(score, t, span):
            return False
        if self.last_fire_t is not None and t - self.last_fire_t < self.cooldown_s:
            self._suppressed()
            return False
        self.last_fire_t = t
        self.last_fire_since = min(self._evidence_since(), t - span)
        self._fired()
        return True

    def reset(self) -> None:
        """Forget all history and cooldown: the rule is armed and behaves as newly built."""
        self.last_fire_t = None
        self.last_t = None
        self.last_fire_since = None

    def in_cooldown(self, t: float) -> bool:
        """Whether a fire at time ``t`` would be suppressed by the cooldown."""
        return self.last_fire_t is not None and t - self.last_fire_t < self.cooldown_s

    # Subclasses: update state with one score at ``t`` standing for ``span`` seconds; say whether to fire.
    def _step(self, score: float, t: float, span: float) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # Subclasses: the fire went out; disarm / reset evidence.
    def _fired(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # Subclasses: called on a fire before ``_fired``: where the evidence behind it starts (the
    # latest score's own span is the default).
    def _evidence_since(self) -> float:
        return float("inf")

    # Subclasses: the fire was suppressed by the cooldown; the rule stays armed.
    def _suppressed(self) -> None:
        pass


class ThresholdRule(TriggerRule):
    """Hysteresis over a vote in time: fires when "yes" scores (``>= on``) cover at least ``hold_s``
    seconds of the last ``window_s`` seconds.

    Each score counts for the time since the previous one (at most :data:`MAX_SPAN_S`), clipped to the
    window. After a fire the rule is disarmed; it re-arms once "no" scores (``< off``) cover ``rearm_s``
    seconds of the window, and re-arming clears the votes, so the next fire needs ``hold_s`` seconds of
    fresh "yes" after the drop. With the defaults (on=0.6, off=0.4, hold_s=0.8, window_s=3, rearm_s=1)
    a condition fires on its first "yes" at one probe per second and after 0.8 s of "yes" at faster
    rates, stays silent while it holds, and fires again only after a second of "no".

    Cooldown: a suppressed fire leaves the rule armed and the votes intact, so it fires at the first
    update after the cooldown where the vote still holds.
    """

    def __init__(self, on: float = 0.6, off: float = 0.4, hold_s: float = DEFAULT_HOLD_S, window_s: float = 3.0,
                 rearm_s: float = 1.0, cooldown_s: float = 0.0) -> None:
        _check_threshold_params(on, off, hold_s, window_s, rearm_s)
        super().__init__(cooldown_s)
        self.on, self.off = float(on), float(off)
        self.hold_s, self.window_s, self.rearm_s = float(hold_s), float(window_s), float(rearm_s)
        # True while a rising edge may fire.
        self.armed = True
        self._votes: deque[tuple[float, float, float]] = deque(maxlen=MAX_WINDOW)  # (t, span, score)

    @property
    def votes(self) -> tuple[bool, ...]:
        """The window's "yes" votes (score >= on), oldest first, since the last re-arm."""
        return tuple(score >= self.on for _, _, score in self._votes)

    def reset(self) -> None:
        super().reset()
        self.armed = True
        self._votes.clear()

    def _covered(self, t: float, keep) -> float:
        start = t - self.window_s
        return sum(min(span, vt - start) for vt, span, score in self._votes if keep(score))

    def _step(self, score: float, t: float, span: float) -> bool:
        self._votes.append((t, span, score))
        while self._votes and self._votes[0][0] <= t - self.window_s:
            self._votes.popleft()
        if not self.armed and self._covered(t, lambda x: x < self.off) >= self.rearm_s - 1e-9:
            self.armed = True
            self._votes.clear()
            self._votes.append((t, span, score))
        return self.armed and self._covered(t, lambda x: x >= self.on) >= self.hold_s - 1e-9

    def _evidence_since(self) -> float:
        return min((vt - span for vt, span, score in self._votes if score >= self.on), default=float("inf"))

    def _fired(self) -> None:
        self.armed = False
        self._votes.clear()  # only "no" seen after the fire re-arms it


class RunningSumRule(TriggerRule):
    """CUSUM-style accumulator in time: ``acc = max(0, acc + (score - baseline) x span)``; fires when
    ``acc >= threshold``.

    ``span`` is the seconds the score stands for (time since the previous score, at most
    :data:`MAX_SPAN_S`), so evidence grows at the same rate per second whatever the probe rate: at one
    probe per second this is the plain per-score sum. Scores above ``baseline`` add evidence, scores
    below it take it away. On a fire ``acc`` goes back to 0 and the rule is disarmed (``acc`` stays 0)
    until a score ``< baseline`` re-arms it.

    Cooldown: a suppressed fire leaves the rule armed and clamps ``acc`` at ``threshold``, so it
    fires at the first update after the cooldown only if that score is still at least ``baseline``.
    """

    # Where the sum last left 0 (a class default: controller snapshots from before it load too).
    _rise_since = float("inf")

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

    def _step(self, score: float, t: float, span: float) -> bool:
        if not self.armed:
            if score < self.baseline:
                self.armed = True
            return False
        if self.acc <= 0.0:
            self._rise_since = t - span  # the evidence behind a fire starts where the sum last left 0
        self.acc = max(0.0, self.acc + (score - self.baseline) * span)
        return self.acc >= self.threshold - 1e-9

    def _evidence_since(self) -> float:
        return self._rise_since

    def _fired(self) -> None:
        self.acc = 0.0
        self.armed = False

    def _suppressed(self) -> None:
        self.acc = min(self.acc, self.threshold)


class ZScoreRule(TriggerRule):
    """Fires on a score that stands out from the watch's own recent scores (MMDuet-style).

    ``z = (score - mean) / max(std, STD_FLOOR)`` over the scores of the previous ``history_s`` seconds
    (the current one excluded; population standard deviation; at most the latest 10,000 scores).
    Nothing fires until the past scores cover ``min_history_s`` seconds (each counting for the time
    since the one before, at most :data:`MAX_SPAN_S`) and number at least two. Fires when
    ``z >= self.z`` while armed; re-arms when a later score has ``z < 1``. Because the reference is the
    probe's own history, a probe that is always high (or always low) never fires: only a jump does.
    Every score enters the history, fired or not.

    Cooldown: a suppressed fire leaves the rule armed; it fires after the cooldown if a score then
    still stands out against the history (which by then includes the suppressed scores).
    """

    def __init__(self, z: float = 2.5, history_s: float = 30.0, min_history_s: float = 8.0, cooldown_s: float = 0.0) -> None:
        _check_zscore_params(z, history_s, min_history_s)
        super().__init__(cooldown_s)
        self.z, self.history_s, self.min_history_s = float(z), float(history_s), float(min_history_s)
        # True while a rising edge may fire.
        self.armed = True
        # The z-score of the last update, or None while the history is too short.
        self.last_z: float | None = None
        self._history: deque[tuple[float, float, float]] = deque(maxlen=MAX_WINDOW)  # (t, span, score)

    @property
    def history(self) -> tuple[float, ...]:
        """The past scores the z-score is taken against, oldest first."""
        return tuple(score for _, _, score in self._history)

    def reset(self) -> None:
        super().reset()
        self.armed = True
        self.last_z = None
        self._history.clear()

    def _step(self, score: float, t: float, span: float) -> bool:
        while self._history and self._history[0][0] < t - self.history_s - 1e-9:
            self._history.popleft()
        wants = False
        self.last_z = None
        count = len(self._history)
        if count >= 2 and sum(s for _, s, _ in self._history) >= self.min_history_s - 1e-9:
            values = [x for _, _, x in self._history]
            mean = sum(values) / count
            std = math.sqrt(sum((x - mean) ** 2 for x in values) / count)
            self.last_z = (score - mean) / max(std, STD_FLOOR)
            if self.armed:
                wants = self.last_z >= self.z
            elif self.last_z < 1.0:
                self.armed = True
        self._history.append((t, span, score))
        return wants

    def _fired(self) -> None:
        self.armed = False


def make_rule(spec: TriggerSpec) -> TriggerRule:
    """Build a fresh, armed rule from ``spec``; the caller feeds it with :meth:`TriggerRule.update`."""
    if not isinstance(spec, TriggerSpec):
        raise ConfigError(f"spec: must be a TriggerSpec, got {type(spec).__name__}")
    if spec.kind == "threshold":
        return ThresholdRule(on=spec.on, off=spec.off, hold_s=spec.hold_s, window_s=spec.window_s, rearm_s=spec.rearm_s,
                             cooldown_s=spec.cooldown_s)
    if spec.kind == "sum":
        return RunningSumRule(threshold=spec.threshold, baseline=spec.baseline, cooldown_s=spec.cooldown_s)
    return ZScoreRule(z=spec.z, history_s=spec.history_s, min_history_s=spec.min_history_s, cooldown_s=spec.cooldown_s)
