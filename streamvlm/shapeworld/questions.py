"""Questions about a ShapeWorld episode with ground-truth answers, in the spirit of OVO-Bench.

Categories:

* ``realtime``: about the frame at the question time ("What shape is on screen now?" when exactly one
  shape is visible; "How many shapes are visible?").
* ``backward``: about the past ("What colour was the first shape?" - its colour when it entered;
  "When did the <colour> <shape> appear?" - answered in whole seconds, e.g. ``"12"``).
* ``forward``: asked before the fact ("Tell me when a <colour> <shape> appears."); the answer is the
  appearance time in whole seconds, to be met within ``tolerance_s`` (StreamingBench-style).
* ``probe``: yes/no about the present ("Is there a <colour> <shape> now?").

Questions are asked at half-second offsets (``k + 0.5``), never on an event time, and only when their
answer is well-defined (a unique referent). All ground truth is computed from the event log.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamvlm.errors import ConfigError
from streamvlm.shapeworld.world import COLOURS, SHAPES, Episode

__all__ = ["QA", "CATEGORIES", "make_questions", "FORWARD_TOLERANCE_S"]

CATEGORIES: tuple[str, ...] = ("realtime", "backward", "forward", "probe")
FORWARD_TOLERANCE_S = 2.0
_FORWARD_HORIZON_S = 15.0  # a forward question is asked at most this long before the appearance


@dataclass(frozen=True)
class QA:
    """A question at stream time ``t`` with its ground-truth answer (lower-case word or integer)."""

    t: float
    category: str
    question: str
    answer: str
    tolerance_s: float | None = None


def _seconds(t: float) -> str:
    return str(int(round(t)))


def _visible_combos(episode: Episode, t: float) -> list[tuple[str, str]]:
    return [(s.colour, s.shape) for s in episode.visible(t)]


def _candidates(episode: Episode) -> dict[str, list[QA]]:
    events = sorted(episode.events, key=lambda e: e.t)
    enters = [e for e in events if e.kind == "enter"]
    changes = [e for e in events if e.kind == "change_colour"]
    times = [k + 0.5 for k in range(int(episode.duration_s)) if k + 0.5 < episode.duration_s]
    out: dict[str, list[QA]] = {c: [] for c in CATEGORIES}

    for t in times:
        vis = episode.visible(t)
        combos = [(s.colour, s.shape) for s in vis]
        # realtime
        if len(vis) == 1:
            out["realtime"].append(QA(t, "realtime", "What shape is on screen now?", vis[0].shape))
        out["realtime"].append(QA(t, "realtime", "How many shapes are visible?", str(len(vis))))
        # probe
        for colour, shape in sorted(set(combos)):
            out["probe"].append(QA(t, "probe", f"Is there a {colour} {shape} now?", "yes"))
        for colour in COLOURS:
            for shape in SHAPES:
                if (colour, shape) not in combos:
                    out["probe"].append(QA(t, "probe", f"Is there a {colour} {shape} now?", "no"))
        # backward: first shape's colour (unique first entry)
        past = [e for e in enters if e.t < t]
        if past and sum(1 for e in past if e.t == past[0].t) == 1:
            out["backward"].append(
                QA(t, "backward", "What colour was the first shape?", past[0].colour)
            )
        # backward: when did the <colour> <shape> appear (exactly one entry, never changed into it)
        for e in past:
            same = [p for p in past if (p.colour, p.shape) == (e.colour, e.shape)]
            into = [c for c in changes if c.t < t and (c.colour, c.shape) == (e.colour, e.shape)]
            if len(same) == 1 and not into:
                out["backward"].append(
                    QA(t, "backward", f"When did the {e.colour} {e.shape} appear?", _seconds(e.t))
                )
        # forward: the next appearance of a combo not on screen now
        for e in enters:
            if not t < e.t <= t + _FORWARD_HORIZON_S or (e.colour, e.shape) in combos:
                continue
            combo = (e.colour, e.shape)
            earlier = [p for p in enters if t < p.t < e.t and (p.colour, p.shape) == combo]
            into = [c for c in changes if t < c.t <= e.t and (c.colour, c.shape) == combo]
            twins = [p for p in enters if p.t == e.t and (p.colour, p.shape) == combo]
            if not earlier and not into and len(twins) == 1:
                out["forward"].append(
                    QA(
                        t,
                        "forward",
                        f"Tell me when a {e.colour} {e.shape} appears.",
                        _seconds(e.t),
                        tolerance_s=FORWARD_TOLERANCE_S,
                    )
                )
    return out


def make_questions(episode: Episode, rng_seed: int, per_category: int = 2) -> list[QA]:
    """Up to ``per_category`` well-defined questions of each category, sorted by time.

    Fewer are returned for a category where the episode offers fewer well-defined questions. Probe
    questions alternate between "yes" and "no" answers where both exist.
    """
    if not isinstance(episode, Episode):
        raise ConfigError(f"episode must be an Episode, got {type(episode).__name__}")
    if not isinstance(rng_seed, (int, np.integer)) or isinstance(rng_seed, bool) or rng_seed < 0:
        raise ConfigError(f"rng_seed must be an integer >= 0, got {rng_seed!r}")
    if not isinstance(per_category, int) or isinstance(per_category, bool) or per_category < 0:
        raise ConfigError(f"per_category must be an integer >= 0, got {per_category!r}")
    rng = np.random.default_rng(int(rng_seed))
    cands = _candidates(episode)
    chosen: list[QA] = []
    for cat in CATEGORIES:
        pool = cands[cat]
        if cat == "probe":
            yes = [q for q in pool if q.answer == "yes"]
            no = [q for q in pool if q.answer == "no"]
            ys = [yes[i] for i in rng.permutation(len(yes))]
            ns = [no[i] for i in rng.permutation(len(no))]
            picked: list[QA] = []
            while len(picked) < per_category and (ys or ns):
                src = ys if (len(picked) % 2 == 0 and ys) or not ns else ns
                picked.append(src.pop())
            chosen.extend(picked)
        else:
            idx = rng.permutation(len(pool))[:per_category]
            chosen.extend(pool[i] for i in sorted(idx))
    chosen.sort(key=lambda q: (q.t, CATEGORIES.index(q.category)))
    return chosen
