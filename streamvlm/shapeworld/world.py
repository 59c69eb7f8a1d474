"""ShapeWorld: a procedurally rendered synthetic live world whose ground truth is known.

Coloured shapes (circle, square, triangle) enter a dark-grey canvas, drift along straight lines that
bounce off the borders, sometimes change colour, and leave again. Everything that happens is recorded
in an event log (:class:`WorldEvent`), so answers to questions about the stream can be checked offline.

Conventions:

* Event times are whole seconds. A shape is visible at ``t`` when ``enter_t <= t < leave_t`` (a shape
  without a ``leave`` event stays until the end). A ``change_colour`` at ``t`` is in effect from ``t`` on.
* Frames are ``size x size x 3`` uint8 RGB. The background is never zero (SmolVLM treats all-zero pixel
  values as padding).
* Everything is deterministic per seed (``numpy.random.default_rng``). No torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Iterator, Literal

import cv2
import numpy as np

from streamvlm.errors import ConfigError

__all__ = [
    "SHAPES",
    "COLOURS",
    "WorldEvent",
    "ShapeState",
    "Episode",
    "make_episode",
    "make_long_episode",
    "shape_radius",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
}

_BACKGROUND = 40  # dark grey level before the per-seed tint
_TINT = 8  # the tint moves each channel by at most this much

EventKind = Literal["enter", "leave", "change_colour"]


@dataclass(frozen=True)
class WorldEvent:
    """One entry of an episode's ground-truth log."""

    t: float
    kind: EventKind
    shape_id: int
    shape: str
    colour: str  # the colour from this event on (for "leave": the colour it left with)
    old_colour: str | None = None  # only for "change_colour"


@dataclass(frozen=True)
class ShapeState:
    """A shape on screen at some time: its identity, current colour and centre in pixels."""

    shape_id: int
    shape: str
    colour: str
    x: float
    y: float


def shape_radius(size: int) -> int:
    """Radius in pixels of every shape on a ``size`` canvas: 10 px at 64, scaled linearly."""
    return max(10, int(round(10 * size / 64)))


@lru_cache(maxsize=4096)
def _motion(seed: int, shape_id: int, size: int) -> tuple[float, float, float, float]:
    """Start position and velocity (px/s) of a shape, derived from the seed and its id."""
    rng = np.random.default_rng([seed, shape_id, 7919])
    r = shape_radius(size)
    lo, hi = float(r), float(size - 1 - r)
    x0, y0 = rng.uniform(lo, hi, size=2)
    speed = rng.uniform(0.08, 0.25) * size
    angle = rng.uniform(0.0, 2 * math.pi)
    return float(x0), float(y0), speed * math.cos(angle), speed * math.sin(angle)


def _bounce(p0: float, v: float, dt: float, lo: float, hi: float) -> float:
    """Position after ``dt`` seconds moving at ``v`` from ``p0``, reflecting off ``lo`` and ``hi``."""
    span = hi - lo
    if span <= 0:
        return lo
    u = (p0 - lo + v * dt) % (2 * span)
    if u > span:
        u = 2 * span - u
    return lo + u


def _background(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 104729])
    tint = rng.integers(-_TINT, _TINT + 1, size=3)
    return np.clip(_BACKGROUND + tint, 1, 255).astype(np.uint8)


