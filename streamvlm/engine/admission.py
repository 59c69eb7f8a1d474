"""Admission by compute: how many frames per second each session may have read, when the model cannot read them all.

Reading a frame (vision tower + prefill) is the server's main cost. When the sessions together offer more
frames per second than the model reads, something has to give; without a plan the sessions that happen
to win the model's turns read everything and the others starve, and every answer waits behind reads.
:class:`ComputeAdmission` makes the plan instead:

* **capacity** = frame share / (model seconds per frame read). The seconds per frame are an
  exponentially weighted average the caller feeds after each read (:meth:`ComputeAdmission.frame_read`).
  The frame share is what answers and probes leave: ``1 - headroom - (their measured share of the
  model's time)`` (fed with :meth:`ComputeAdmission.others_used`), never more than ``frame_time_share``
  (e.g. 0.8) and never less than ``min_frame_share`` (frames are the product: they are never starved
  altogether). Without that measurement it is ``frame_time_share``. A fixed share oversubscribes the
  model as soon as answers need more than what it leaves them, and then answers queue behind answers;
* **max-min fair shares** (water-filling): a session that offers less than an even split keeps all it
  offers, and what it leaves is split evenly among the others (as in max-min fair queueing, Bertsekas &
  Gallager, *Data Networks*; the same rule as Dominant Resource Fairness reduced to one resource);
* **hysteresis**: a session's announced cap moves only when what it would be allowed changes by more
  than ``hysteresis`` (15 % by default) of the new value, and is lowered at once whenever keeping it
  would put the sum over capacity, so the sum of allowed rates never exceeds capacity and caps do not
  flap with the noise of the measurements.

It is a pure core: no clock, no threads, no I/O. The caller (the server's stats loop, see
:class:`streamvlm.server.compute.ComputeGovernor`) passes the offered rates and gets a
:class:`ReadPlan` back, then applies each session's cap (``RealtimeSession.set_read_rate``) and tells
the client about the ones in :attr:`ReadPlan.changes`. It does not know what a session or a frame is.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from ..errors import ConfigError

__all__ = ["ComputeAdmission", "ReadPlan", "fair_shares"]

_INF = math.inf


def _check_rate(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}: must be a finite number >= 0, got {value!r}")
    return float(value)


def fair_shares(capacity: float, offered: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """Max-min fair split of ``capacity`` frames/s among sessions offering ``offered`` frames/s.

    Sessions are served from the smallest offer up: each gets the smaller of its offer and an even
    split of what is left. The result never sums above ``capacity`` and never gives a session more
    than it offers; sessions that offer more than their share all get the same rate.
    """
    shares: dict[Hashable, float] = {}
    left, waiting = float(capacity), sorted(offered.items(), key=lambda kv: kv[1])
    for i, (key, offer) in enumerate(waiting):
        even = left / (len(waiting) - i)
        if offer <= even:
            shares[key], left = offer, left - offer
        else:  # everyone from here on offers more than an even split: they all get it
            for other, _ in waiting[i:]:
                shares[other] = even
            break
    return shares


@dataclass
class ReadPlan:
    """What :meth:`ComputeAdmission.plan` decided; the caller applies :attr:`caps` and announces :attr:`changes`."""

    # Frames per second the model can read for frames (share of its time / seconds per frame); None: not measured yet.
    capacity_fps: float | None
    # Each session's cap on frames read per second; None: not limited (it may read all it offers).
    caps: dict[Hashable, float | None] = field(default_factory=dict)
    # What each session may read now: min(its offer, its cap).
    allowed: dict[Hashable, float] = field(default_factory=dict)
    # Sessions whose cap changed since the last plan (set, moved or lifted), with the new cap: announce these.
    changes: dict[Hashable, float | None] = field(default_factory=dict)

    @property
    def limited(self) -> int:
        """How many sessions are capped now."""
        return sum(cap is not None for cap in self.caps.values())


class ComputeAdmission:
    """Shares the model's frame-reading capacity among sessions: see the module docstring.

    Feed :meth:`frame_read` after every frame read (any session), call :meth:`plan` every few seconds
    with each live session's offered frames per second, apply the caps and announce the changes.
    ``forget`` a session that ended. Rates are frames per second; times are seconds.
    """

    def __init__(self, frame_time_share: float = 0.8, *, hysteresis: float = 0.15, smoothing: float = 0.2,
                 seconds_per_frame: float | None = None, headroom: float = 0.1, min_frame_share: float = 0.2) -> None:
        if not (isinstance(frame_time_share, (int, float)) and 0 < frame_time_share <= 1):
            raise ConfigError(f"frame_time_share: must be a number in (0, 1], got {frame_time_share!r}")
        for name, value in (("headroom", headroom), ("min_frame_share", min_frame_share)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"{name}: must be a number in [0, 1), got {value!r}")
        if not (isinstance(hysteresis, (int, float)) and 0 <= hysteresis < 1):
            raise ConfigError(f"hysteresis: must be a number in [0, 1), got {hysteresis!r}")
        if not (isinstance(smoothing, (int, float)) and 0 < smoothing <= 1):
            raise ConfigError(f"smoothing: must be a number in (0, 1], got {smoothing!r}")
        # The most of the model's time frames may use; the rest is for answers and probes.
        self.frame_time_share = float(frame_time_share)
        # Share of the model's time kept idle so that work arriving is not queued (see frame_share).
        self.headroom = float(headroom)
        # The least of the model's time frames get, however much answers and probes use.
        self.min_frame_share = min(float(min_frame_share), self.frame_time_share)
        # Share of the model's time answers, probes and control used lately; None: not measured.
        self.others_share: float | None = None
        # Relative change of a session's allowed rate below which its cap stays as announced.
        self.hysteresis = float(hysteresis)
        # Weight of the newest measurement in the average of seconds per frame.
        self.smoothing = float(smoothing)
        # Model seconds per frame read (vision + prefill), averaged; None until the first read.
        self.seconds_per_frame: float | None = None
        self._capacity: float | None = None  # the capacity last planned for (see capacity_fps)
        if seconds_per_frame is not None:
            self.frame_read(seconds_per_frame)
        self._caps: dict[Hashable, float | None] = {}

    # ---- measurements -------------------------------------------------------------------------------
    def frame_read(self, model_seconds: float) -> None:
        """One frame was read in ``model_seconds`` of model time (its share of a batch, if batched)."""
        seconds = _check_rate("model_seconds", model_seconds)
        if seconds <= 0:
            return  # a read that took no measurable time says nothing about capacity
        if self.seconds_per_frame is None:
            self.seconds_per_frame = seconds
        else:
            self.seconds_per_frame += self.smoothing * (seconds - self.seconds_per_frame)

    def others_used(self, share: float) -> None:
        """Answers, probes and control used ``share`` (0-1) of the model's time lately (e.g. over the
        last few seconds): the frame share becomes what they leave (see :attr:`frame_share`)."""
        self.others_share = min(1.0, _check_rate("share", share))

    @property
    def frame_share(self) -> float:
        """The share of the model's time frames are planned for: ``1 - headroom - others_share`` within
        ``[min_frame_share, frame_time_share]``; ``frame_time_share`` until others are measured."""
        if self.others_share is None:
            return self.frame_time_share
        return max(self.min_frame_share, min(self.frame_time_share, 1.0 - self.headroom - self.others_share))

    @property
    def measured_capacity_fps(self) -> float | None:
        """Frames per second the model reads within its frame share, from the latest average; None before the first read."""
        if self.seconds_per_frame is None:
            return None
        return self.frame_share / self.seconds_per_frame

    @property
    def capacity_fps(self) -> float | None:
        """The capacity plans are made for: the measured one, moved only when the measurement moves by
        more than half the hysteresis (so noise in the timings does not move every cap). None before the first read."""
        measured = self.measured_capacity_fps
        if measured is None:
            return None
        if self._capacity is None or abs(measured - self._capacity) > 0.5 * self.hysteresis * self._capacity:
            self._capacity = measured
        return self._capacity

    def cap_of(self, key: Hashable) -> float | None:
        """The cap last planned for this session (None: not limited)."""
        return self._caps.get(key)

    def admit(self, key: Hashable, sessions: int) -> float | None:
        """A new session joins while the model is saturated: it starts capped at an even split of the
        capacity among ``sessions`` (the newcomer included), before its offered rate is measured; None
        (no cap) when nobody is capped now or nothing is measured. The next :meth:`plan` treats the cap
        as any other (moved, kept or lifted), so a session that reconnects again and again does not
        read uncapped each time it is new."""
        capacity = self.capacity_fps
        if capacity is None or sessions < 1 or not any(cap is not None for cap in self._caps.values()):
            return None
        self._caps[key] = capacity / sessions
        return self._caps[key]

    def forget(self, key: Hashable) -> None:
        """The session ended: its share goes to the others at the next :meth:`plan`."""
        self._caps.pop(key, None)

    # ---- the plan ------------------------------------------------------------------------------------
    def plan(self, offered: Mapping[Hashable, float]) -> ReadPlan:
        """Each session's cap for the ``offered`` frames per second (every live session, 0 for a quiet one).

        Sessions not in ``offered`` are forgotten. Guarantees: ``sum(allowed) <= capacity`` (when
        measured), ``allowed <= offered`` for each session, sessions offering more than their share get
        equal rates on a fresh plan (within ``hysteresis`` of each other afterwards), nobody is capped
        on a fresh plan whose offers fit in the capacity, and nobody is capped at all while the offers
        fit in ``1 - hysteresis`` of it (the margin keeps a total hovering at capacity from flapping).
        """
        offers = {key: _check_rate(f"offered[{key!r}]", rate) for key, rate in offered.items()}
        old = {key: self._caps.get(key) for key in offers}
        capacity = self.capacity_fps
        if capacity is None or sum(offers.values()) <= (1 - self.hysteresis) * capacity:
            # Room to spare (with a margin, so that a total hovering at capacity does not flap): no caps at all.
            self._caps = dict.fromkeys(offers)
            changes = {key: None for key, cap in old.items() if cap is not None}
            return ReadPlan(capacity, dict(self._caps), dict(offers), changes)
        if sum(offers.values()) <= capacity:
            targets: dict[Hashable, float | None] = dict.fromkeys(offers)
        else:
            shares = fair_shares(capacity, offers)
            # A session that gets its whole offer is not capped; the others are capped at their share.
            targets = {key: (None if shares[key] >= offers[key] else shares[key]) for key in offers}
        caps = {key: old[key] if self._close(offers[key], old[key], targets[key]) else targets[key] for key in offers}
        if capacity is not None and sum(_allowed(offers[k], caps[k]) for k in offers) > capacity:
            # Keeping some caps would oversubscribe: every cap above its target goes down to it now.
            caps = {k: targets[k] if _allowed(offers[k], caps[k]) > _allowed(offers[k], targets[k]) else caps[k] for k in offers}
        changes = {key: cap for key, cap in caps.items() if cap != old[key]}
        self._caps = caps
        return ReadPlan(capacity, dict(caps), {k: _allowed(offers[k], caps[k]) for k in offers}, changes)

    def _close(self, offer: float, old: float | None, target: float | None) -> bool:
        """Whether keeping cap ``old`` leaves the session within ``hysteresis`` of what ``target`` allows."""
        if old == target:
            return True
        if target is None:  # lifting: keep a cap only while it stays near the offer (else it means nothing)
            return old is not None and (1 - self.hysteresis) * old < offer <= (1 + self.hysteresis) * old
        if old is None:  # setting one: not for an offer that is already within reach of the target
            return offer <= (1 + self.hysteresis) * target
        return abs(old - target) <= self.hysteresis * target


def _allowed(offer: float, cap: float | None) -> float:
    return offer if cap is None else min(offer, cap)
