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

import math
from dataclasses import dataclass

import numpy as np

from streamvlm.errors import ConfigError
from streamvlm.shapeworld.world import COLOURS, SHAPES, Episode

__all__ = ["QA", "CATEGORIES", "make_questions", "candidates", "FORWARD_TOLERANCE_S", "WHEN_TOLERANCE_S", "clock", "parse_clock", "spoken_answer", "is_correct", "appearances", "watch_target", "probe_question", "make_long_questions", "referent_age"]

CATEGORIES: tuple[str, ...] = ("realtime", "backward", "forward", "probe")
FORWARD_TOLERANCE_S = 2.0
#: A "when did ... appear?" answer counts as correct within this many seconds of the truth.
WHEN_TOLERANCE_S = 1.0
_FORWARD_HORIZON_S = 15.0  # a forward question is asked at most this long before the appearance


@dataclass(frozen=True)
class QA:
    """A question at stream time ``t`` with its ground-truth answer (lower-case word or integer)."""

    t: float
    category: str
    question: str
    answer: str
    tolerance_s: float | None = None


def probe_question(colour: str, shape: str) -> str:
    """The yes/no probe about the present: "Is there a <colour> <shape> now?"."""
    return f"Is there a {colour} {shape} now?"


def _seconds(t: float) -> str:
    return str(int(round(t)))


def _visible_combos(episode: Episode, t: float) -> list[tuple[str, str]]:
    return [(s.colour, s.shape) for s in episode.visible(t)]


def candidates(episode: Episode) -> dict[str, list[QA]]:
    """Every well-defined question of each category at every half second of ``episode`` (see the module doc)."""
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
            out["probe"].append(QA(t, "probe", probe_question(colour, shape), "yes"))
        for colour in COLOURS:
            for shape in SHAPES:
                if (colour, shape) not in combos:
                    out["probe"].append(QA(t, "probe", probe_question(colour, shape), "no"))
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



def _check_question_args(episode: object, rng_seed: object, per_category: object) -> None:
    """ConfigError naming the first bad argument of a question generator."""
    if not isinstance(episode, Episode):
        raise ConfigError(f"episode must be an Episode, got {type(episode).__name__}")
    if not isinstance(rng_seed, (int, np.integer)) or isinstance(rng_seed, bool) or rng_seed < 0:
        raise ConfigError(f"rng_seed must be an integer >= 0, got {rng_seed!r}")
    if not isinstance(per_category, int) or isinstance(per_category, bool) or per_category < 0:
        raise ConfigError(f"per_category must be an integer >= 0, got {per_category!r}")

def make_questions(episode: Episode, rng_seed: int, per_category: int = 2) -> list[QA]:
    """Up to ``per_category`` well-defined questions of each category, sorted by time.

    Fewer are returned for a category where the episode offers fewer well-defined questions. Probe
    questions alternate between "yes" and "no" answers where both exist.
    """
    _check_question_args(episode, rng_seed, per_category)
    rng = np.random.default_rng(int(rng_seed))
    cands = candidates(episode)
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


def clock(t: float) -> str:
    """``t`` seconds as the ``MM:SS`` clock the engine writes before every frame (``"00:12"``)."""
    minutes, seconds = divmod(int(t), 60)
    return f"{minutes:02d}:{seconds:02d}"


def parse_clock(text: str) -> float | None:
    """Seconds from an answer that gives a time: ``"00:12"``, ``"1:05"``, ``"12"``, ``"12 seconds"``; else None."""
    words = text.strip().rstrip(".").split()
    if not words:
        return None
    head = words[0]
    parts = head.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        return None
    value = 0
    for p in parts:
        value = value * 60 + int(p)
    return float(value)


def _is_time_question(qa: QA) -> bool:
    return qa.category == "forward" or qa.question.startswith("When did")


def spoken_answer(qa: QA) -> str:
    """The answer as the model says it: times as ``MM:SS`` clocks (copied from frame timestamps), else the word."""
    return clock(float(qa.answer)) if _is_time_question(qa) else qa.answer


def is_correct(qa: QA, text: str) -> bool:
    """Whether an answer ``text`` to ``qa`` is right: times within ``WHEN_TOLERANCE_S`` (or the question's own
    tolerance), words by exact match after lower-casing and stripping punctuation."""
    if _is_time_question(qa):
        got = parse_clock(text)
        tolerance = qa.tolerance_s if qa.tolerance_s is not None else WHEN_TOLERANCE_S
        return got is not None and abs(got - float(qa.answer)) <= tolerance
    return text.strip().strip(".!?").lower() == qa.answer


def appearances(episode: Episode, colour: str, shape: str) -> list[float]:
    """Whole seconds at which a ``colour shape`` starts to be on screen (it enters, or a shape changes into it).

    These are the moments a watch for "a <colour> <shape> appears" should alert.
    """
    out, before = [], False
    for t in range(int(math.ceil(episode.duration_s))):
        now = (colour, shape) in _visible_combos(episode, float(t))
        if now and not before:
            out.append(float(t))
        before = now
    return out


def watch_target(episode: Episode) -> tuple[str, str]:
    """A ``(colour, shape)`` worth watching for: the first to enter between 25 % and 85 % of the episode
    (else the last to enter), so a watch set at the start has something to wait for."""
    enters = [e for e in episode.events if e.kind == "enter"]
    middle = [e for e in enters if 0.25 * episode.duration_s <= e.t <= 0.85 * episode.duration_s]
    pick = middle[0] if middle else enters[-1]
    return pick.colour, pick.shape


def referent_age(episode: Episode, qa: QA) -> float | None:
    """Seconds between a backward question and the moment its answer rests on (the appearance a "When did
    ..." question names, the first shape's entry for "What colour was the first shape?"); None otherwise."""
    if qa.question.startswith("When did"):
        return qa.t - float(qa.answer)
    if qa.question == "What colour was the first shape?":
        first = min(e.t for e in episode.events if e.kind == "enter")
        return qa.t - first
    return None


def make_long_questions(episode: Episode, rng_seed: int, per_category: int = 2, min_age_s: float = 60.0) -> list[QA]:
    """Questions for a long episode (:func:`~streamvlm.shapeworld.world.make_long_episode`) where memory matters.

    Up to ``per_category`` of each: "When did the <colour> <shape> appear?" and "What colour was the first
    shape?" asked at least ``min_age_s`` seconds after the moment they are about (a question at minute 4
    about minute 1), and real-time questions about the present (which need no memory, for contrast).
    The wordings are the ones of :func:`make_questions`; sorted by time.
    """
    _check_question_args(episode, rng_seed, per_category)
    if not isinstance(min_age_s, (int, float)) or isinstance(min_age_s, bool) or not 0 <= min_age_s < episode.duration_s:
        raise ConfigError(f"min_age_s must be a number of seconds in [0, duration), got {min_age_s!r}")
    rng = np.random.default_rng([int(rng_seed), 17])
    cands = candidates(episode)
    old = [q for q in cands["backward"] if (referent_age(episode, q) or 0.0) >= min_age_s]
    pools = [
        [q for q in old if q.question.startswith("When did")],
        [q for q in old if q.question == "What colour was the first shape?"],
        cands["realtime"],
    ]
    chosen: list[QA] = []
    for pool in pools:
        idx = rng.permutation(len(pool))[:per_category]
        chosen.extend(pool[i] for i in sorted(idx))
    chosen.sort(key=lambda q: (q.t, CATEGORIES.index(q.category)))
    return chosen