@dataclass(frozen=True)
class Episode:
    """A ShapeWorld episode: parameters plus the full event log. Frames are rendered on demand."""

    seed: int
    duration_s: float
    fps: float
    size: int
    events: tuple[WorldEvent, ...]

    # -- ground truth -------------------------------------------------------------------------
    def visible(self, t: float) -> list[ShapeState]:
        """Shapes on screen at time ``t``, ordered by ``shape_id`` (which is also drawing order)."""
        _check_time(t)
        alive: dict[int, list] = {}  # shape_id -> [shape, colour, enter_t]
        for ev in sorted(self.events, key=lambda e: e.t):
            if ev.t > t:
                break
            if ev.kind == "enter":
                alive[ev.shape_id] = [ev.shape, ev.colour, ev.t]
            elif ev.kind == "leave":
                alive.pop(ev.shape_id, None)
            elif ev.kind == "change_colour" and ev.shape_id in alive:
                alive[ev.shape_id][1] = ev.colour
        r = shape_radius(self.size)
        lo, hi = float(r), float(self.size - 1 - r)
        out = []
        for sid in sorted(alive):
            shape, colour, t0 = alive[sid]
            x0, y0, vx, vy = _motion(self.seed, sid, self.size)
            x = _bounce(x0, vx, t - t0, lo, hi)
            y = _bounce(y0, vy, t - t0, lo, hi)
            out.append(ShapeState(sid, shape, colour, x, y))
        return out

    # -- pixels -------------------------------------------------------------------------------
    def render(self, t: float) -> np.ndarray:
        """The ``size x size x 3`` uint8 RGB frame at time ``t``."""
        frame = np.empty((self.size, self.size, 3), dtype=np.uint8)
        frame[:] = _background(self.seed)
        r = shape_radius(self.size)
        for s in self.visible(t):
            colour = tuple(int(c) for c in COLOURS[s.colour])
            cx, cy = int(round(s.x)), int(round(s.y))
            if s.shape == "circle":
                cv2.circle(frame, (cx, cy), r, colour, thickness=-1, lineType=cv2.LINE_AA)
            elif s.shape == "square":
                h = int(round(r * 0.85))
                cv2.rectangle(frame, (cx - h, cy - h), (cx + h, cy + h), colour, thickness=-1)
            else:  # triangle, pointing up, inscribed in the radius circle, centroid at (cx, cy)
                pts = np.array(
                    [
                        (cx, cy - r),
                        (cx - round(r * 0.866), cy + round(r * 0.5)),
                        (cx + round(r * 0.866), cy + round(r * 0.5)),
                    ],
                    dtype=np.int32,
                )
                cv2.fillPoly(frame, [pts], colour, lineType=cv2.LINE_AA)
        return frame

    def frame_times(self) -> list[float]:
        """The times ``frames()`` renders at: ``i / fps`` for every ``i`` with ``i / fps < duration_s``."""
        n = int(math.ceil(self.duration_s * self.fps - 1e-9))
        return [i / self.fps for i in range(n)]

    def frames(self) -> Iterator[tuple[float, np.ndarray]]:
        """``(t, frame)`` pairs at ``fps`` from 0 up to (not including) ``duration_s``."""
        for t in self.frame_times():
            yield t, self.render(t)

    def to_dict(self) -> dict:
        """A JSON-ready description of the episode (parameters and event log)."""
        return {
            "seed": self.seed,
            "duration_s": self.duration_s,
            "fps": self.fps,
            "size": self.size,
            "events": [asdict(e) for e in self.events],
        }


def _check_time(t: float) -> None:
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
        raise ConfigError(f"t must be a finite number >= 0, got {t!r}")


def _check_args(seed, duration_s, fps, size, max_shapes) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    if not is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if not is_num(duration_s) or not math.isfinite(duration_s) or not 2.0 <= duration_s <= 86400.0:
        raise ConfigError(f"duration_s must be between 2 and 86400 seconds, got {duration_s!r}")
    if not is_num(fps) or not math.isfinite(fps) or not 0 < fps <= 60:
        raise ConfigError(f"fps must be in (0, 60], got {fps!r}")
    if not is_int(size) or not 32 <= size <= 2048:
        raise ConfigError(f"size must be an integer between 32 and 2048, got {size!r}")
    if not is_int(max_shapes) or not 1 <= max_shapes <= 8:
        raise ConfigError(f"max_shapes must be an integer between 1 and 8, got {max_shapes!r}")


