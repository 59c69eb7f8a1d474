"""Stream time: one clock per session that every source's frames are stamped on.

Each frame gets a stream time in seconds, non-decreasing across the session, whatever its source
says. A source brings one of three kinds of time:

* none (an RTSP/HTTP camera, a socket frame without ``pts_s``): the frame is stamped with the
  session's current time, which runs on the receive clock between frames;
* the sender's seconds (a socket frame's ``pts_s``): kept as they are while they behave, so a
  client's own timestamps come back unchanged in evidence;
* RTP ticks (a WebRTC track): 32-bit timestamps at a clock rate (RFC 3550, section 5.1), starting at
  a random value and wrapping every 2**32 ticks (13.25 h at 90 kHz). They are unwrapped, and the
  first frame of the track is placed at the session's current time.

After the first frame a source advances by its own timestamp deltas. A step that goes backwards, or
leaps forward further than the receive clock by more than ``max_jump_s`` (a camera restart, a sender
reset, a new random RTP origin), *rebases*: the frame is stamped where the receive clock says, and
the source's deltas count from there. With ``max_lag_s`` set, a source whose time falls behind the
receive clock by more than that (frozen timestamps) is caught up the same way. So the clock never
goes backwards, never freezes for good, and never leaps.

This module is pure: no I/O, no threads, no clock reads. The receive time is passed in by the
caller (seconds on any monotonic clock, e.g. ``time.monotonic()``), so tests drive it with numbers.
It knows nothing about frames or sessions beyond their times: the caller puts the returned stream
time on the :class:`~streamvlm.types.Frame` and applies rate limits itself. docs/clocks.md has the
policy per source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from streamvlm.errors import ConfigError, TimestampError

__all__ = ["ClockPolicy", "SessionClock", "SourceClock", "RECEIVE_TIME", "SENDER_TIME", "RTP_TIME", "RTP_WRAP"]

#: RTP timestamps are 32-bit unsigned integers (RFC 3550, section 5.1): they wrap at this value.
RTP_WRAP = 1 << 32


@dataclass(frozen=True)
class ClockPolicy:
    """How one source's own timestamps become stream time. Invalid values raise :class:`ConfigError`."""

    #: The first frame keeps its own time when that is not behind the session's latest stream time
    #: (a socket client's ``pts_s``). False: the first frame is placed at the session's current time
    #: (RTP, whose origin is random).
    keep_sender_time: bool = False
    #: A forward step larger than the receive clock's step plus this many seconds is a reset, not
    #: elapsed time: the frame is rebased on the receive clock. None: any forward step is believed.
    max_jump_s: float | None = 60.0
    #: How far (seconds) the source's time may fall behind the receive clock, summed over its frames,
    #: before stream time follows the receive clock instead (frozen or slow timestamps). None: the
    #: source may run slower than real time (a program stepping through a recording).
    max_lag_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.keep_sender_time, bool):
            raise ConfigError(f"keep_sender_time: must be a bool, got {self.keep_sender_time!r}")
        for name in ("max_jump_s", "max_lag_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Real)
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{name}: must be a finite number of seconds > 0 or None, got {value!r}")


#: Frames without a time of their own (RTSP/HTTP cameras, socket frames without ``pts_s``).
RECEIVE_TIME = ClockPolicy()
#: Socket frames with the sender's ``pts_s``: kept as sent; a sender may replay faster or slower than
#: real time; backward steps and leaps of more than a minute beyond the receive clock rebase.
SENDER_TIME = ClockPolicy(keep_sender_time=True, max_jump_s=60.0, max_lag_s=None)
#: WebRTC (RTP) tracks: the capture clock of a live camera, so it follows real time; the first frame
#: lands at the session's current time, leaps of 10 s and lags of 5 s rebase.
RTP_TIME = ClockPolicy(keep_sender_time=False, max_jump_s=10.0, max_lag_s=5.0)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise TimestampError(f"{name}: must be a finite number of seconds, got {value!r}")
    return float(value)


class SessionClock:
    """The stream time of one session, shared by all its sources; non-decreasing across them.

    Get a source's clock with :meth:`source` (or stamp through :meth:`stamp` / :meth:`stamp_rtp`,
    which do that for you), put the returned time on the frame, and hand the frame on. ``start_t``
    is the stream time before the first frame (0 for a new session; a restored session's latest time
    when it continues from a snapshot). ``origin_s``, when given, is the receive time at which the
    stream time was ``start_t`` (the session opened): the clock then runs from there, so a first frame
    without a time of its own (or a WebRTC track's first frame) lands at the time elapsed since the
    session opened, as a client's own clock started then would say.
    """

    def __init__(self, start_t: float = 0.0, origin_s: float | None = None) -> None:
        self._last_t = _finite("start_t", start_t)
        self._last_received: float | None = None if origin_s is None else _finite("origin_s", origin_s)
        self._sources: dict[str, SourceClock] = {}

    @property
    def last_t(self) -> float:
        """The latest stream time stamped (``start_t`` before the first frame)."""
        return self._last_t

    def now(self, received_s: float) -> float:
        """The session's current stream time at receive time ``received_s``: the latest stamped time,
        advanced by the receive time elapsed since that frame arrived (``start_t`` before any frame)."""
        received = _finite("received_s", received_s)
        if self._last_received is None:
            return self._last_t
        return self._last_t + max(0.0, received - self._last_received)

    def source(self, source_id: str, policy: ClockPolicy = SENDER_TIME) -> SourceClock:
        """The clock of ``source_id``, created with ``policy`` on first use (later calls return it as it is)."""
        clock = self._sources.get(source_id)
        if clock is None:
            clock = self._sources[source_id] = SourceClock(policy, session=self)
        return clock

    def forget(self, source_id: str) -> None:
        """Drop ``source_id``'s clock (a track that ended): its next frame starts afresh at the session's time."""
        self._sources.pop(source_id, None)

    def stamp(self, source_id: str, pts_s: float | None, received_s: float, *, policy: ClockPolicy | None = None) -> float:
        """Stream time of a frame from ``source_id`` with the sender's ``pts_s`` (None: none given).

        ``policy`` applies when the source is new: :data:`SENDER_TIME` when ``pts_s`` is given,
        :data:`RECEIVE_TIME` otherwise. Raises :class:`TimestampError` for a non-finite time.
        """
        default = SENDER_TIME if pts_s is not None else RECEIVE_TIME
        return self.source(source_id, policy or default).stamp(pts_s, received_s)

    def stamp_rtp(self, source_id: str, timestamp: int | None, clock_rate: int | None, received_s: float, *,
                  policy: ClockPolicy = RTP_TIME) -> float:
        """Stream time of an RTP frame (``timestamp`` ticks at ``clock_rate`` Hz, wrapping at 2**32).

        A frame without a timestamp (``None``) is stamped on the receive clock.
        """
        clock = self.source(source_id, policy)
        if timestamp is None or clock_rate is None:
            return clock.stamp(None, received_s)
        return clock.stamp_rtp(timestamp, clock_rate, received_s)

    def _record(self, t: float, received_s: float) -> None:
        self._last_t = t
        if self._last_received is None or received_s > self._last_received:
            self._last_received = received_s


class SourceClock:
    """Turns one source's timestamps into stream time on its session's clock.

    Call :meth:`stamp` (seconds) or :meth:`stamp_rtp` (RTP ticks) once per frame, in arrival order;
    both return the stream time to put on the frame, never less than any time stamped before in the
    session. ``rebases`` counts the rebases by reason (``backward``, ``leap``, ``lag``, ``units``);
    a caller may export them as metrics. Without ``session`` the clock has a session of its own.
    """

    def __init__(self, policy: ClockPolicy = SENDER_TIME, *, session: SessionClock | None = None) -> None:
        if not isinstance(policy, ClockPolicy):
            raise ConfigError(f"policy: must be a ClockPolicy, got {policy!r}")
        self.policy = policy
        self.session = session if session is not None else SessionClock()
        self.rebases: dict[str, int] = {"backward": 0, "leap": 0, "lag": 0, "units": 0}
        self._last_t: float | None = None  # this source's latest stream time
        self._last_received: float | None = None  # the latest receive time seen from this source
        # The current segment: stream time = anchor_t + (position - anchor_pos) / rate, where a position
        # is seconds (rate 1) or RTP ticks (rate = clock rate, integers subtracted exactly).
        self._rate: int | float | None = None
        self._anchor_pos: int | float = 0
        self._anchor_t = 0.0
        self._identity = False  # anchor_t == anchor_pos in seconds: the sender's time is kept exactly
        self._last_pos: int | float = 0
        self._lag = 0.0  # seconds the source has fallen behind the receive clock (never below 0)
        self._rtp_raw: int | None = None  # the latest RTP timestamp as given, and its unwrapped value
        self._rtp_ext = 0

    @property
    def last_t(self) -> float | None:
        """This source's latest stream time (None before its first frame)."""
        return self._last_t

    def stamp(self, source_pts_s: float | None, received_s: float) -> float:
        """Stream time of a frame with the source's time ``source_pts_s`` in seconds (None: the frame has
        no time of its own, and is stamped with the session's current time), received at ``received_s``.

        Raises :class:`TimestampError` for a non-finite time; nothing changes then.
        """
        received = _finite("received_s", received_s)
        if source_pts_s is None:
            return self._receive_time(received)
        return self._advance(_finite("source_pts_s", source_pts_s), 1, received)

    def stamp_rtp(self, timestamp: int, clock_rate: int, received_s: float) -> float:
        """Stream time of a frame with RTP timestamp ``timestamp`` (ticks at ``clock_rate`` Hz).

        Timestamps are compared modulo 2**32 (RFC 3550): a step of less than half the range forwards
        is time going on, anything else is a step backwards, so a wrap is unwrapped rather than read
        as a reset. Already-unwrapped counters (as some RTP stacks hand out) work the same way.
        Raises :class:`TimestampError` for a timestamp that is not an integer or a rate that is not a
        positive integer.
        """
        if isinstance(timestamp, bool) or not isinstance(timestamp, Integral):
            raise TimestampError(f"timestamp: must be an integer number of RTP ticks, got {timestamp!r}")
        if isinstance(clock_rate, bool) or not isinstance(clock_rate, Integral) or clock_rate <= 0:
            raise TimestampError(f"clock_rate: must be a positive integer (Hz), got {clock_rate!r}")
        received = _finite("received_s", received_s)
        timestamp, rate = int(timestamp), int(clock_rate)
        if self._rtp_raw is None or self._rate != rate:
            ext = timestamp % RTP_WRAP
        else:
            step = (timestamp - self._rtp_raw) % RTP_WRAP
            ext = self._rtp_ext + (step - RTP_WRAP if step >= RTP_WRAP // 2 else step)
        t = self._advance(ext, rate, received)
        self._rtp_raw, self._rtp_ext = timestamp, ext
        return t

    # ---- the rules -----------------------------------------------------------------------------
    def _receive_time(self, received: float) -> float:
        """A frame without a time of its own: the session's current time. The segment ends."""
        self._rate = None
        self._lag = 0.0
        return self._emit(self.session.now(received), received)

    def _advance(self, pos: int | float, rate: int | float, received: float) -> float:
        policy = self.policy
        recv_step = 0.0 if self._last_received is None else max(0.0, received - self._last_received)
        if self._rate is None or self._rate != rate:
            # The first frame of a segment: the source is new, came back after frames without a time
            # of their own, or changed units.
            if self._last_t is None:
                if policy.keep_sender_time and rate == 1 and pos >= self.session.last_t:
                    t = float(pos)
                else:
                    t = self.session.now(received)
            else:
                self.rebases["units"] += self._rate is not None
                t = self._last_t + recv_step + self._lag
            return self._start_segment(pos, rate, t, received)
        step = (pos - self._last_pos) / rate
        if step < 0:
            self.rebases["backward"] += 1
            return self._start_segment(pos, rate, self._last_t + recv_step + self._lag, received)  # type: ignore[operator]
        if policy.max_jump_s is not None and step - recv_step > policy.max_jump_s:
            self.rebases["leap"] += 1
            return self._start_segment(pos, rate, self._last_t + recv_step + self._lag, received)  # type: ignore[operator]
        if self._identity:
            t = float(pos)
        else:
            t = self._anchor_t + (pos - self._anchor_pos) / rate
        if policy.max_lag_s is not None:
            self._lag = max(0.0, self._lag + recv_step - step)
            if self._lag > policy.max_lag_s:
                self.rebases["lag"] += 1
                return self._start_segment(pos, rate, t + self._lag, received)
        self._last_pos = pos
        return self._emit(t, received)

    def _start_segment(self, pos: int | float, rate: int | float, t: float, received: float) -> float:
        t = max(t, self.session.last_t)
        self._rate, self._anchor_pos, self._anchor_t, self._last_pos = rate, pos, t, pos
        self._identity = rate == 1 and t == pos
        self._lag = 0.0
        return self._emit(t, received)

    def _emit(self, t: float, received: float) -> float:
        t = max(t, self.session.last_t)
        self._last_t = t
        if self._last_received is None or received > self._last_received:
            self._last_received = received
        self.session._record(t, received)
        return t
