"""Timestamp-based frame-rate sampling.

`FpsSampler` decides, frame by frame, which frames of a stream to keep so that
the kept frames follow a target rate. The decision uses each frame's
presentation time in seconds, never the frame count, so it stays correct for
variable-frame-rate sources, dropped frames and sources slower than the target.
"""

from __future__ import annotations

import math
from numbers import Real

from streamvlm.errors import ConfigError, TimestampError

__all__ = ["FpsSampler"]

# Timestamps within this many seconds before a slot boundary count as being on
# the boundary. Container clocks round timestamps (to 1 ms in some formats), so
# a frame meant to start a slot can arrive a hair early.
_MAX_TOLERANCE_S = 1e-3
# The tolerance never exceeds this fraction of one slot, so high target rates
# are not distorted by it.
_TOLERANCE_FRACTION_OF_SLOT = 0.01


class FpsSampler:
    """Keeps frames at a target rate, judged by their timestamps.

    Time is divided into slots of length ``1 / fps`` anchored at the first
    offered timestamp: slot ``k`` is ``[first_pts + k/fps, first_pts + (k+1)/fps)``.
    The first frame offered in each slot is kept; later frames in the same slot
    are dropped. Consequences for the caller:

    * A 30 fps source sampled at 1 fps keeps the frames at (or just after)
      0 s, 1 s, 2 s, ... relative to the first frame, with no drift over time.
    * A source slower than the target (frames skip slots) has every frame kept;
      the next slot is the one after the kept frame, so no burst of frames is
      emitted to "catch up".
    * Because slots are anchored to the first frame, the average rate is exact,
      but two kept frames can be closer than ``1 / fps`` when one arrives late
      in its slot and the next arrives early in the following slot. No slot
      ever holds more than one kept frame.

    One sampler serves one stream; create a new one to start over.
    """

    def __init__(self, fps: float) -> None:
        """Creates a sampler for the target rate ``fps`` (frames per second).

        Raises `ConfigError` if ``fps`` is not a finite number greater than 0.
        """
        if isinstance(fps, bool) or not isinstance(fps, Real):
            raise ConfigError(f"fps must be a number, got {fps!r}")
        if not math.isfinite(fps) or fps <= 0:
            raise ConfigError(f"fps must be a finite number greater than 0, got {fps!r}")
        self._fps = float(fps)
        self._interval_s = 1.0 / self._fps
        self._tolerance_s = min(_MAX_TOLERANCE_S, _TOLERANCE_FRACTION_OF_SLOT * self._interval_s)
        self._first_pts: float | None = None
        self._last_pts: float | None = None
        self._last_kept_slot: int = -1

    @property
    def fps(self) -> float:
        """The target rate in frames per second."""
        return self._fps

    @property
    def tolerance_s(self) -> float:
        """How early (in seconds) a timestamp may be and still count as reaching a slot."""
        return self._tolerance_s

    def slot_of(self, pts_s: float) -> int:
        """Returns the index of the slot that ``pts_s`` falls into.

        Slot 0 starts at the first timestamp offered. Before any frame has been
        offered, returns 0 (the frame would start slot 0).
        """
        if self._first_pts is None:
            return 0
        return math.floor((pts_s - self._first_pts + self._tolerance_s) * self._fps)

    def offer(self, pts_s: float) -> bool:
        """Reports whether the frame with presentation time ``pts_s`` should be kept.

        Call once per frame, in stream order. Returns True for the first frame
        and for the first frame in each later slot; the caller keeps the frame
        when True and discards it when False. Equal consecutive timestamps are
        allowed (the repeat lands in the same slot and is dropped).

        Raises `TimestampError` if ``pts_s`` is not finite or is earlier than
        the previous timestamp offered; the sampler's state is then unchanged,
        so the caller may skip that frame and go on.
        """
        if isinstance(pts_s, bool) or not isinstance(pts_s, Real):
            raise TimestampError(f"frame timestamp must be a number, got {pts_s!r}")
        if not math.isfinite(pts_s):
            raise TimestampError(f"frame timestamp must be finite, got {pts_s!r}")
        if self._last_pts is not None and pts_s < self._last_pts:
            raise TimestampError(
                f"frame timestamp went backwards: {pts_s!r} s after {self._last_pts!r} s"
            )
        self._last_pts = float(pts_s)
        if self._first_pts is None:
            self._first_pts = float(pts_s)
            self._last_kept_slot = 0
            return True
        slot = self.slot_of(pts_s)
        if slot <= self._last_kept_slot:
            return False
        self._last_kept_slot = slot
        return True