def make_episode(
    seed: int,
    duration_s: float = 30.0,
    fps: float = 2.0,
    size: int = 64,
    max_shapes: int = 3,
) -> Episode:
    """A deterministic episode for ``seed``.

    Each of ``max_shapes`` slots runs a sequence of shapes (enter, live 4 s or more, leave, gap of 1 s or
    more, next), so never more than ``max_shapes`` are on screen. The first slot's first shape enters
    within the first 10 % of the episode. About 40 % of shapes change colour once while on screen.
    """
    _check_args(seed, duration_s, fps, size, max_shapes)
    seed, size, max_shapes = int(seed), int(size), int(max_shapes)
    duration_s, fps = float(duration_s), float(fps)
    rng = np.random.default_rng(seed)
    last = int(math.ceil(duration_s)) - 1  # latest whole second strictly before the end
    min_life, max_life = 4, max(5, int(duration_s * 0.4))

    lives = []  # (enter_t, slot, leave_t or None)
    for slot in range(max_shapes):
        if slot == 0:
            t = int(rng.integers(0, int(math.floor(0.1 * duration_s)) + 1))
        else:
            t = int(rng.integers(1, max(2, int(duration_s * 0.5))))
        while t <= last:
            leave = t + int(rng.integers(min_life, max_life + 1))
            lives.append((t, slot, leave if leave < duration_s else None))
            if leave >= duration_s:
                break
            t = leave + int(rng.integers(1, 6))

    lives.sort()
    events: list[WorldEvent] = []
    for sid, (enter, _slot, leave) in enumerate(lives):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        names = list(COLOURS)
        colour = names[int(rng.integers(len(names)))]
        events.append(WorldEvent(float(enter), "enter", sid, shape, colour))
        end = leave if leave is not None else last + 1
        if rng.random() < 0.4 and end - enter >= 2:
            tc = int(rng.integers(enter + 1, end))
            new = [c for c in names if c != colour][int(rng.integers(len(names) - 1))]
            events.append(WorldEvent(float(tc), "change_colour", sid, shape, new, old_colour=colour))
            colour = new
        if leave is not None:
            events.append(WorldEvent(float(leave), "leave", sid, shape, colour))

    order = {"leave": 0, "change_colour": 1, "enter": 2}
    events.sort(key=lambda e: (e.t, order[e.kind], e.shape_id))
    return Episode(seed, duration_s, fps, size, tuple(events))


def make_long_episode(seed: int, duration_s: float = 300.0, fps: float = 1.0, size: int = 64, max_shapes: int = 3) -> Episode:
    """A deterministic episode where memory matters: events spread over minutes, the same things coming back.

    Unlike :func:`make_episode` (whose shapes may stay for 40 % of the episode), every shape stays 4-12 s
    and each of the ``max_shapes`` slots waits 10-40 s before its next shape, so a 300 s episode holds
    about 25 short visits spread over all five minutes. Shapes are drawn from a per-seed palette of five
    colour x shape combinations, one of them drawn once per episode at most and the others freely, so
    the same thing appears several times (its first and last appearance differ) while a few things
    appear exactly once; a question at minute 4 about one of those must find a single frame among
    hundreds that look alike. Same conventions and checks as :func:`make_episode` (whole-second
    events, at most ``max_shapes`` on screen, deterministic per seed, ``ConfigError`` for bad arguments).
    """
    _check_args(seed, duration_s, fps, size, max_shapes)
    seed, size, max_shapes = int(seed), int(size), int(max_shapes)
    duration_s, fps = float(duration_s), float(fps)
    rng = np.random.default_rng([seed, 3001])
    last = int(math.ceil(duration_s)) - 1
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    palette = [combos[int(i)] for i in rng.permutation(len(combos))[:5]]
    lives = []  # (enter_t, slot, leave_t or None)
    for slot in range(max_shapes):
        t = int(rng.integers(0, 6)) if slot == 0 else int(rng.integers(5, 30))
        while t <= last:
            leave = t + int(rng.integers(4, 13))
            lives.append((t, slot, leave if leave < duration_s else None))
            if leave >= duration_s:
                break
            t = leave + int(rng.integers(10, 41))
    lives.sort()
    events: list[WorldEvent] = []
    once_used = False
    for sid, (enter, _slot, leave) in enumerate(lives):
        pick = int(rng.integers(len(palette)))
        if pick == 0 and once_used:  # the palette's first combination appears once at most
            pick = 1 + int(rng.integers(len(palette) - 1))
        once_used = once_used or pick == 0
        colour, shape = palette[pick]
        events.append(WorldEvent(float(enter), "enter", sid, shape, colour))
        if leave is not None:
            events.append(WorldEvent(float(leave), "leave", sid, shape, colour))
    order = {"leave": 0, "change_colour": 1, "enter": 2}
    events.sort(key=lambda e: (e.t, order[e.kind], e.shape_id))
    return Episode(seed, duration_s, fps, size, tuple(events))
